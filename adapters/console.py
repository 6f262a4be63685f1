"""The console chat: a third platform, for a machine with no tokens.

It goes through the same store, queue and worker as Discord and Slack
(platform ``console``). On a terminal the reply streams as it is generated;
when standard input is not a terminal it reads one message per line, prints
each whole reply followed by a blank line, and returns at end of input once
every reply is out.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import time
import uuid
from typing import TextIO

from adapters.boundary import EventBoundary
from bot.adapter import Core
from bot.types import CommandContext, ConversationKey, Incoming, ReplySink

log = logging.getLogger(__name__)

KEY = ConversationKey("console", "local", "console", "")
PREFIX = "/xwin"


class ConsoleSink:
    """Prints one reply: streamed on a terminal, whole otherwise."""

    def __init__(self, out: TextIO, *, interactive: bool, shown: str = "") -> None:
        """``shown``: the reply so far, already on screen (``/xwin continue``)."""
        self.out = out
        self.interactive = interactive
        self.update_interval = 0.0 if interactive else 3600.0
        self.done = asyncio.Event()
        self._shown = shown

    async def queued(self, position: int) -> None:
        if self.interactive and position > 0:
            self._write(f"(queued: {position} ahead)\n")

    async def started(self) -> None:
        if self.interactive:
            self._write("xwin> ")

    async def update(self, text_so_far: str) -> None:
        if self.interactive and text_so_far.startswith(self._shown):
            self._write(text_so_far[len(self._shown) :])
            self._shown = text_so_far

    async def finish(self, text: str) -> None:
        if text.startswith(self._shown):
            self._write(text[len(self._shown) :] + "\n\n")
        else:  # the final text differs from what streamed (it was tidied up)
            self._write("\n" + text + "\n\n")
        self.done.set()

    async def fail(self, user_message: str) -> None:
        self._write(f"{user_message}\n\n")
        self.done.set()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class ConsoleAdapter:
    """An :class:`bot.adapter.Adapter` on standard input and output: its work is
    over at end of input (``wait_closed`` returns)."""

    def __init__(self, bot: Core, *, stdin: TextIO, stdout: TextIO, interactive: bool,
                 user: str | None = None) -> None:
        self.bot = bot
        self.stdin = stdin
        self.stdout = stdout
        self.interactive = interactive
        self.user = user or _user_name()
        self._started = False
        self._reader: asyncio.Task[None] | None = None
        self._events = EventBoundary("console", log, lambda: bot.metrics.error("adapter"))
        bot.register_platform("console", self.sink_for)

    async def start(self) -> None:
        """Nothing to connect: input is read in :meth:`wait_closed`, which
        ``bot.main`` awaits once the jobs left by an earlier process are queued
        again (at end of input the console waits for every queued reply)."""
        self._started = True

    async def not_ready(self) -> str | None:
        return None if self._started else "not started"

    async def wait_closed(self) -> None:
        """Read and answer input until its end."""
        if self._reader is None:
            self._reader = asyncio.create_task(self.run())
        await asyncio.shield(self._reader)

    async def close(self) -> None:
        task, self._reader = self._reader, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def sink_for(self, key: ConversationKey, reply_ref: dict[str, str]) -> ReplySink:
        return ConsoleSink(self.stdout, interactive=self.interactive)

    async def run(self) -> None:
        """Read and answer messages until end of input."""
        if self.interactive:
            self._write("Talking to the bot. /xwin for commands, Ctrl-D to quit.\n")
        while (line := await self._read_line()) is not None:
            text = line.strip()
            if text == f"{PREFIX} continue":
                await self._events.run(self._continue(), "continue", tell=self._tell)
            elif text == PREFIX or text.startswith(PREFIX + " "):
                await self._events.run(self._command(text[len(PREFIX) :].strip()), "a command", tell=self._tell)
            elif text:
                await self._events.run(self._message(text), "a message", tell=self._tell)
        await self.bot.drain()

    async def _read_line(self) -> str | None:
        if self.interactive:
            self._write("you> ")
        line = await asyncio.to_thread(self.stdin.readline)
        return line if line else None

    async def _command(self, text: str) -> None:
        ctx = CommandContext(key=KEY, author_id=self.user, is_dm=True, is_admin=True)
        reply = await self.bot.command(ctx, text)
        self._write(reply.text + "\n\n")

    async def _continue(self) -> None:
        """Continue the last reply (cut at max_new_tokens): only the new text is printed."""
        sinks: list[ConsoleSink] = []

        def make_sink(shown: str) -> tuple[ReplySink, dict[str, str]]:
            sinks.append(ConsoleSink(self.stdout, interactive=self.interactive, shown=shown))
            return sinks[-1], {}

        reply = await self.bot.continue_last(KEY, self.user, True, make_sink)
        if not reply.ok or not sinks:
            self._write(reply.text + "\n\n")
            return
        await sinks[0].done.wait()

    async def _message(self, text: str) -> None:
        sink = ConsoleSink(self.stdout, interactive=self.interactive)
        incoming = Incoming(
            key=KEY, message_id=uuid.uuid4().hex, author_id=self.user, author_name=self.user,
            text=text, is_dm=True, created_at=time.time(),
        )
        result = await self.bot.handle(incoming, sink)
        if result == "queued":
            await sink.done.wait()

    async def _tell(self, text: str) -> None:
        self._write(text + "\n\n")

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "you"
