"""The Discord reply sink: a placeholder, streamed edits, the final text retried, buttons."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import discord

from adapters import strings
from adapters.discord.text import MESSAGE_LIMIT, queued_text, split_message
from adapters.render import ReplyMessages, retried
from bot.errors import AdapterError
from bot.types import ReplyInfo

log = logging.getLogger(__package__)  # one logger per platform: "adapters.discord"

TYPING_EVERY = 8.0
NO_MENTIONS = discord.AllowedMentions.none()
_REFUSED = "not allowed to post in this channel"


# Buttons under a finished reply (issue 11). The custom id carries the reply's row
# id, so a click is understood with nothing in memory (after a restart too).
BUTTON_PREFIX = "xwin"
BUTTON_ACTIONS = ("continue", "regenerate", "up", "down")


def button_id(action: str, reply_id: int) -> str:
    return f"{BUTTON_PREFIX}:{action}:{reply_id}"


def parse_button_id(custom_id: str) -> tuple[str, int] | None:
    prefix, _, rest = custom_id.partition(":")
    action, _, number = rest.partition(":")
    if prefix != BUTTON_PREFIX or action not in BUTTON_ACTIONS or not number.isdigit():
        return None
    return action, int(number)


def reply_buttons(info: ReplyInfo) -> discord.ui.View:
    """Continue (only when cut at max_new_tokens), Regenerate, 👍, 👎."""
    view = discord.ui.View(timeout=None)
    if info.can_continue:
        view.add_item(discord.ui.Button(label="Continue", style=discord.ButtonStyle.primary,
                                        custom_id=button_id("continue", info.reply_id)))
    view.add_item(discord.ui.Button(label="Regenerate", style=discord.ButtonStyle.secondary,
                                    custom_id=button_id("regenerate", info.reply_id)))
    view.add_item(discord.ui.Button(emoji="👍", custom_id=button_id("up", info.reply_id)))
    view.add_item(discord.ui.Button(emoji="👎", custom_id=button_id("down", info.reply_id)))
    view.stop()  # not kept in discord.py's view store: clicks are read from the custom id
    return view


_Shown = discord.Message | discord.PartialMessage


class DiscordSink:
    """One reply: a placeholder that shows the queue position, then the text streamed
    by editing it, continued in new messages past the length limit."""

    #: Seconds between tries of the final edit (discord.py has already waited
    #: out each 429 up to five times by then); after the last, a new message.
    final_retry_delays: tuple[float, ...] = (1.0, 4.0)

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        update_interval: float,
        reference: discord.MessageReference | None = None,
        ready: Callable[[], Awaitable[None]] | None = None,
        limit: int = MESSAGE_LIMIT,
        resume: Sequence[discord.PartialMessage] = (),
        skip: int = 0,
        continuing: bool = False,
    ) -> None:
        """``resume``: a message of the reply to go on editing (Continue), which
        shows the reply's text from its ``skip``-th message on."""
        self.update_interval = update_interval
        self._channel = channel
        self._reference = reference
        self._ready = ready
        self._limit = limit
        # A job resumed after a restart shows its reply in the messages it had (issue 9);
        # a Continue goes on editing the reply's last message, which shows its text from
        # the ``skip``-th message on, and takes its old buttons off with the first edit.
        self._reply: ReplyMessages[_Shown] = ReplyMessages(
            self, "Discord", resume=resume, placed=lambda: self.on_placed
        )
        self._skip = skip
        self._clear_view = continuing
        self._info: ReplyInfo | None = None
        #: Set by the core: told the ids of the messages that show this reply.
        self.on_placed: Callable[[list[str]], Awaitable[None]] | None = None
        self._has_text = continuing
        self._started = continuing
        self._forbidden = False
        self._lock = asyncio.Lock()
        self._typing: asyncio.Task[None] | None = None
        self._latest: list[str] | None = None  # newest streamed text not yet shown
        self._flusher: asyncio.Task[None] | None = None

    async def queued(self, position: int) -> None:
        # The worker may start a job before ``Bot.handle`` reports its position.
        await self._show([queued_text(position)], placeholder=True)

    async def started(self) -> None:
        self._started = True
        if not self._has_text:
            await self._show([strings.THINKING])
        if self._typing is None:
            self._typing = asyncio.create_task(self._keep_typing())

    async def update(self, text_so_far: str) -> None:
        """Returns at once: the edit happens in the background, so a slow or
        rate-limited Discord never holds up generation; only the newest text is sent."""
        if not text_so_far.strip():
            return
        self._has_text = True
        self._latest = split_message(text_so_far, self._limit)[self._skip :]
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def reply_stored(self, info: ReplyInfo) -> None:
        self._info = info

    async def finish(self, text: str) -> None:
        """The final text must arrive (issue 9): edits are retried with backoff,
        then the text is posted as new messages (the old ones removed). Raises
        :class:`AdapterError` when it could not be shown at all."""
        await self._settle()
        self._has_text = True
        chunks = split_message(text, self._limit)[self._skip :] or [strings.EMPTY_REPLY]
        await self._deliver(chunks)
        if self._info is not None:
            await self._show([], buttons=reply_buttons(self._info))

    async def _deliver(self, chunks: list[str]) -> None:
        if not await retried(lambda: self._final(chunks), self.final_retry_delays):
            await self._repost(chunks)

    async def fail(self, user_message: str) -> None:
        await self._settle()
        if self._has_text:
            await self._show([*self._reply.shown, user_message])
        else:
            await self._show([user_message])

    async def _final(self, chunks: list[str]) -> bool:
        async with self._lock:
            if self._forbidden:
                raise AdapterError(_REFUSED)
            try:
                await self._put(chunks)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
                log.warning("Discord: the final reply did not go through (%s); trying again", _why(exc))
                return False
        return True

    async def _repost(self, chunks: list[str]) -> None:
        """Edits keep failing: post the reply as new messages, then drop the old ones."""
        async with self._lock:
            reply = self._reply
            (old, old_shown), reply.messages, reply.shown = (reply.messages, reply.shown), [], []
            try:
                await self._apply(chunks)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
                reply.messages, reply.shown = old, old_shown
                raise AdapterError(f"Discord: the final reply could not be posted ({_why(exc)})") from None
        for message in old:
            with contextlib.suppress(discord.HTTPException, aiohttp.ClientError, OSError):
                await message.delete()
        log.info("Discord: the final reply was posted as a new message after its edits failed")

    async def _flush(self) -> None:
        while self._latest is not None:
            chunks, self._latest = self._latest, None
            await self._show(chunks)

    async def _settle(self) -> None:
        """Stop typing and drop pending edits: the final text comes next."""
        await self._stop_typing()
        self._latest = None
        if self._flusher is not None:
            await self._flusher
            self._flusher = None

    async def _show(
        self, chunks: list[str], *, placeholder: bool = False, buttons: discord.ui.View | None = None
    ) -> None:
        async with self._lock:
            if (placeholder and self._started) or self._forbidden:
                return
            try:
                if buttons is None:
                    await self._put(chunks)
                elif self._reply.messages:
                    self._reply.messages[-1] = await self._reply.messages[-1].edit(view=buttons)
            except discord.HTTPException as exc:
                log.warning("Discord: could not update a reply: %s %s", exc.status, exc.text)
            except AdapterError as exc:
                if not self._forbidden:  # that one was said once already
                    log.warning("Discord: reply not sent: %s", exc)
            except Exception:
                # The sink is an error boundary: a failed edit must not end the job.
                log.exception("Discord: could not update a reply")

    async def _put(self, chunks: list[str]) -> None:
        """Show ``chunks`` (under the lock); a refusal becomes an AdapterError."""
        if self._ready is not None:
            await self._ready()
        try:
            await self._apply(chunks)
        except discord.Forbidden as exc:
            self._refused(exc)
            raise AdapterError(_REFUSED) from None

    def _refused(self, exc: discord.Forbidden) -> None:
        self._forbidden = True  # one clear line, not one per streamed edit
        log.warning(
            "Discord: not allowed to post in channel %s (%s): give the bot the Send Messages "
            "and Send Messages in Threads permissions there",
            getattr(self._channel, "id", "?"),
            exc.text,
        )

    async def _apply(self, chunks: list[str]) -> None:
        await self._reply.show(chunks)

    # MessageOps of this reply's ReplyMessages (adapters/render.py)

    async def post(self, text: str) -> discord.Message:
        reference = self._reference if not self._reply.messages else None
        if reference is None:
            return await self._channel.send(text, allowed_mentions=NO_MENTIONS)
        return await self._channel.send(text, allowed_mentions=NO_MENTIONS, reference=reference)

    async def edit(self, index: int, message: _Shown, text: str, last: object) -> _Shown:
        try:
            if index == 0 and self._clear_view:  # a continued reply's old buttons go with its first edit
                edited = await message.edit(content=text, allowed_mentions=NO_MENTIONS, view=None)
                self._clear_view = False
                return edited
            return await message.edit(content=text, allowed_mentions=NO_MENTIONS)
        except discord.NotFound:  # deleted meanwhile (or before a restart): post it again
            return await self.post(text)

    async def delete(self, message: _Shown) -> None:
        with contextlib.suppress(discord.NotFound):
            await message.delete()

    def id_of(self, message: _Shown) -> str:
        return str(message.id)

    async def _keep_typing(self) -> None:
        try:
            while True:
                await self._channel.typing()
                await asyncio.sleep(TYPING_EVERY)
        except discord.HTTPException as exc:
            log.debug("typing indicator failed: %s", exc)

    async def _stop_typing(self) -> None:
        task, self._typing = self._typing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _why(exc: BaseException) -> str:
    if isinstance(exc, discord.HTTPException):
        return f"{exc.status} {exc.text}"
    return f"{type(exc).__name__}: {exc}"


