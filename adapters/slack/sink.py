"""Slack reply sinks: edits in a thread (:class:`SlackReplySink`), native
streaming in the assistant panel (:class:`PanelReplySink`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from adapters import strings
from adapters.render import ReplyMessages, retried
from adapters.slack.api import JSON, _error_of, _why
from adapters.slack.blocks import BlockSupport, action_blocks, final_blocks
from adapters.slack_format import StreamSplitter, escape, split_message, to_mrkdwn
from bot.errors import AdapterError
from bot.types import ReplyInfo

log = logging.getLogger(__package__)  # one logger per platform: "adapters.slack"

#: Characters per Slack message. Slack truncates ``text`` past 40,000 and
#: advises 4,000; staying under it keeps each message readable and editable.
MESSAGE_LIMIT = 3500
#: Errors of chat.startStream that mean "never for this app": edits from then on.
_NO_STREAMING = frozenset({"unknown_method", "not_allowed_token_type"})


class SlackReplySink:
    """One reply in one Slack thread (or DM): a placeholder, then throttled
    ``chat.update`` edits, continued in new messages past ``limit``."""

    #: Seconds between tries of the final text (after the client's own
    #: retries of a 429); after the last, it is posted as a new message.
    final_retry_delays: tuple[float, ...] = (1.0, 4.0)

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str,
        *,
        update_interval: float,
        limit: int = MESSAGE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        resume: Sequence[str] = (),
        skip: int = 0,
        continuing: bool = False,
        support: BlockSupport | None = None,
    ) -> None:
        """``resume``: the ts of messages that show the reply already (after a
        restart), or of the one to go on editing (a Continue, ``continuing``),
        which shows the reply's text from its ``skip``-th message on."""
        self.update_interval = update_interval
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts
        self._limit = limit
        self._clock = clock
        # A job resumed after a restart shows its reply in the messages it had (issue 9);
        # a Continue goes on editing the reply's last message, which shows its text from
        # the ``skip``-th message on, and takes its old buttons off with the first edit.
        self._reply: ReplyMessages[str] = ReplyMessages(self, "slack", resume=resume, placed=lambda: self.on_placed)
        self._skip = skip
        self._clear_blocks = continuing
        self._info: ReplyInfo | None = None
        self._support = support or BlockSupport()
        #: Set by the core: told the ts of the messages that show this reply.
        self.on_placed: Callable[[list[str]], Awaitable[None]] | None = None
        self._last_edit = float("-inf")
        self._streamed = continuing
        self._lock = asyncio.Lock()

    async def queued(self, position: int) -> None:
        status = f"_{strings.slack_queued(position)}_"
        await self._status(status)

    async def started(self) -> None:
        await self._status(f"_{strings.slack_queued(0)}_")

    async def update(self, text_so_far: str) -> None:
        if not text_so_far.strip() or self._clock() - self._last_edit < self.update_interval / 2:
            return
        self._streamed = True
        await self._sync(split_message(to_mrkdwn(text_so_far), self._limit)[self._skip :])

    async def reply_stored(self, info: ReplyInfo) -> None:
        self._info = info

    async def finish(self, text: str) -> None:
        """The final text must arrive (issue 9): retried with backoff, then
        posted as new messages (the old ones deleted). Raises
        :class:`AdapterError` when it could not be shown at all."""
        chunks = split_message(to_mrkdwn(text), self._limit)[self._skip :] if text.strip() else []
        chunks = chunks or [f"_{strings.NO_REPLY}_"]
        if not await retried(lambda: self._sync(chunks, buttons=self._info), self.final_retry_delays):
            await self._repost(chunks)

    async def fail(self, user_message: str) -> None:
        text = to_mrkdwn(user_message)
        if self._streamed:
            # Keep the partial answer, say why it stopped.
            if await self._reply.append(text):
                await self._reply.tell_placed()
        else:
            await self._status(text)

    async def _status(self, text: str) -> None:
        """Show a one-line status in the placeholder (posted on first use)."""
        if self._streamed:
            return
        await self._sync([text])

    async def _sync(self, chunks: list[str], *, buttons: ReplyInfo | None = None) -> bool:
        """Show ``chunks``, ``buttons`` under the last one (the final message);
        False if some call failed (logged)."""
        async with self._lock:
            ok = await self._reply.show(chunks, last=buttons)
            self._last_edit = self._clock()
        return ok

    async def _repost(self, chunks: list[str]) -> None:
        """Edits keep failing: post the reply anew, then delete the old messages."""
        async with self._lock:
            reply = self._reply
            old, reply.messages, reply.shown = reply.messages, [], []
            for chunk in chunks:
                if not await reply.append(chunk):
                    raise AdapterError(f"Slack: the final reply could not be posted in {self._channel}")
            await reply.tell_placed()
        for ts in old:
            await self.delete(ts)
        log.info("slack: the final reply was posted anew in %s after its edits failed", self._channel)

    # MessageOps of this reply's ReplyMessages (adapters/render.py)

    async def post(self, text: str) -> str | None:
        try:
            resp = await self._client.chat_postMessage(
                channel=self._channel,
                thread_ts=self._thread_ts or None,
                text=text,
                unfurl_links=False,
                unfurl_media=False,
                link_names=False,  # "@here" typed by the model stays text
            )
        except (SlackClientError, OSError, TimeoutError) as exc:
            log.warning("slack: chat.postMessage in %s failed: %s", self._channel, _why(exc))
            return None
        return str(resp["ts"])

    async def edit(self, index: int, ts: str, text: str, last: ReplyInfo | None) -> str | None:
        """``last``: the reply's buttons, under its last message."""
        blocks: list[JSON] | None = None
        if last is not None:
            blocks = final_blocks(text, last, native_feedback=self._support.native_feedback)
        elif index == 0 and self._clear_blocks:
            self._clear_blocks, blocks = False, []
        try:
            await self._client.chat_update(channel=self._channel, ts=ts, text=text, link_names=False, blocks=blocks)
        except SlackApiError as exc:
            if last is not None and self._support.native_feedback and _error_of(exc) == "invalid_blocks":
                log.warning("slack: feedback_buttons refused (invalid_blocks); using plain buttons from now on")
                self._support.native_feedback = False
                return await self.edit(index, ts, text, last)
            if _error_of(exc) != "message_not_found":
                log.warning("slack: chat.update in %s failed: %s", self._channel, _error_of(exc))
                return None
            return await self.post(text)  # deleted meanwhile (or before a restart): posted again in its place
        except (SlackClientError, OSError, TimeoutError) as exc:
            log.warning("slack: chat.update in %s failed: %s", self._channel, _why(exc))
            return None
        return ts

    async def delete(self, ts: str) -> None:
        try:
            await self._client.chat_delete(channel=self._channel, ts=ts)
        except (SlackClientError, OSError, TimeoutError) as exc:
            log.warning("slack: could not delete an outdated message in %s: %s", self._channel, _why(exc))

    def id_of(self, ts: str) -> str:
        return ts


