"""One reply renderer for every platform: split, then compare, edit, post, delete.

- :func:`split_message` cuts a reply into messages of at most ``limit``
  characters, between lines where possible, never leaving a code block (```
  or ~~~) open: it is closed at the end of one message and reopened, with its
  language, at the start of the next. ``cut_point`` says where an over-long
  line may be cut (Slack's never cuts an ``&amp;`` or a ``<link>``).
- :class:`ReplyMessages` keeps the messages that show one reply and what each
  shows; :meth:`ReplyMessages.show` makes them show new chunks: unchanged ones
  are left alone, changed ones edited, missing ones posted, extra ones deleted,
  and the core is told (``on_placed``) when the set of messages changed. The
  platform's calls come in as :class:`MessageOps`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")

#: Where to cut a line too long for the ``room`` left: an index in 1..room.
CutPoint = Callable[[str, int], int]


def cut_at_space(line: str, room: int) -> int:
    """After the last space in the second half of ``room``, else at ``room``."""
    at = line.rfind(" ", room // 2, room)
    return room if at <= 0 else at + 1


class _Splitter:
    """Packs lines into chunks of at most ``limit`` characters; a code fence that is
    open at a chunk's end is closed there and reopened at the next chunk's start."""

    def __init__(self, limit: int, cut_point: CutPoint) -> None:
        self.limit = limit
        self.cut_point = cut_point
        self.chunks: list[str] = []
        self.lines: list[str] = []
        self.fence: str | None = None  # the opening line of the open fence
        self.marker = ""  # its backticks or tildes
        self.fresh = True  # ``lines`` holds nothing but a reopened fence

    def length_with(self, line: str, reserve: int) -> int:
        joined = sum(len(x) for x in self.lines) + len(self.lines)  # lines + newlines
        return joined + len(line) + reserve

    def next_fence(self, line: str) -> tuple[str | None, str]:
        match = _FENCE.match(line)
        if match is None:
            return self.fence, self.marker
        if self.fence is None:
            return line.strip(), match.group(1)
        return None, ""

    def add(self, line: str) -> None:
        fence, marker = self.next_fence(line)
        reserve = len(marker) + 1 if fence else 0
        if not self.fresh and self.length_with(line, reserve) > self.limit:
            self.break_before()
        while self.length_with(line, reserve) > self.limit:
            line = self.cut(line, reserve)
        self.lines.append(line)
        self.fresh = False
        self.fence, self.marker = fence, marker

    def cut(self, line: str, reserve: int) -> str:
        """Put as much of an over-long line as fits in this chunk; return the rest."""
        room = max(1, self.limit - self.length_with("", reserve))
        at = max(1, min(room, self.cut_point(line, room)))
        self.lines.append(line[:at])
        self.fresh = False
        self.flush()
        return line[at:]

    def break_before(self) -> None:
        """Start a new chunk for a line that does not fit. A code block opened on
        this chunk's last line moves whole to the new chunk (no message ends in an
        empty code block); one that is all this chunk holds stays (a new chunk
        would begin with the same line: the next line is cut instead)."""
        if self.fence is None or self.lines[-1].strip() != self.fence:
            self.flush()
        elif len(self.lines) > 1:
            opener, marker = self.lines.pop(), self.marker
            self.fence = None
            self.flush()
            self.lines, self.fence, self.marker = [opener.strip()], opener.strip(), marker

    def flush(self) -> None:
        if not self.fresh:
            text = "\n".join(self.lines)
            if self.fence is not None:
                text += "\n" + self.marker
            if text.strip():
                self.chunks.append(text)
        self.lines = [self.fence] if self.fence is not None else []
        self.fresh = True


def split_message(text: str, limit: int, *, cut_point: CutPoint = cut_at_space) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` characters, preferring line
    breaks, never leaving a code block open. Blank text gives no message."""
    splitter = _Splitter(limit, cut_point)
    for line in text.split("\n"):
        splitter.add(line)
    splitter.flush()
    return splitter.chunks


# ---------------------------------------------------------------------------- the messages of a reply

H = TypeVar("H")


class MessageOps(Protocol[H]):
    """A platform's three calls on the messages of one reply. ``None`` means the
    call failed and the platform said why in the log; raising is fine too (it
    propagates out of :meth:`ReplyMessages.show`)."""

    async def post(self, text: str) -> H | None: ...

    async def edit(self, index: int, message: H, text: str, last: Any) -> H | None:
        """Show ``text`` in ``message`` (the ``index``-th of the reply); ``last`` is
        what :meth:`ReplyMessages.show` was given for the last chunk (its buttons,
        say), else None. Returns the message, or the one that replaced it (it was
        deleted meanwhile and posted again)."""
        ...

    async def delete(self, message: H) -> None: ...

    def id_of(self, message: H) -> str: ...


class ReplyMessages(Generic[H]):
    """The messages that show one reply, and the text each shows."""

    def __init__(
        self,
        ops: MessageOps[H],
        platform: str,
        *,
        resume: Sequence[H] = (),
        placed: Callable[[], Callable[[list[str]], Awaitable[None]] | None] = lambda: None,
    ) -> None:
        """``resume``: messages that show the reply already (after a restart, or
        for a Continue), with unknown text; ``placed()`` is the core's
        ``on_placed`` callback when it set one."""
        self.ops = ops
        self.platform = platform
        self.messages: list[H] = list(resume)
        self.shown: list[str] = [""] * len(self.messages)
        self._placed = placed

    def ids(self) -> list[str]:
        """The messages' ids; [] when the core does not want them (no ``on_placed``)."""
        return [self.ops.id_of(m) for m in self.messages] if self._placed() is not None else []

    async def show(self, chunks: Sequence[str], *, last: Any = None) -> bool:
        """Make the messages show ``chunks``: compare, edit, post, delete. With
        ``last``, the last chunk's message is edited even when its text is the
        same (``last`` goes to :meth:`MessageOps.edit`). False if a call failed."""
        before = self.ids()
        ok = True
        try:
            for i, chunk in enumerate(chunks):
                ok = await self._show_one(i, chunk, last if i == len(chunks) - 1 else None) and ok
            while len(self.messages) > len(chunks):
                self.shown.pop()
                await self.ops.delete(self.messages.pop())
        finally:
            if self.ids() != before:
                await self.tell_placed()
        return ok

    async def _show_one(self, i: int, chunk: str, last: Any) -> bool:
        if i >= len(self.messages):
            if not await self.append(chunk):
                return False
            if last is None:
                return True
        elif self.shown[i] == chunk and last is None:
            return True
        message = await self.ops.edit(i, self.messages[i], chunk, last)
        if message is None:
            return False
        self.messages[i], self.shown[i] = message, chunk
        return True

    async def append(self, text: str) -> bool:
        """Post ``text`` as one more message of the reply."""
        message = await self.ops.post(text)
        if message is None:
            return False
        self.messages.append(message)
        self.shown.append(text)
        return True

    async def tell_placed(self) -> None:
        """Tell the core which messages show the reply now (kept for a restart)."""
        callback = self._placed()
        if callback is None:
            return
        try:
            await callback(self.ids())
        except Exception:
            log.exception("%s: could not store where a reply is shown", self.platform)


async def retried(attempt: Callable[[], Awaitable[bool]], delays: Sequence[float]) -> bool:
    """Try ``attempt`` now and again after each of ``delays`` seconds until it
    returns True (a final reply's edits, issue 9); whether it ever did."""
    for delay in (*delays, None):
        if await attempt():
            return True
        if delay is not None:
            await asyncio.sleep(delay)
    return False
