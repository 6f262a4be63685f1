"""The single worker: the only consumer of the job queue, the only user of
the engine.

Jobs are rows in the store before they are ids on the queue. The worker runs
up to ``engine.max_batch`` of them at once (the engine batches them on the
GPU), never two of one conversation, so the answers in a thread come in the
order asked. Each reply is streamed to its sink, throttled to the sink's
``update_interval``; the finished reply and the job's end are stored in one
transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bot.attachments import files_notice
from bot.engine.base import Engine
from bot.engine.detok import StopFilter
from bot.errors import BotError, GenerationError
from bot.metrics import Metrics
from bot.prompt import TRUNCATION_NOTICE, PromptBuilder
from bot.store import PENDING, FinishReason, Job, JobState, Store
from bot.types import ButtonSink, QuietSink, ReplyInfo, ReplySink, Settings, Turn

log = logging.getLogger(__name__)

SettingsFor = Callable[[Job], Awaitable[Settings]]
#: Told how many tokens a reply used (quotas), even one cut short.
TokensUsed = Callable[[Job, int], Awaitable[None]]

MSG_FAILED = "Sorry, I could not finish that reply: {reason}. Try again in a moment."
MSG_CRASHED = "Sorry, something went wrong while answering. It has been logged; try again."
MSG_STOPPED = "Stopped."
MSG_SHUTDOWN = "The bot is restarting; your message will be answered when it is back."
EMPTY_REPLY = "(The model gave an empty reply.)"


class _Shutdown(Exception):
    """Cancellation reason: the process is stopping, the job stays queued."""


@dataclass
class ReplyStats:
    """Recent replies, for /xwin status."""

    recent: collections.deque[tuple[int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=20)
    )

    def add(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.recent.append((tokens, seconds))

    def tokens_per_s(self) -> float:
        tokens = sum(t for t, _ in self.recent)
        seconds = sum(s for _, s in self.recent)
        return tokens / seconds if seconds else 0.0


class Worker:
    #: Seconds a reply cut by shutdown gets to tell its user, before it is cut off.
    last_words = 2.0

    def __init__(self, store: Store, engine: Engine, builder: PromptBuilder,
                 settings_for: SettingsFor, *, retries: int = 2, retry_delay: float = 2.0,
                 metrics: Metrics | None = None, tokens_used: TokensUsed | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.tokens_used = tokens_used
        self.retries = retries
        self.retry_delay = retry_delay
        self.store = store
        self.engine = engine
        self.builder = builder
        self.settings_for = settings_for
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.stats = ReplyStats()
        self._sinks: dict[int, ReplySink] = {}
        self._positions: dict[int, int] = {}  # last queue position told to each sink
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._busy: dict[int, int] = {}  # conversation id -> running job id
        self._deferred: dict[int, collections.deque[int]] = collections.defaultdict(collections.deque)
        self._slots = asyncio.Semaphore(max(1, engine.max_batch))
        self._loop_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        # Job ends the store refused to write (issue 9): written at the next chance.
        self._unrecorded: dict[int, tuple[JobState, str | None]] = {}

    # -- life cycle ------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="worker")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; give running replies ``grace`` seconds, then
        cancel them and leave their jobs queued for the next start. Bounded
        (issue 9): a platform that does not answer the cancelled replies' last
        words gets ``last_words`` seconds more, then they are cut off too."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        running = list(self._tasks.values())
        if running:
            _done, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel(msg="shutdown")
            stuck = (await asyncio.wait(late, timeout=self.last_words))[1] if late else set()
            if stuck:
                log.warning("%d replies could not say goodbye within %.1f s; cut off, left queued",
                            len(stuck), self.last_words)
                for task in stuck:
                    task.cancel(msg="shutdown")
                await asyncio.wait(stuck, timeout=self.last_words)
        await self._record_late()

    def submit(self, job_id: int, sink: ReplySink, position: int | None = None) -> None:
        self._track(sink, job_id)
        self._sinks[job_id] = sink
        if position is not None:
            self._positions[job_id] = position
        self._idle.clear()
        self.metrics.job_queued(job_id)
        self.queue.put_nowait(job_id)

    def _track(self, sink: ReplySink, job_id: int) -> None:
        """A sink with an ``on_placed`` attribute says which platform messages
        show the reply; they are kept with the job (its ``reply_ref["messages"]``)
        so that the sink factory resumes into them after a restart (issue 9).
        Done here, where every job passes, whoever queued it."""
        if not hasattr(sink, "on_placed"):
            return

        async def placed(message_ids: list[str]) -> None:
            await self.store.set_reply_messages(job_id, message_ids)

        sink.on_placed = placed  # type: ignore[attr-defined]

    async def drain(self) -> None:
        """Wait until every submitted job has finished."""
        while not self._idle.is_set():
            await self._idle.wait()

    def holds(self, job_id: int) -> bool:
        """Whether this worker already has the job (queued, waiting or running)."""
        return job_id in self._sinks or job_id in self._tasks

    def running(self) -> int:
        return len(self._tasks)

    def waiting(self) -> int:
        """Jobs held but not running yet (the queue depth)."""
        return len(self._sinks.keys() - self._tasks.keys())

    # -- cancel ----------------------------------------------------------
    async def cancel(self, job: Job) -> bool:
        """Cancel a queued or running job. True if there was one to cancel."""
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel(msg="user")
            return True
        if not await self.store.set_job_state(job.id, "cancelled", "cancelled by the user"):
            return False
        self.metrics.job_ended(job.id, "cancelled")
        sink = self._sinks.pop(job.id, None)
        if sink is not None:
            await _safe(sink.fail(MSG_STOPPED))
        self._check_idle()
        return True

    # -- the loop --------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            job_id = await self.queue.get()
            try:
                started = await self._dispatch(job_id)
            except Exception:
                log.exception("could not start job %d", job_id)
                started = False
            if not started:
                self._slots.release()
                self._check_idle()

    async def _dispatch(self, job_id: int) -> bool:
        await self._record_late()
        job = await self.store.job(job_id)
        if job is None or job.state not in PENDING or job_id in self._tasks:
            self._sinks.pop(job_id, None)
            return False
        if job.conversation_id in self._busy:
            self._deferred[job.conversation_id].append(job_id)
            return False
        self._busy[job.conversation_id] = job.id
        task = asyncio.create_task(self._serve(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(functools.partial(self._finished, job))
        await self._announce_positions()
        return True

    def _finished(self, job: Job, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job.id, None)
        self._sinks.pop(job.id, None)
        self._positions.pop(job.id, None)
        self._busy.pop(job.conversation_id, None)
        waiting = self._deferred.get(job.conversation_id)
        if waiting:
            self.queue.put_nowait(waiting.popleft())
            if not waiting:
                del self._deferred[job.conversation_id]
        self._slots.release()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._tasks and self.queue.empty() and not self._deferred and not self._sinks:
            self._idle.set()

    async def _announce_positions(self) -> None:
        """Tell the waiting sinks how far they have moved up."""
        for job_id, sink in list(self._sinks.items())[:50]:
            if job_id in self._tasks:
                continue
            ahead = await self.store.jobs_ahead(job_id)
            if self._positions.get(job_id) != ahead:
                self._positions[job_id] = ahead
                await _safe(sink.queued(ahead))

    # -- one reply -------------------------------------------------------
    async def _serve(self, job: Job) -> None:
        sink = self._sinks.get(job.id) or _LogSink(job.id)
        reply = _Reply(sink)
        try:
            await self.store.set_job_state(job.id, "running")
            self.metrics.job_started(job.id)
            await _safe(sink.started())
            text = await self._generate_with_retries(job, reply)
            reply_id = await self.store.add_assistant_message(job, text, _reply_id(job), reply.finish_reason)
            if isinstance(sink, ButtonSink):
                await _safe(sink.reply_stored(ReplyInfo(reply_id, reply.finish_reason == "length")))
        except asyncio.CancelledError:
            # stop() sets _stopping before it cancels; any other cancel is the user's.
            self.metrics.job_ended(job.id, "requeued" if self._stopping else "cancelled")
            await self._cancelled(job, sink, reply, shutdown=self._stopping)
            return
        except GenerationError as exc:
            log.warning("job %d failed: %s", job.id, exc, exc_info=bool(exc.detail))
            self.metrics.job_ended(job.id, "failed")
            self.metrics.error("generation")
            await self._record(job.id, "failed", str(exc))
            await _safe(sink.fail(MSG_FAILED.format(reason=exc.user_message.rstrip("."))))
            return
        except Exception as exc:
            log.exception("job %d crashed", job.id)
            self.metrics.job_ended(job.id, "crashed")
            self.metrics.error("crash")
            await self._record(job.id, "failed", f"{type(exc).__name__}: {exc}")
            await _safe(sink.fail(MSG_CRASHED))
            return
        await self._deliver(job, sink, text, reply.before)

    async def _deliver(self, job: Job, sink: ReplySink, text: str, before: str | None) -> None:
        """The reply is stored; a sink raises when, retries and all, it could
        not show it. Then the job is not done: the reply is taken back (a
        continued reply gets its text ``before`` again)."""
        try:
            await sink.finish(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("job %d: the reply could not be delivered (%s); marked failed", job.id, exc)
            self.metrics.job_ended(job.id, "failed")
            self.metrics.error("delivery")
            try:
                await self.store.take_back_reply(job, _reply_id(job), f"not delivered: {exc}", before)
            except Exception:
                log.exception("job %d: could not record that its reply was not delivered", job.id)
        else:
            self.metrics.job_ended(job.id, "done")

    async def _record(self, job_id: int, state: JobState, error: str | None = None) -> None:
        """Store a job's end; if the store fails too, remember it and try again
        before the next job and at shutdown, so a restart does not answer again."""
        try:
            await self.store.set_job_state(job_id, state, error)
        except Exception:
            log.exception("job %d: could not store its state %r; will try again", job_id, state)
            self._unrecorded[job_id] = (state, error)

    async def _record_late(self) -> None:
        for job_id, (state, error) in list(self._unrecorded.items()):
            try:
                await self.store.set_job_state(job_id, state, error)
            except Exception as exc:
                log.warning("job %d: its state %r is still not stored: %s", job_id, state, exc)
                return
            del self._unrecorded[job_id]
            log.info("job %d: state %r stored late", job_id, state)

    async def _cancelled(self, job: Job, sink: ReplySink, reply: _Reply, *, shutdown: bool) -> None:
        if shutdown:
            # Leave it queued: the next start answers it.
            await self._record(job.id, "queued")
            await _safe(sink.fail(MSG_SHUTDOWN))
            return
        await self._record(job.id, "cancelled", "cancelled by the user")
        if reply.text.strip():
            await _safe(sink.finish(f"{reply.text.rstrip()}\n\n({MSG_STOPPED.lower().rstrip('.')})"))
        else:
            await _safe(sink.fail(MSG_STOPPED))

    async def _generate_with_retries(self, job: Job, reply: _Reply) -> str:
        for attempt in range(self.retries + 1):
            try:
                return await self._generate(job, reply)
            except GenerationError as exc:
                if not exc.retryable or attempt == self.retries:
                    raise
                delay = self.retry_delay * 2**attempt
                self.metrics.error("retry")
                log.warning("job %d: %s; trying again in %.1f s", job.id, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _generate(self, job: Job, reply: _Reply) -> str:
        reply.text = ""  # a retry starts the reply over
        settings = await self.settings_for(job)
        turns = await self.store.history(job)
        if job.kind == "continue":
            # The prompt ends with the unfinished reply; the new text is appended to it.
            reply.text = reply.before = await self._target_text(job)
            turns.append(Turn("assistant", reply.text))
        else:
            notice = files_notice(turns[-1].attachments) if turns else ""
            reply.text = f"{notice}\n\n" if notice else ""  # files cut or skipped
        prompt = self.builder.build(turns, settings, is_dm=job.is_dm, open_reply=job.kind == "continue")
        if prompt.truncated:
            reply.text += TRUNCATION_NOTICE
        stops = StopFilter(self.builder.stops)
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        generated: list[str] = []
        stream = self.engine.stream(prompt.ids, settings, turns=turns, is_dm=job.is_dm)
        try:
            async for piece in stream:
                tokens += 1
                first = first if first is not None else time.perf_counter() - started
                generated.append(piece)
                await reply.add(stops.push(piece))
                if stops.stopped:
                    break
            await reply.add(stops.flush())
        finally:
            await stream.aclose()
            elapsed = time.perf_counter() - started
            await self._count_tokens(job, tokens)
        self.stats.add(tokens, elapsed)
        reply.finish_reason = "stop" if stops.stopped else self._finish_reason("".join(generated), settings)
        self.metrics.reply_streamed(tokens, first, elapsed, cut=reply.finish_reason == "length")
        return reply.text.strip() or EMPTY_REPLY

    async def _count_tokens(self, job: Job, tokens: int) -> None:
        """Quotas count every token generated, a reply cut short or failed included."""
        if self.tokens_used is None or not tokens:
            return
        try:
            await self.tokens_used(job, tokens)
        except Exception:
            log.exception("job %d: could not count its %d tokens", job.id, tokens)

    async def _target_text(self, job: Job) -> str:
        target = await self.store.reply(job.target) if job.target is not None else None
        if target is None or target.replaced:
            raise GenerationError("that reply is no longer there to continue")
        return target.text

    def _finish_reason(self, generated: str, settings: Settings) -> FinishReason:
        """``length`` when the text used up max_new_tokens. Engines stream text,
        not ids: re-encoding it may count a token or two fewer than the model made."""
        slack = min(2, settings.max_new_tokens // 8)
        used = len(self.builder.tokenizer.encode_text(generated))
        return "length" if used >= settings.max_new_tokens - slack else "stop"


class _Reply:
    """The reply so far, with updates throttled to the sink's interval."""

    def __init__(self, sink: ReplySink) -> None:
        self.sink = sink
        self.text = ""
        self.finish_reason: FinishReason = "stop"
        #: For a ``continue`` job: the reply's text before it, to restore if not delivered.
        self.before: str | None = None
        self._last = 0.0

    async def add(self, piece: str) -> None:
        if not piece:
            return
        if not self.text.strip():
            piece = piece.lstrip()  # no leading blank at the start of a reply
        self.text += piece
        now = time.monotonic()
        if self.text.strip() and now - self._last >= self.sink.update_interval:
            self._last = now
            await _safe(self.sink.update(self.text))


class _LogSink(QuietSink):
    """For a job whose asker is gone: the reply is stored and logged."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id

    async def finish(self, text: str) -> None:
        log.info("job %d answered with no one to send it to (%d chars stored)", self.job_id, len(text))

    async def fail(self, user_message: str) -> None:
        log.info("job %d: %s", self.job_id, user_message)


def _reply_id(job: Job) -> str:
    """The stored reply's message id: one per job."""
    return f"job:{job.id}"


async def _safe(call: Awaitable[None]) -> None:
    """A sink that fails (a platform error) must not take the worker down."""
    try:
        await call
    except asyncio.CancelledError:
        raise
    except BotError as exc:
        log.warning("reply sink failed: %s", exc)
    except Exception:
        log.exception("reply sink failed")
