"""The normalized, platform-free types every adapter speaks.

Adapters turn a platform's events into :class:`Incoming` and implement
:class:`ReplySink`; nothing in ``bot/`` knows Discord or Slack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Platform = Literal["discord", "slack", "console"]
Role = Literal["user", "assistant"]
AttachmentStatus = Literal["read", "cut", "skipped"]
#: What :meth:`bot.app.Bot.handle` did with a message.
HandleResult = Literal["queued", "duplicate", "busy", "limited", "empty", "stopped"]


@dataclass(frozen=True)
class RemoteFile:
    """A file attached to a message, as the platform describes it (nothing
    downloaded yet). ``url`` is opaque to ``bot/``: the adapter's fetcher reads it."""

    name: str
    content_type: str  # "" when the platform does not say
    size: int  # bytes, from the platform's metadata; -1 when unknown
    url: str


@dataclass(frozen=True)
class Attachment:
    """A file as stored with its message: the text the model reads, or why it
    was left out (see ``bot/attachments.py``)."""

    name: str
    status: AttachmentStatus
    text: str = ""  # "" when skipped
    reason: str = ""  # why it was skipped, one clause for the user


@dataclass(frozen=True)
class ConversationKey:
    """Where a conversation lives.

    ``workspace`` is the guild or team id (``"dm"`` for direct messages);
    ``thread`` is the Discord thread id, the Slack ``thread_ts``, or ``""`` for
    a DM channel's running conversation.
    """

    platform: Platform
    workspace: str
    channel: str
    thread: str = ""

    def channel_key(self) -> ConversationKey:
        """The same place without the thread (a channel's own scope)."""
        return ConversationKey(self.platform, self.workspace, self.channel, "")


@dataclass(frozen=True)
class Incoming:
    """One message for the bot, already stripped of platform markup."""

    key: ConversationKey
    message_id: str
    author_id: str
    author_name: str
    text: str
    is_dm: bool
    created_at: float
    # Adapter data needed to answer this message again after a restart
    # (e.g. the Discord channel to post in); stored with the job, opaque to bot/.
    reply_ref: dict[str, str] = field(default_factory=dict)
    # Files attached to the message (issue 11): read by Bot.handle through the
    # adapter's fetcher, within [attachments] limits.
    files: tuple[RemoteFile, ...] = ()


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    author_name: str = ""
    message_id: str = ""
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class Settings:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int
    system_prompt: str


@dataclass(frozen=True)
class CommandContext:
    """Who asked for a command, and where."""

    key: ConversationKey
    author_id: str
    is_dm: bool
    # The adapter decides: Discord Manage Channels / admin role, Slack admin_users.
    is_admin: bool


@dataclass(frozen=True)
class CommandReply:
    text: str
    ephemeral: bool = True
    ok: bool = True


class ReplySink(Protocol):
    """How the core talks back to whoever asked.

    The worker calls these in order: ``queued`` (maybe several times, as the
    queue moves), ``started``, ``update`` (throttled to ``update_interval``
    seconds), then exactly one of ``finish`` or ``fail``.
    """

    #: Seconds between ``update`` calls; 0 means every piece as it comes.
    update_interval: float

    async def queued(self, position: int) -> None: ...

    async def started(self) -> None: ...

    async def update(self, text_so_far: str) -> None: ...

    async def finish(self, text: str) -> None: ...

    async def fail(self, user_message: str) -> None: ...


class QuietSink:
    """A :class:`ReplySink` that shows no progress (nobody is watching the
    reply come): ``queued``, ``started`` and ``update`` do nothing; a
    subclass says what ``finish`` and ``fail`` do."""

    update_interval = 1.0

    async def queued(self, position: int) -> None:
        return None

    async def started(self) -> None:
        return None

    async def update(self, text_so_far: str) -> None:
        return None

    async def finish(self, text: str) -> None:
        raise NotImplementedError

    async def fail(self, user_message: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class ReplyInfo:
    """A finished reply as stored: what the buttons under it carry."""

    reply_id: int
    #: It stopped at max_new_tokens: a Continue button makes sense.
    can_continue: bool


@runtime_checkable
class ButtonSink(Protocol):
    """A :class:`ReplySink` that puts buttons (Continue, Regenerate, feedback)
    under a finished reply: the worker calls ``reply_stored`` right before ``finish``."""

    async def reply_stored(self, info: ReplyInfo) -> None: ...


@dataclass(frozen=True)
class ReplyAction:
    """Someone pressed a button under a reply (the adapter read it from the button's id)."""

    key: ConversationKey
    reply_id: int
    user_id: str
    # Decided by the adapter, as for commands.
    is_admin: bool = False


class SinkFactory(Protocol):
    """Re-creates a sink for a job after a restart, from its ``reply_ref``."""

    def __call__(self, key: ConversationKey, reply_ref: dict[str, str]) -> ReplySink: ...


#: Builds the sink for a Continue/Regenerate job from the reply's text so far;
#: returns it with the ``reply_ref`` that re-creates it after a restart (issue 11).
ActionSink = Callable[[str], tuple[ReplySink, dict[str, str]]]
#: A feedback button's vote.
Vote = Literal["up", "down"]
