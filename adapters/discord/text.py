"""Discord text: a reply cut into messages, Discord markup made readable, thread titles."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from adapters import render, strings

MESSAGE_LIMIT = 2000
THREAD_NAME_LIMIT = 100


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Discord messages of a reply (see :func:`adapters.render.split_message`)."""
    return render.split_message(text, limit)


_USER = re.compile(r"<@!?(\d+)>")
_ROLE = re.compile(r"<@&(\d+)>")
_CHANNEL = re.compile(r"<#(\d+)>")
_EMOJI = re.compile(r"<a?:(\w+):\d+>")
_TIMESTAMP = re.compile(r"<t:(-?\d+)(?::[tTdDfFR])?>")
_SPACES = re.compile(r"[ \t]{2,}")


def readable_text(
    content: str,
    *,
    bot_id: int,
    users: Mapping[int, str],
    roles: Mapping[int, str],
    channels: Mapping[int, str],
) -> str:
    """Discord markup to plain text: the bot's own mention removed, other mentions
    as ``@name`` / ``@role`` / ``#channel``, custom emoji as ``:name:``, timestamps
    as UTC dates."""
    text = re.sub(rf"<@!?{bot_id}>", " ", content)
    text = _USER.sub(lambda m: "@" + users.get(int(m.group(1)), "unknown-user"), text)
    text = _ROLE.sub(lambda m: "@" + roles.get(int(m.group(1)), "unknown-role"), text)
    text = _CHANNEL.sub(lambda m: "#" + channels.get(int(m.group(1)), "unknown-channel"), text)
    text = _EMOJI.sub(lambda m: f":{m.group(1)}:", text)
    text = _TIMESTAMP.sub(lambda m: _utc(int(m.group(1))), text)
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.strip().split("\n"))


def _utc(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return str(seconds)


def thread_name(text: str) -> str:
    """A thread title from the first line of the question."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return "Xwin chat"
    return first if len(first) <= THREAD_NAME_LIMIT else first[: THREAD_NAME_LIMIT - 1] + "…"


queued_text = strings.queued


