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

from bot.engine.base import Engine
from bot.engine.detok import StopFilter
from bot.errors import BotError, GenerationError
from bot.prompt import TRUNCATION_NOTICE, PromptBuilder
from bot.store import PENDING, FinishReason, Job, Store
from bot.types import ButtonSink, ReplyInfo, ReplySink, Settings, Turn

log = logging.getLogger(__name__)

SettingsFor = Callable[[Job], Awaitable[Settings]]

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
    def __init__(self, store: Store, engine: Engine, builder: PromptBuilder,
                 settings_for: SettingsFor, *, retries: int = 2, retry_delay: float = 2.0) -> None:
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

    # -- life cycle ------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="worker")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking work; give running replies ``grace`` seconds, then
        cancel them and leave their jobs queued for the next start."""
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
            await asyncio.gather(*late, return_exceptions=True)

    def submit(self, job_id: int, sink: ReplySink, position: int | None = None) -> None:
        self._sinks[job_id] = sink
        if position is not None:
            self._positions[job_id] = position
        self._idle.clear()
        self.queue.put_nowait(job_id)

    async def drain(self) -> None:
        """Wait until every submitted job has finished."""
        while not self._idle.is_set():
            await self._idle.wait()

    def holds(self, job_id: int) -> bool:
        """Whether this worker already has the job (queued, waiting or running)."""
        return job_id in self._sinks or job_id in self._tasks

    def running(self) -> int:
        return len(self._tasks)

    # -- cancel ----------------------------------------------------------
    async def cancel(self, job: Job) -> bool:
        """Cancel a queued or running job. True if there was one to cancel."""
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel(msg="user")
            return True
        if not await self.store.set_job_state(job.id, "cancelled", "cancelled by the user"):
            return False
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
            await _safe(sink.started())
            text = await self._generate_with_retries(job, reply)
            reply_id = await self.store.add_assistant_message(job, text, f"job:{job.id}", reply.finish_reason)
            if isinstance(sink, ButtonSink):
                await _safe(sink.reply_stored(ReplyInfo(reply_id, reply.finish_reason == "length")))
            await _safe(sink.finish(text))
        except asyncio.CancelledError:
            # stop() sets _stopping before it cancels; any other cancel is the user's.
            await self._cancelled(job, sink, reply, shutdown=self._stopping)
        except GenerationError as exc:
            log.warning("job %d failed: %s", job.id, exc)
            await self.store.set_job_state(job.id, "failed", str(exc))
            await _safe(sink.fail(MSG_FAILED.format(reason=str(exc).rstrip("."))))
        except Exception as exc:
            log.exception("job %d crashed", job.id)
            await self.store.set_job_state(job.id, "failed", f"{type(exc).__name__}: {exc}")
            await _safe(sink.fail(MSG_CRASHED))

    async def _cancelled(self, job: Job, sink: ReplySink, reply: _Reply, *, shutdown: bool) -> None:
        if shutdown:
            # Leave it queued: the next start answers it.
            await self.store.set_job_state(job.id, "queued")
            await _safe(sink.fail(MSG_SHUTDOWN))
            return
        await self.store.set_job_state(job.id, "cancelled", "cancelled by the user")
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
                log.warning("job %d: %s; trying again in %.1f s", job.id, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _generate(self, job: Job, reply: _Reply) -> str:
        reply.text = ""  # a retry starts the reply over
        settings = await self.settings_for(job)
        turns = await self.store.history(job)
        if job.kind == "continue":
            # The prompt ends with the unfinished reply; the new text is appended to it.
            reply.text = await self._target_text(job)
            turns.append(Turn("assistant", reply.text))
        prompt = self.builder.build(turns, settings, is_dm=job.is_dm, open_reply=job.kind == "continue")
        if prompt.truncated:
            reply.text = TRUNCATION_NOTICE
        stops = StopFilter(self.builder.stops)
        started = time.perf_counter()
        tokens = 0
        generated: list[str] = []
        stream = self.engine.stream(prompt.ids, settings, turns=turns, is_dm=job.is_dm)
        try:
            async for piece in stream:
                tokens += 1
                generated.append(piece)
                await reply.add(stops.push(piece))
                if stops.stopped:
                    break
            await reply.add(stops.flush())
        finally:
            await stream.aclose()
        self.stats.add(tokens, time.perf_counter() - started)
        reply.finish_reason = "stop" if stops.stopped else self._finish_reason("".join(generated), settings)
        return reply.text.strip() or EMPTY_REPLY

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


class _LogSink:
    """For a job whose asker is gone: the reply is stored and logged."""

    update_interval = 1.0

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id

    async def queued(self, position: int) -> None:
        return None

    async def started(self) -> None:
        return None

    async def update(self, text_so_far: str) -> None:
        return None

    async def finish(self, text: str) -> None:
        log.info("job %d answered with no one to send it to (%d chars stored)", self.job_id, len(text))

    async def fail(self, user_message: str) -> None:
        log.info("job %d: %s", self.job_id, user_message)


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
