"""Data requests, for ``xwin-bot export`` and ``xwin-bot purge`` (issue 12).

A conversation is named on the command line as ``platform:workspace:channel``
(every thread of the channel) or ``platform:workspace:channel:thread``, the
form the ``conversation`` field of every exported record has. What is stored,
and for how long: docs/privacy.md.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, TextIO, get_args

from bot.store import Store
from bot.types import ConversationKey, Platform


def parse_conversation_key(text: str) -> ConversationKey:
    """``discord:GUILD:CHANNEL[:THREAD]`` → a key; ValueError with the reason."""
    parts = text.split(":")
    platforms = get_args(Platform)
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise ValueError(f"{text!r} is not platform:workspace:channel[:thread]")
    if parts[0] not in platforms:
        raise ValueError(f"unknown platform {parts[0]!r} (known: {', '.join(platforms)})")
    return ConversationKey(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else "")  # type: ignore[arg-type]


async def export_jsonl(store: Store, out: TextIO, *, user: str | None = None,
                       conversation: ConversationKey | None = None) -> int:
    """One JSON object a line: every message, job and setting the store holds
    for the user or the conversation. Times are Unix seconds, with an ISO 8601
    UTC copy next to each. Returns how many lines were written."""
    records = await store.export_records(user=user, conversation=conversation)
    for record in records:
        out.write(json.dumps(_with_iso_times(record), ensure_ascii=False) + "\n")
    return len(records)


def _with_iso_times(record: dict[str, Any]) -> dict[str, Any]:
    shown = dict(record)
    for name, value in record.items():
        if name.endswith("_at") and isinstance(value, (int, float)):
            shown[name + "_utc"] = datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat()
    return shown
