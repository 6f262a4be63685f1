"""The adapter contract, both ways, platform-free.

:class:`Adapter` is what every platform adapter implements and all the
composition root (``bot.main``) knows of one. :class:`Core` is what an adapter
may call on the bot (:class:`bot.app.Bot` implements it): the one way adapters
reach the core. See docs/architecture.md.

Lifecycle of an adapter::

    await adapter.start()        # connect; AdapterError with one sentence on a bad token/scope
    await adapter.wait_closed()  # until its work is over; AdapterError if the platform is lost for good
    await adapter.close()        # idempotent; wait_closed then returns
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bot.types import (
    ActionSink,
    CommandContext,
    CommandReply,
    ConversationKey,
    HandleResult,
    Incoming,
    Platform,
    ReplyAction,
    ReplySink,
    SinkFactory,
    Vote,
)

if TYPE_CHECKING:
    from bot.attachments import FileFetcher
    from bot.config import Config
    from bot.metrics import Metrics


class Adapter(Protocol):
    """One platform in front of the core."""

    async def start(self) -> None:
        """Connect (or start listening). Raises :class:`~bot.errors.AdapterError`
        with one sentence saying what to fix."""

    async def close(self) -> None:
        """Disconnect and release everything; safe to call twice or after a failed start."""

    async def not_ready(self) -> str | None:
        """For ``/readyz``: None while connected to the platform, else why not."""

    async def wait_closed(self) -> None:
        """Return when the adapter's work is over (the console: end of input;
        the others: after :meth:`close`). ``bot.main`` awaits it once the jobs
        of an earlier process are queued again, so an adapter whose work is a
        loop (the console's reading) may run it here. Raise :class:`~bot.errors.AdapterError`
        when the platform connection is lost for good (a revoked token, say) and
        the adapter's own reconnecting cannot help: the process then ends."""


class Core(Protocol):
    """What adapters call on the bot (implemented by :class:`bot.app.Bot`)."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> Metrics: ...

    def register_platform(self, platform: Platform, sink_factory: SinkFactory) -> None:
        """``sink_factory(key, reply_ref)`` re-creates a sink for a job resumed after a restart."""

    async def handle(
        self, incoming: Incoming, sink: ReplySink, fetcher: FileFetcher | None = None
    ) -> HandleResult:
        """Store the message and queue its reply (see docs/architecture.md)."""
        ...

    async def command(self, ctx: CommandContext, text: str) -> CommandReply:
        """Run ``/xwin <text>``; ``""`` is the help."""
        ...

    async def set_settings(self, ctx: CommandContext, values: Mapping[str, Any]) -> CommandReply:
        """``/xwin set`` from a platform's typed options: values, never parsed as text."""
        ...

    async def continue_reply(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply:
        """The Continue button: a reply cut at max_new_tokens goes on."""
        ...

    async def continue_last(self, key: ConversationKey, user_id: str, is_admin: bool,
                            make_sink: ActionSink) -> CommandReply:
        """``/xwin continue``: Continue on the newest reply of the conversation."""
        ...

    async def last_reply_id(self, key: ConversationKey) -> int | None:
        """The newest reply of the conversation (to find the message it ends in), or None."""
        ...

    async def regenerate(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply:
        """The Regenerate button: the last question answered again."""
        ...

    async def feedback(self, action: ReplyAction, vote: Vote) -> CommandReply:
        """A thumbs up or down, once per user and reply."""
        ...

    async def cancel_message(self, key: ConversationKey, platform_message_id: str) -> bool:
        """The asking message was deleted: cancel its reply. True if one was cancelled."""
        ...

    async def knows_conversation(self, key: ConversationKey) -> bool:
        """Is this thread one of the bot's conversations?"""
        ...

    async def drain(self) -> None:
        """Wait until every queued reply has been given."""