class StreamSupport:
    """Whether this app may stream replies natively; refused once, off for
    the rest of the process (with one log line)."""

    def __init__(self, enabled: bool) -> None:
        self.available = enabled

    def refuse(self, error: str) -> None:
        if self.available:
            self.available = False
            log.warning("slack: native streaming is not available (%s); replies use chat.update edits "
                        "from now on", error)


class PanelReplySink:
    """One reply in an assistant (panel) thread.

    The thread's status line shows the wait (queue position, "is thinking…")
    until the first text; the text then streams into the thread through
    ``chat.startStream``/``appendStream``/``stopStream``, in messages of at
    most ``limit`` characters that never break a code block. Where Slack
    refuses a stream, the reply (the rest of it) goes through a
    :class:`SlackReplySink`'s edits instead.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str,
        *,
        user: str,
        team: str,
        streams: StreamSupport,
        update_interval: float,
        limit: int = MESSAGE_LIMIT,
        support: BlockSupport | None = None,
    ) -> None:
        self.update_interval = update_interval
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts
        self._support = support or BlockSupport()
        self._info: ReplyInfo | None = None
        self._user = user or None
        self._team = team or None
        self._streams = streams
        self._splitter = StreamSplitter(limit)
        self._edits = SlackReplySink(client, channel, thread_ts, update_interval=update_interval, limit=limit,
                                     support=self._support)
        self._ts = ""  # the message being streamed
        self._edits_from: int | None = None  # reply characters streamed before edits took over
        self._lock = asyncio.Lock()

    async def queued(self, position: int) -> None:
        await self._status(strings.panel_waiting(position))

    async def started(self) -> None:
        await self._status(strings.PANEL_THINKING)

    async def update(self, text_so_far: str) -> None:
        if text_so_far.strip():
            async with self._lock:
                await self._show(text_so_far, final=False)

    async def finish(self, text: str) -> None:
        async with self._lock:
            await self._show(text if text.strip() else f"_{strings.NO_REPLY}_", final=True)

    async def fail(self, user_message: str) -> None:
        async with self._lock:
            if self._ts:
                await self._stop(final=True)  # keep the partial answer, say why it stopped
            await self._edits.fail(user_message)

    async def reply_stored(self, info: ReplyInfo) -> None:
        self._info = info
        await self._edits.reply_stored(info)  # where edits took over, they show the buttons

    def final_blocks(self) -> list[JSON]:
        """Blocks shown under the finished reply: its buttons."""
        if self._info is None:
            return []
        return action_blocks(self._info, native_feedback=self._support.native_feedback)

    async def _show(self, text: str, *, final: bool) -> None:
        if self._edits_from is None and not self._streams.available and not self._splitter.consumed:
            self._edits_from = 0  # refused before this reply began (a stream under way goes on)
        if self._edits_from is None:
            before = len(self._splitter.consumed)
            if await self._stream(text, final=final):
                return
            self._edits_from = before
        rest = text[self._edits_from :]
        await (self._edits.finish(rest) if final else self._edits.update(rest))

    async def _stream(self, text: str, *, final: bool) -> bool:
        """Stream what is new in ``text``; False if Slack refused the stream."""
        # Trailing blanks wait for what follows them: the final text has none.
        for i, piece in enumerate(self._splitter.feed(text if final else text.rstrip())):
            if i:
                await self._stop(final=False)
            if piece and not await self._send(piece):
                return False
        if final and self._ts:
            await self._stop(final=True)
        return True

    async def _send(self, piece: str) -> bool:
        markdown = escape(piece)  # no <!here>, <@U…> or <#C…> from the model
        method = "chat.appendStream" if self._ts else "chat.startStream"
        try:
            if self._ts:
                await self._client.chat_appendStream(channel=self._channel, ts=self._ts, markdown_text=markdown)
            else:
                resp = await self._client.chat_startStream(
                    channel=self._channel, thread_ts=self._thread_ts, markdown_text=markdown,
                    recipient_user_id=self._user, recipient_team_id=self._team,
                )
                self._ts = str(resp["ts"])
        except SlackApiError as exc:
            error = _error_of(exc)
            if error in _NO_STREAMING:
                self._streams.refuse(error)
            else:
                log.warning("slack: %s in %s failed (%s); this reply goes on as edits", method,
                            self._channel, error)
            if self._ts:
                await self._stop(final=False)
            return False
        return True

    async def _stop(self, *, final: bool) -> None:
        ts, self._ts = self._ts, ""
        blocks = self.final_blocks() if final else []
        try:
            await self._client.chat_stopStream(channel=self._channel, ts=ts, blocks=blocks or None)
        except SlackApiError as exc:
            if blocks and self._support.native_feedback and _error_of(exc) == "invalid_blocks":
                # As SlackReplySink.edit: the stream is still open; stop it with plain buttons.
                log.warning("slack: feedback_buttons refused (invalid_blocks); using plain buttons from now on")
                self._support.native_feedback = False
                self._ts = ts
                await self._stop(final=final)
                return
            log.warning("slack: chat.stopStream in %s failed: %s", self._channel, _error_of(exc))

    async def _status(self, status: str) -> None:
        try:
            await self._client.assistant_threads_setStatus(
                channel_id=self._channel, thread_ts=self._thread_ts, status=status
            )
        except SlackApiError as exc:
            log.warning("slack: assistant.threads.setStatus in %s failed: %s", self._channel, _error_of(exc))
