"""Buttons under a finished reply: Continue, Regenerate and feedback (issue 11).

Adapters read the reply's row id from the button's own id (no in-memory state,
so buttons keep working after a restart) and call :class:`ReplyActions`
through :class:`bot.app.Bot`. Every refusal is one sentence for the person who
pressed; nothing internal reaches them.

- **Continue**: a reply cut at ``max_new_tokens`` goes on from its last
  character; the continuation is appended to the same stored reply.
- **Regenerate**: the question is answered again; the old reply stays in the
  store, marked replaced, and leaves the prompt history.
- **Feedback**: one vote per user and reply; the same click twice counts once.

Continue and Regenerate are for the last reply of a conversation, at most
``[bot] reply_buttons_max_age_hours`` old, pressed by the asker or an admin,
and one job at a time per conversation. The asker's quotas and the queue
bounds are those of a new message (``Bot``'s own check, under its admission
lock); the asker is the one whose tokens the job counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bot.config import BotConfig
from bot.store import JobKind, Store, StoredReply
from bot.types import ActionSink, CommandReply, ConversationKey, HandleResult, Platform, ReplyAction, Vote
from bot.worker import Worker

log = logging.getLogger(__name__)

__all__ = ["ActionSink", "ReplyActions", "Vote"]  # the first and last live in bot.types (adapters use them)

GONE = "I can't find that reply here any more."
NOTHING_YET = "There is no reply here to continue yet."
TOO_OLD = "That reply is too old for its buttons; ask again instead."
NOT_LAST = "Only the last reply of a conversation can be {what}."
NOT_YOURS = "Only the person who asked (or an admin) can {what} this reply."
COMPLETE = "That reply is complete: there is nothing to continue."
BUSY_HERE = "A reply is already being written here; wait for it to finish."
STOPPED = "The bot is shutting down; try again in a minute."
THANKS = {"new": "Thanks for the feedback.", "same": "Your feedback was already recorded.",
          "changed": "Your feedback was changed."}
_VERB: dict[JobKind, str] = {"continue": "continued", "regenerate": "regenerated", "reply": "answered"}
#: Why an author gets no job now (quotas, queue bounds), with what to tell them; None lets them in.
Refusal = Callable[[Platform, str], Awaitable[tuple[HandleResult, str] | None]]


class ReplyActions:
    def __init__(self, store: Store, config: BotConfig, worker: Callable[[], Worker],
                 closing: Callable[[], bool], limits: Refusal, lock: asyncio.Lock) -> None:
        self.store = store
        self.config = config
        self._worker = worker
        self._closing = closing
        self._limits = limits
        # Check-then-queue is one step (the lock new messages are admitted under):
        # a double click queues one job, and the queue bounds hold for both.
        self._lock = lock

    async def continue_reply(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply:
        return await self._queue(action, "continue", make_sink)

    async def regenerate(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply:
        return await self._queue(action, "regenerate", make_sink)

    async def continue_last(self, key: ConversationKey, user_id: str, is_admin: bool,
                            make_sink: ActionSink) -> CommandReply:
        """``/xwin continue``: Continue on the newest reply of the conversation."""
        reply_id = await self.store.last_reply_id(key)
        if reply_id is None:
            return CommandReply(NOTHING_YET, ok=False)
        return await self._queue(ReplyAction(key, reply_id, user_id, is_admin), "continue", make_sink)

    async def feedback(self, action: ReplyAction, vote: Vote) -> CommandReply:
        reply = await self._reply(action)
        if reply is None:
            return CommandReply(GONE, ok=False)
        outcome = await self.store.set_feedback(reply.id, action.user_id, 1 if vote == "up" else -1)
        log.info("feedback %s on reply %d by %s (%s)", vote, reply.id, action.user_id, outcome)
        return CommandReply(THANKS[outcome])

    async def _reply(self, action: ReplyAction) -> StoredReply | None:
        reply = await self.store.reply(action.reply_id)
        # The id comes from a button: it must name a reply of the place it was pressed in.
        return reply if reply is not None and reply.key == action.key else None

    async def _queue(self, action: ReplyAction, kind: JobKind, make_sink: ActionSink) -> CommandReply:
        if self._closing():
            return CommandReply(STOPPED, ok=False)
        async with self._lock:
            reply = await self._reply(action)
            refusal = GONE if reply is None else await self._refusal(reply, action, kind)
            if refusal is not None or reply is None:
                return CommandReply(refusal or GONE, ok=False)
            sink, reply_ref = make_sink(reply.text)
            job_id = await self.store.add_reply_job(reply, kind, reply_ref)
            if job_id is None:
                return CommandReply(GONE, ok=False)
            position = await self.store.jobs_ahead(job_id)
            self._worker().submit(job_id, sink, position)
        await sink.queued(position)
        log.info("%s of reply %d queued as job %d by %s", kind, reply.id, job_id, action.user_id)
        return CommandReply("Continuing…" if kind == "continue" else "Writing a new reply…")

    async def _refusal(self, reply: StoredReply, action: ReplyAction, kind: JobKind) -> str | None:
        what = _VERB[kind]
        if time.time() - reply.created_at > self.config.reply_buttons_max_age_hours * 3600:
            return TOO_OLD
        if action.user_id != reply.asker_id and not action.is_admin:
            return NOT_YOURS.format(what=kind)
        if kind == "continue" and reply.finish_reason != "length":
            return COMPLETE
        if await self.store.jobs_in(reply.key):
            return BUSY_HERE
        if not reply.is_last:
            return NOT_LAST.format(what=what)
        refusal = await self._limits(reply.key.platform, reply.asker_id)
        return None if refusal is None else refusal[1]
