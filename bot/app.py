"""The bot's core: what adapters call.

:class:`Bot` ties the store, the worker and the commands together. Adapters
hand it normalized :class:`~bot.types.Incoming` messages and a
:class:`~bot.types.ReplySink`; see docs/architecture.md.
"""

from __future__ import annotations

import logging
from typing import Literal

from bot.commands import Commands, settings_scope
from bot.config import Config, settings_from_generation
from bot.engine.base import Engine
from bot.prompt import PromptBuilder
from bot.retention import Retention
from bot.settings import apply_overrides
from bot.store import Job, Store
from bot.types import (
    CommandContext,
    CommandReply,
    ConversationKey,
    Incoming,
    Platform,
    ReplySink,
    Settings,
    SinkFactory,
)
from bot.worker import Worker

log = logging.getLogger(__name__)

HandleResult = Literal["queued", "duplicate", "busy", "empty", "stopped"]

EMPTY_HELP = "Ask me something after the mention, or type `/xwin` to see my commands."
BUSY = "I'm busy right now ({why}); try again in a moment."
STOPPED = "The bot is shutting down; try again in a minute."


class Bot:
    """Use as ``async with Bot(config, store, engine) as bot:`` (loads the model)."""

    def __init__(self, config: Config, store: Store, engine: Engine) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.defaults: Settings = settings_from_generation(config.generation)
        self._factories: dict[str, SinkFactory] = {}
        self._worker: Worker | None = None
        self._closing = False
        self._retention: Retention | None = None
        # Jobs an earlier process left pending, noted before any new message.
        self._left_pending: list[int] = []
        self.commands = Commands(store, self.defaults, engine.context_length, self._stop_here, self.status)

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
                              retries=self.config.bot.retries, retry_delay=self.config.bot.retry_delay)
        self._worker.start()

    async def close(self, grace: float = 5.0) -> None:
        """Stop taking messages, let running replies end or cancel them
        (their jobs stay queued), unload the model. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
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
            self.worker.submit(job.id, factory(job.key, job.reply_ref))
            resumed += 1
        self._left_pending = [j for j in self._left_pending if not self.worker.holds(j)]
        if resumed:
            log.info("resumed %d pending jobs from before the restart", resumed)
        return resumed

    # -- messages --------------------------------------------------------
    async def handle(self, incoming: Incoming, sink: ReplySink) -> HandleResult:
        if self._closing:
            await sink.fail(STOPPED)
            return "stopped"
        if not incoming.text.strip():
            await sink.fail(EMPTY_HELP)
            return "empty"
        busy = await self._busy_reason(incoming.author_id)
        scope = settings_scope(incoming.key, incoming.author_id, incoming.is_dm)
        stored = await self.store.add_user_message(incoming, settings_scope=scope, with_job=busy is None)
        if stored is None:
            log.info("ignoring re-delivered message %s", incoming.message_id)
            return "duplicate"
        _message_id, job_id = stored
        if busy is not None or job_id is None:
            await sink.fail(BUSY.format(why=busy))
            return "busy"
        position = await self.store.jobs_ahead(job_id)
        self.worker.submit(job_id, sink, position)
        await sink.queued(position)
        return "queued"

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

    # -- commands --------------------------------------------------------
    async def command(self, ctx: CommandContext, text: str) -> CommandReply:
        return await self.commands.run(ctx, text)

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

    async def _settings_for_job(self, job: Job) -> Settings:
        return apply_overrides(self.defaults, await self.store.settings(job.settings_scope))
