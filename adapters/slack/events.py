"""Slack events read: the message fields the adapter uses, panel commands and titles, panel contexts."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slack_bolt.context.assistant.thread_context import AssistantThreadContext
from slack_bolt.context.assistant.thread_context_store.async_store import AsyncAssistantThreadContextStore

from bot.types import ConversationKey, RemoteFile

log = logging.getLogger(__package__)  # one logger per platform: "adapters.slack"

#: Message subtypes that are someone writing to the bot.
_USER_SUBTYPES = frozenset({"", "file_share", "thread_broadcast"})
#: Whole messages in a panel thread that run a command instead of asking the model.
PANEL_COMMANDS = frozenset({"stop", "continue", "settings", "status", "forget", "help"})
_TITLE_CHARS = 80
_PANEL_CONTEXTS = 1024


class _PanelContexts(AsyncAssistantThreadContextStore):
    """What channel each panel thread's user is viewing, as Slack reported it
    (``assistant_thread_context_changed``): recorded in memory, never read
    from Slack and never given to the model."""

    def __init__(self) -> None:
        self._contexts: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()

    async def save(self, *, channel_id: str, thread_ts: str, context: dict[str, str]) -> None:
        log.debug("slack: panel thread %s/%s now shows %s", channel_id, thread_ts, context.get("channel_id"))
        self._contexts[(channel_id, thread_ts)] = dict(context)
        while len(self._contexts) > _PANEL_CONTEXTS:
            self._contexts.popitem(last=False)

    async def find(self, *, channel_id: str, thread_ts: str) -> AssistantThreadContext | None:
        context = self._contexts.get((channel_id, thread_ts))
        return AssistantThreadContext(context) if context else None


@dataclass(frozen=True)
class _Identity:
    """Who the bot is, from ``auth.test``."""

    team_id: str
    user_id: str
    bot_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class _Message:
    """The fields of a Slack message event the adapter uses."""

    team: str
    channel: str
    user: str
    ts: str
    thread_ts: str
    text: str
    is_dm: bool
    subtype: str
    from_bot: bool
    files: tuple[RemoteFile, ...] = ()

    @classmethod
    def of(cls, event: Mapping[str, Any], body: Mapping[str, Any]) -> _Message:
        return cls(
            # The workspace the app is installed in (event.team is the author's,
            # another one in Slack Connect channels).
            team=str(body.get("team_id") or event.get("team") or ""),
            channel=str(event.get("channel", "")),
            user=str(event.get("user") or ""),
            ts=str(event.get("ts", "")),
            thread_ts=str(event.get("thread_ts") or ""),
            text=str(event.get("text") or ""),
            is_dm=event.get("channel_type") == "im" or str(event.get("channel", "")).startswith("D"),
            subtype=str(event.get("subtype") or ""),
            from_bot=bool(event.get("bot_id")) or event.get("subtype") == "bot_message",
            files=_files_of(event),
        )


def panel_command(text: str) -> str | None:
    """The ``/xwin`` command a panel message stands for, or None for a question."""
    words = text.strip()
    if words.lower().rstrip(".!") in PANEL_COMMANDS:
        return words.lower().rstrip(".!")
    if words.lower() == "/xwin" or words.lower().startswith("/xwin "):
        return words[len("/xwin") :].strip()
    return None


def _suggested_prompt(spec: str) -> dict[str, str]:
    """``"Title | message"`` (or just a message) as Slack's prompt object."""
    title, bar, message = spec.partition("|")
    if not bar:
        return {"title": _title(spec), "message": spec.strip()}
    return {"title": title.strip(), "message": message.strip()}


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _TITLE_CHARS else line[: _TITLE_CHARS - 1].rstrip() + "…"


def _files_of(event: Mapping[str, Any]) -> tuple[RemoteFile, ...]:
    """The files of a message event (``url_private_download``, else ``url_private``;
    none for a file deleted or hidden by the plan's limits)."""
    files = event.get("files") or []
    return tuple(
        RemoteFile(
            name=str(f.get("name") or f.get("title") or "file"),
            content_type=str(f.get("mimetype") or ""),
            size=f["size"] if isinstance(f.get("size"), int) else -1,
            url=str(f.get("url_private_download") or f.get("url_private") or ""),
        )
        for f in files
        if isinstance(f, Mapping)
    )


def _dm_key(channel: str) -> ConversationKey:
    return ConversationKey("slack", "dm", channel, "")


def _ts_seconds(ts: str) -> float:
    try:
        return float(ts)
    except ValueError:
        return time.time()
