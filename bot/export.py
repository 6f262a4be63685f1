"""``xwin-bot export feedback``: the votes, as JSON Lines, for teams that
measure or tune. One line per vote: the reply, who voted and how, when, the
conversation's turns up to that reply, and the settings in force there."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TextIO

from bot.settings import apply_overrides
from bot.store import Store
from bot.types import Settings


async def export_feedback(store: Store, defaults: Settings, out: TextIO) -> int:
    """Write one JSON line per vote to ``out``; returns how many."""
    written = 0
    for reply_id, user_id, value, at in await store.feedback_rows():
        record = await _record(store, defaults, reply_id)
        if record is None:
            continue
        record.update(user=user_id, value="up" if value > 0 else "down", time=at)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += 1
    return written


async def _record(store: Store, defaults: Settings, reply_id: int) -> dict[str, Any] | None:
    reply = await store.reply(reply_id)
    if reply is None:
        return None
    job = await store.question_job(reply)
    turns = await store.history(job) if job is not None else []
    scope = job.settings_scope if job is not None else ""
    settings = apply_overrides(defaults, await store.settings(scope)) if scope else defaults
    return {
        "reply_id": reply.id,
        "conversation": dataclasses.asdict(reply.key),
        "turns": [{"role": t.role, "author": t.author_name, "text": t.text} for t in turns]
        + [{"role": "assistant", "author": "", "text": reply.text}],
        "finish_reason": reply.finish_reason,
        "replaced": reply.replaced,
        "settings": dataclasses.asdict(settings),
    }
