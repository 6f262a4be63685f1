"""The bot's core: what adapters call (it implements :class:`bot.adapter.Core`).

:class:`Bot` ties the store, the worker and the commands together. Adapters
hand it normalized :class:`~bot.types.Incoming` messages and a
:class:`~bot.types.ReplySink`; see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from bot.actions import STOPPED, ActionSink, ReplyActions, Vote  # STOPPED: one sentence for both
from bot.attachments import FileFetcher, FileReader
from bot.commands import Commands, settings_scope
from bot.config import Config, settings_from_generation
from bot.engine.base import Engine
from bot.metrics import Metrics
from bot.prompt import PromptBuilder
from bot.quota import Quotas
from bot.retention import Retention
from bot.settings import apply_overrides
from bot.store import Job, Store
from bot.types import (
    CommandContext,
    CommandReply,
    ConversationKey,
    HandleResult,
    Incoming,
    Platform,
    ReplyAction,
    ReplySink,
    Settings,
    SinkFactory,
)
from bot.worker import Worker

log = logging.getLogger(__name__)

EMPTY_HELP = "Ask me something after the mention, or type `/xwin` to see my commands."
BUSY = "I'm busy right now ({why}); try again in a moment."


class Bot:
    """Use as ``async with Bot(config, store, engine) as bot:`` (loads the model).

    ``metrics`` (made here when not given) is where the core counts what it
    does; bot.health serves it."""

    def __init__(self, config: Config, store: Store, engine: Engine, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.quotas = Quotas(store, config.limits)
        self.defaults: Settings = settings_from_generation(config.generation)
        self._factories: dict[str, SinkFactory] = {}
        self._worker: Worker | None = None
        self._closing = False
        self._retention: Retention | None = None
        # Jobs an earlier process left pending, noted before any new message.
        self._left_pending: list[int] = []
        # The limits check and the insert it allows are one step (issue 9): without
        # this, concurrent messages all pass the check before any of them is stored.
        self._admission = asyncio.Lock()
        self.commands = Commands(store, self.defaults, engine.context_length, self._stop_here, self.status)
        self.files = FileReader(config.attachments, engine)
        self.actions = ReplyActions(store, config.bot, lambda: self.worker, lambda: self._closing,
                                    self._refusal, self._admission)

    async def __aenter__(self) -> Bot:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("Bot.start() was not called")
        return self._worker

    async def start(self) -> None:
        """Load the model and start the worker (jobs from before a restart
        are resumed by :meth:`resume_pending`, once the adapters are up)."""
        self._left_pending = [job.id for job in await self.store.pending_jobs()]
        await self.engine.start()
        # An engine may shrink its context to what its KV cache holds.
        self.commands.context_length = self.engine.context_length
        if self.config.bot.retention_days:
            self._retention = Retention(self.store, self.config.bot.retention_days,
                                        self.config.bot.retention_interval)
            await self._retention.purge_now()
            self._retention.start()
        builder = PromptBuilder(
            self.engine.tokenizer, fmt=self.engine.prompt_format, context_length=self.engine.context_length,
            max_message_chars=self.config.bot.max_message_chars,
        )
        self._worker = Worker(self.store, self.engine, builder, self._settings_for_job,
                              retries=self.config.bot.retries, retry_delay=self.config.bot.retry_delay,
                              metrics=self.metrics, tokens_used=self._tokens_used)
        self.metrics.watch_worker(self._worker.waiting, self._worker.running, self.engine.max_batch)
        self._worker.start()
        self.metrics.model_loaded.set(1)

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking messages, let running replies end or cancel them
        (their jobs stay queued), unload the model. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        self.metrics.model_loaded.set(0)
        if self._retention is not None:
            await self._retention.stop()
        if self._worker is not None:
            await self._worker.stop(grace)
        await self.engine.close()

    def register_platform(self, platform: Platform, sink_factory: SinkFactory) -> None:
        self._factories[platform] = sink_factory

    async def resume_pending(self) -> int:
        """Queue again the jobs left queued or running by an earlier process,
        for the platforms that are registered. Returns how many. Jobs of this
        process (messages that came while the adapters started) are left alone."""
        resumed = 0
        for job_id in self._left_pending:
            job = await self.store.job(job_id)
            if job is None or job.state not in ("queued", "running") or self.worker.holds(job_id):
                continue
            factory = self._factories.get(job.key.platform)
            if factory is None:
                continue
            if job.state == "running":
                await self.store.set_job_state(job.id, "queued")
            sink = factory(job.key, job.reply_ref)
            self.worker.submit(job.id, sink)
            resumed += 1
        self._left_pending = [j for j in self._left_pending if not self.worker.holds(j)]
        if resumed:
            log.info("resumed %d pending jobs from before the restart", resumed)
        return resumed

    async def not_ready(self) -> str | None:
        """For /readyz: None once the model is loaded and replies can be made."""
        if self._closing:
            return "shutting down"
        if self._worker is None:
            return "the model is loading"
        return None

    # -- messages --------------------------------------------------------
    async def handle(
        self, incoming: Incoming, sink: ReplySink, fetcher: FileFetcher | None = None
    ) -> HandleResult:
        """``fetcher`` downloads ``incoming.files`` (only once the quotas let the message in)."""
        result = await self._handle(incoming, sink, fetcher)
        self.metrics.message_handled(result)
        return result

    async def _handle(self, incoming: Incoming, sink: ReplySink, fetcher: FileFetcher | None) -> HandleResult:
        if self._closing:
            await sink.fail(STOPPED)
            return "stopped"
        if not incoming.text.strip() and not incoming.files:
            await sink.fail(EMPTY_HELP)
            return "empty"
        scope = settings_scope(incoming.key, incoming.author_id, incoming.is_dm)
        # Files are downloaded only for a message the limits would let in, and
        # outside the admission lock (a download must not hold up everyone).
        # Refused then, it stays refused: never admitted without its files.
        early = await self._refusal(incoming.key.platform, incoming.author_id)
        attachments = await self.files.read(incoming.files, fetcher) if early is None else ()
        # The limits checked, the message stored with its job and counted, as one step.
        async with self._admission:
            refusal = early or await self._refusal(incoming.key.platform, incoming.author_id)
            stored = await self.store.add_user_message(incoming, settings_scope=scope, with_job=not refusal,
                                                       attachments=() if refusal else attachments)
            if stored is not None and stored[1] is not None:
                await self.quotas.count_message(incoming.key.platform, incoming.author_id)
        if stored is None:
            log.info("ignoring re-delivered message %s", incoming.message_id)
            return "duplicate"
        _message_id, job_id = stored
        if refusal is not None:
            result, text = refusal
            await sink.fail(text)
            return result
        if job_id is None:
            raise RuntimeError("the store gave no job for an admitted message")
        position = await self.store.jobs_ahead(job_id)
        self.worker.submit(job_id, sink, position)
        await sink.queued(position)
        return "queued"

    async def _refusal(self, platform: Platform, author_id: str) -> tuple[HandleResult, str] | None:
        """Why a message of this author gets no job now: over a quota (issue 12;
        the message is kept) or the queue bounds; None when it is let in."""
        over = await self.quotas.refusal(platform, author_id)
        if over is not None:
            return "limited", over
        busy = await self._busy_reason(author_id)
        return None if busy is None else ("busy", BUSY.format(why=busy))

    async def _busy_reason(self, author_id: str) -> str | None:
        limits = self.config.bot
        if await self.store.count_pending() >= limits.max_queue:
            return f"{limits.max_queue} messages are waiting"
        if await self.store.count_pending(author_id) >= limits.max_pending_per_user:
            return f"you already have {limits.max_pending_per_user} messages waiting"
        return None

    async def cancel_message(self, key: ConversationKey, platform_message_id: str) -> bool:
        """The asking message was deleted: cancel its job if it has not ended."""
        job = await self.store.job_for_message(key, platform_message_id)
        if job is None or job.state not in ("queued", "running"):
            return False
        return await self.worker.cancel(job)

    async def knows_conversation(self, key: ConversationKey) -> bool:
        return await self.store.has_conversation(key)

    async def drain(self) -> None:
        """Wait until every queued job has been answered."""
        await self.worker.drain()

    # -- buttons under replies (bot/actions.py) ----------------------------
    async def continue_reply(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply:
        """Continue a reply cut at max_new_tokens, appended to the same reply."""
        return await self.actions.continue_reply(action, make_sink)

    async def continue_last(self, key: ConversationKey, user_id: str, is_admin: bool,
                            make_sink: ActionSink) -> CommandReply:
        """``/xwin continue``: Continue on the newest reply of the conversation."""
        return await self.actions.continue_last(key, user_id, is_admin, make_sink)

    async def last_reply_id(self, key: ConversationKey) -> int | None:
        """The newest reply of the conversation (what ``continue_last`` would go on with)."""
        return await self.store.last_reply_id(key)

    async def regenerate(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply:
        """Answer the last question again; the old reply leaves the history."""
        return await self.actions.regenerate(action, make_sink)

    async def feedback(self, action: ReplyAction, vote: Vote) -> CommandReply:
        """Thumbs up or down, once per user and reply."""
        return await self.actions.feedback(action, vote)

    # -- commands --------------------------------------------------------
    async def command(self, ctx: CommandContext, text: str) -> CommandReply:
        return await self.commands.run(ctx, text)

    async def set_settings(self, ctx: CommandContext, values: Mapping[str, Any]) -> CommandReply:
        """``/xwin set`` from typed options: values, never parsed as command text."""
        return await self.commands.set_values(ctx, values)

    async def _stop_here(self, key: ConversationKey, author_id: str | None) -> int:
        stopped = 0
        for job in await self.store.jobs_in(key):
            if author_id is None or job.author_id == author_id:
                stopped += await self.worker.cancel(job)
        return stopped

    async def status(self) -> str:
        info = self.engine.describe()
        worker = self.worker
        queued = await self.store.count_pending() - worker.running()
        lines = [f"{k}: {v}" for k, v in info.items()]
        lines.append(f"replies running: {worker.running()}, queued: {max(0, queued)}")
        rate = worker.stats.tokens_per_s()
        lines.append(f"speed of the last replies: {rate:.1f} tokens/s" if rate else "no replies yet")
        return "\n".join(lines)

    async def _tokens_used(self, job: Job, tokens: int) -> None:
        await self.quotas.count_tokens(job.key.platform, job.author_id, tokens)

    async def _settings_for_job(self, job: Job) -> Settings:
        return apply_overrides(self.defaults, await self.store.settings(job.settings_scope))
