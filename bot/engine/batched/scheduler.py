"""The decode thread: admits requests, steps every live row, streams ids back.

:class:`BatchScheduler` owns the :class:`~bot.engine.batched.core.DecodeCore`
and the :class:`~bot.engine.batched.sampler.Sampler` and is the only thread
that touches them. A :class:`Request` is one reply: it comes in through the
scheduler's inbox (a thread-safe queue) and its token ids go back to its
stream's asyncio queue, on the stream's own event loop (``_post``,
``_deliver``). While rows decode, prompts are prefilled a chunk at a time,
each chunk in one forward with the rows' decode step (``prefill_chunk``,
``mixed``). Finished rows are compacted and
parked for a follow-up (``bot.engine.prefix_cache``); a row whose logits are
not finite fails alone. With ``lookahead`` the next step is queued before the
CPU reads this one's tokens (:meth:`BatchScheduler._step`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bot.engine.base import StreamStats
from bot.engine.batched.core import DecodeCore, Fill
from bot.engine.batched.sampler import Sampler
from bot.engine.prefix_cache import PrefixCache
from bot.errors import GenerationError
from bot.types import Settings

log = logging.getLogger(__package__)  # one logger for the batched engine: "bot.engine.batched"

# What a chat user sees when the model fails mid-reply (details go to the log).
MSG_NON_FINITE = "the model produced invalid numbers (NaN) and this reply was stopped"

# While other rows decode, longer prompts are prefilled this many tokens at a
# time with a decode step between chunks ([model] prefill_chunk; issue 14).
# Full chunks (and tails of 256 or more: products.PROMPT_MIN_TOKENS) go through dequantize + cuBLAS.
PREFILL_CHUNK = 1024


# An idle decode thread waits this long for a request before it looks at
# its settings (``mixed``, ``prefill_chunk``) again.
ADMIT_WAIT_S = 0.5

_Item = list[int] | BaseException | None


@dataclass
class Request:
    ids: list[int]
    settings: Settings
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[_Item]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: int = 0
    position: int = 0  # cache index the next token goes to
    last_token: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    max_gap_s: float = 0.0  # the longest wait between two consecutive tokens
    tokens: list[int] = field(default_factory=list)  # sampled so far
    reused: int = 0  # prompt tokens whose keys and values came from a parked row

    def token_at(self, now: float) -> None:
        """A token of this reply was emitted at ``now``: the first one's time,
        or the wait since the previous one (the longest is kept)."""
        if self.last_token_at:
            self.max_gap_s = max(self.max_gap_s, now - self.last_token_at)
        else:
            self.first_token_at = now
        self.last_token_at = now


@dataclass
class _Launched:
    """A decode step queued on the device and not yet read: its rows, their
    sampled tokens on the device (the next step's input) and the same tokens
    with each row's finite flag, copied to the host once ``ready`` is done."""

    live: list[Request]
    ids: torch.Tensor
    host: torch.Tensor  # [2, n] int64: tokens, finite (0 / 1)
    ready: torch.cuda.Event | None  # None on the CPU: the copy is done already

    def read(self) -> list[tuple[Request, int, bool]]:
        if self.ready is not None:
            self.ready.synchronize()
        toks, finite = self.host.tolist()
        return [(req, tok, bool(ok)) for req, tok, ok in zip(self.live, toks, finite, strict=True)]


def _deliver(batch: list[tuple[Request, _Item]]) -> None:
    for req, item in batch:
        req.out.put_nowait(item)


def _prefill_error(exc: Exception) -> GenerationError:
    return exc if isinstance(exc, GenerationError) else GenerationError.internal(exc, "prefill")


def _post(req: Request, item: _Item) -> None:
    """Hand one item to a request's stream, from the decode thread."""
    batch: list[tuple[Request, _Item]] = [(req, item)]
    req.loop.call_soon_threadsafe(_deliver, batch)


class BatchScheduler:
    """The decode thread: admits requests, steps all live rows, streams ids.

    Chunked prefill (``mixed = False``): while rows are decoding, a prompt
    whose remaining tokens (after any reused prefix) exceed ``prefill_chunk``
    is prefilled ``prefill_chunk`` tokens at a time into its own idle row
    (``_filling``), one chunk per loop turn, each followed by a decode step
    of the live rows: their tokens keep flowing instead of waiting for the
    whole prompt. Only the last chunk's logits are sampled. While a prompt
    is being filled no other prompt is admitted (first come, first served).
    With no row decoding, the rest of a prompt is prefilled at once (nobody
    to wait). Shorter prompts arriving together share that budget: a turn
    stops admitting once ``prefill_chunk`` prompt tokens are prefilled.

    Mixed turns (``mixed``, on by default; :meth:`_packed_turn`) instead: a
    turn is one eager forward (``DecodeCore.forward``) of the live rows'
    decode step and up to ``prefill_chunk`` prompt tokens: the rest of the
    prompt being filled, then waiting prompts in order, packed (the last
    may stop mid-prompt and goes on first next turn). The rows' tokens ride
    on the prompts' read of the weights, and prompts arriving together share
    it (one dequantize of the weights instead of one each).

    Lookahead (``lookahead``, on by default: on the H200, 8 layers, one
    conversation's token took 1.45 ms with it against 1.68 without, the same
    greedy reply; docs/gpu-notes.md items 33 and 35): while nothing waits
    to be admitted and no row can reach its token limit, step N+1 is queued
    with step N's sampled tokens still on the device, before the CPU reads
    them: the CPU's work between steps (reading, streaming, the next step's
    inputs) runs while the GPU computes instead of the GPU idling through
    it. A row that ends at step N (EOS, cancelled, NaN) drops its token of
    step N+1; rows move only after step N+1 is read.

    Idle warm-up (``warm_idle``, on by default): a step runs as the CUDA
    graph of its (batch bucket, context bucket), captured the first time
    it is needed; while nothing decodes and nothing waits, the thread
    captures the ones left (``DecodeCore.warm_next``), one at a time between
    looks at the inbox, so that a burst's steps do not stop for them.
    """

    def __init__(
        self,
        core: DecodeCore,
        eos_ids: Sequence[int],
        on_finish: Callable[[StreamStats], None] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache: bool = True,
        lookahead: bool = True,
        mixed: bool = True,
        warm_idle: bool = True,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be 1 or more, got {prefill_chunk}")
        self.core = core
        self.prefill_chunk = prefill_chunk
        self.sampler = Sampler(core.max_batch, core.vocab, core.device)
        self.eos = set(eos_ids)
        self.on_finish = on_finish
        self.prefix = PrefixCache(core.max_batch, enabled=prefix_cache)  # finished replies' rows, for follow-ups
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._live: list[Request] = []
        # The prompt being prefilled chunk by chunk, and its row (an idle row
        # at or above len(self._live), never parked into while it fills).
        self._filling: Request | None = None
        self._fill_row = 0
        self.prefill_chunks = 0  # chunks that left a prompt unfinished (a decode step came next)
        self.mixed = mixed  # prompts and the decode step in one forward (_packed_turn)
        # While idle, capture the step graphs a burst will need (DecodeCore.warm_next);
        # turned off once every one is captured or a capture fails.
        self.warm_idle = warm_idle
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.steps_ahead = 0  # steps queued before the one before them was read
        self.lookahead = lookahead
        self._ahead: _Launched | None = None  # a step queued and not read yet
        # Each step's tokens and finite flags come back here (page-locked on
        # the GPU, so that the copy is asynchronous); two, as a step is
        # queued while the one before it is read.
        cuda = core.device.type == "cuda"
        self._host = [torch.zeros((2, core.max_batch), dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._ready = [torch.cuda.Event() for _ in range(2)] if cuda else None  # type: ignore[no-untyped-call]
        self._launches = 0
        # Items for the streams and finished rows, held until the rows are
        # retired (_flush): a stream sees its end only once its row is parked.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Request, _Item]]] = {}
        self._done: list[tuple[Request, bool]] = []  # (request, park its row)

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="batched-decode", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: Request) -> None:
        self._inbox.put(req)

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            try:
                if self._ahead is None:  # with a step queued, it is read first
                    if self.mixed:
                        prompts = self._filling is not None or not self._inbox.empty() or not self._live
                        if prompts and self._packed_turn():
                            continue  # the prompts and the live rows' step in one forward
                    elif self._filling is None:
                        self._admit(block=not self._live)
                    else:
                        self._prefill_chunk()
                if self._live:
                    self._step()
            except BaseException as exc:  # fail every live stream, keep serving
                self._fail_all(GenerationError.internal(exc, "decode"))
        closed = GenerationError("engine closed")
        self._fail_all(closed)
        while True:  # requests still waiting for a row would wait forever
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                _post(req, closed)

    def _fail_all(self, err: GenerationError) -> None:
        self._ahead = None
        self._done.clear()
        self._outbox.clear()
        for req in self._live:
            _post(req, err)
        self._live.clear()
        if self._filling is not None:
            _post(self._filling, err)
            self._filling = None

    def _next_request(self, block: bool) -> Request | None:
        """The next request that fits the cache, or None when none waits
        (``block``: for up to ADMIT_WAIT_S, the thread being idle: it first
        captures the step graphs left, one between looks at the inbox);
        cancelled ones are ended and ones too long for a row failed on the way."""
        while True:
            warm = block and self.warm_idle
            try:
                req = self._inbox.get(block=block and not warm, timeout=ADMIT_WAIT_S if block else None)
            except queue.Empty:
                if warm:
                    self._warm_next()
                    continue
                return None
            if req is None:
                return None
            if req.cancelled:
                _post(req, None)
                continue
            try:
                self.core.check_fits(len(req.ids))
            except Exception as exc:
                _post(req, _prefill_error(exc))
                continue
            return req

    def _warm_next(self) -> None:
        """One step graph captured while idle (``DecodeCore.warm_next``): a
        request arriving meanwhile waits for that one capture at most."""
        try:
            self.warm_idle = self.core.warm_next()
        except Exception:
            log.exception("capturing a decode step's graph while idle failed; the rest are captured when needed")
            self.warm_idle = False
        if not self.warm_idle:
            log.info("step graphs captured: %d (%.1f s capturing in all)", len(self.core.graphs()),
                     self.core.capture_s)

    def _admit(self, block: bool) -> None:
        """Take new requests while rows are free, prefilling each (a long
        one only its first chunk: then admitting pauses until it is done).
        While rows decode, one turn stops admitting once ``prefill_chunk``
        prompt tokens are prefilled (each prompt at most a chunk), then the
        next decode step runs."""
        spent = 0
        while self._filling is None and len(self._live) < self.core.max_batch and spent < self.prefill_chunk:
            req = self._next_request(block)
            if req is None:
                return
            block = False
            row = len(self._live)
            try:
                req.reused = req.position = self._claim(row, req)
            except Exception as exc:
                _post(req, _prefill_error(exc))
                continue
            self._filling, self._fill_row = req, row
            if self._live:
                spent += len(req.ids) - req.reused
            self._prefill_chunk()

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of ``_filling`` (all the rest when no row is
        decoding); after the last one, sample its first token and make it live."""
        req, row = self._filling, self._fill_row
        assert req is not None
        if req.cancelled:
            self._filling = None
            _post(req, None)
            return
        n = len(req.ids)
        end = min(n, req.position + self.prefill_chunk) if self._live else n
        try:
            logits = self.core.prefill(row, req.ids[:end], start=req.position)[None]
        except Exception as exc:
            self._filling = None
            _post(req, _prefill_error(exc))
            return
        self._chunk_done(req, row, end, logits)
        self._flush()

    def _packed_turn(self) -> bool:
        """One forward of prompt tokens and the live rows' decode step
        (``DecodeCore.forward``), packed up to ``prefill_chunk`` prompt
        tokens: the rest of the prompt being filled, then new requests in
        order, each from its own idle row (the last one may stop mid-prompt:
        it goes on next turn). With no row decoding the first prompt goes in
        whole. Returns whether there was a prompt to run (else the caller
        steps the live rows alone). Rows that finish are retired only after
        every prompt of the turn has its row, so none is parked over."""
        self._retire_cancelled()
        live = list(self._live)
        first = len(live)  # the turn's prompts take rows first, first + 1, ...
        budget = self.prefill_chunk
        fills: list[tuple[Request, int, int]] = []  # (request, row, end of this chunk)
        req = self._filling
        self._filling = None
        if req is not None and req.cancelled:
            _post(req, None)
            req = None
        if req is not None:
            if self._fill_row != first:  # live rows left while it filled: move it down
                self.prefix.evict(first)
                self.core.move(self._fill_row, first, req.position)
            end = min(len(req.ids), req.position + budget) if live else len(req.ids)
            fills.append((req, first, end))
            budget -= end - req.position
        while budget > 0 and (not fills or fills[-1][2] == len(fills[-1][0].ids)) \
                and first + len(fills) < self.core.max_batch:
            req = self._next_request(block=not live and not fills)
            if req is None:
                break
            row = first + len(fills)
            try:
                req.reused = req.position = self._claim(row, req)
            except Exception as exc:
                _post(req, _prefill_error(exc))
                continue
            end = min(len(req.ids), req.position + budget) if live or fills else len(req.ids)
            fills.append((req, row, end))
            budget -= end - req.position
        if not fills:
            return False
        try:
            out, step = self.core.forward([Fill(row, req.ids[:end], req.position) for req, row, end in fills],
                                          [r.last_token for r in live], [r.position for r in live])
            results = self._sampled(live, step).read() if live else []
        except Exception as exc:  # the live rows fail in _run; these prompts are not live yet
            for req, row, _ in fills:
                self.core.clear(row)
                _post(req, _prefill_error(exc))
            raise
        for (req, row, end), logits in zip(fills, out, strict=True):
            if end < len(req.ids):
                self._filling, self._fill_row = req, row
            self._chunk_done(req, row, end, logits[None])
        if results:
            self._advance(results)
        self._flush()
        return True

    def _chunk_done(self, req: Request, row: int, end: int, logits: torch.Tensor) -> None:
        """A chunk of ``req`` (its tokens up to ``end``) is in ``row``'s cache,
        ``logits [1, vocab]`` after its last token: a failed reply if they
        are not finite; after the last chunk, its first token, and it is live."""
        n = len(req.ids)
        try:
            if end < n:
                self.prefill_chunks += 1
            if not bool(torch.isfinite(logits).all()):
                # zero the row it filled, before any move could leave a NaN copy behind
                self._filling = None
                self._fail_prefill(req, row, end)
                return
            if end < n:
                req.position = end
                return
            self._filling = None
            row = self._settle(row, n)
            self.sampler.admit(row, req.ids)
            tok = self.sampler.sample(logits, [req.settings], row0=row)[0]
        except Exception as exc:
            self._filling = None
            _post(req, _prefill_error(exc))
            return
        req.position = n
        self._live.append(req)
        self._take([(req, tok, True)])

    def _fail_prefill(self, req: Request, row: int, tokens: int) -> None:
        log.error("non-finite logits after %d tokens of a prompt of %d; the reply is failed",
                  tokens, len(req.ids))
        self.core.clear(row)
        _post(req, GenerationError(MSG_NON_FINITE))

    def _settle(self, row: int, length: int) -> int:
        """Move a filled row down to the next live row (live rows may have
        left while it filled): the row the new request decodes in."""
        dest = len(self._live)
        if row != dest:
            self.prefix.evict(dest)
            self.core.move(row, dest, length)
        return dest

    def _claim(self, row: int, req: Request) -> int:
        """Make ``row`` (the next live row) ready for ``req``: the prefix of a
        parked row that ``req.ids`` starts with is moved there (unless it is
        there already); any other parked row there is evicted. The number of
        prompt tokens whose keys and values are in place."""
        hit = self.prefix.lookup(req.ids)
        if hit is not None and hit[0] == row:
            self.prefix.take(row)
        else:
            self.prefix.evict(row)
            if hit is not None:
                self.core.move(hit[0], row, hit[1])
                self.prefix.take(hit[0])
        if hit is not None:
            self.prefix.reused_tokens += hit[1]
            log.debug("prompt of %d tokens: %d reused from a parked row", len(req.ids), hit[1])
        return hit[1] if hit is not None else 0

    def _take(self, results: list[tuple[Request, int, bool]]) -> None:
        """One new token per request (with its logits' finite flag): queued
        for its stream; finished and failed rows are noted for :meth:`_flush`."""
        now = time.perf_counter()
        for req, tok, finite in results:
            if not finite:  # nothing sampled from NaN reaches a reply
                log.error("non-finite logits at position %d (%d rows); the reply is failed",
                          req.position, len(self._live))
                self._out(req, GenerationError(MSG_NON_FINITE))
                self._finished_stats(req)
                self._done.append((req, False))
                continue
            req.token_at(now)
            req.last_token = tok
            req.tokens.append(tok)
            req.generated += 1
            finished = req.cancelled
            if not finished and tok in self.eos:
                finished = True
            else:
                self._out(req, [tok])
                if req.generated >= req.settings.max_new_tokens or req.position >= self.core.scratch:
                    finished = True
            if finished:
                self._out(req, None)
                self._done.append((req, True))
                self._finished_stats(req)

    def _out(self, req: Request, item: _Item) -> None:
        self._outbox.setdefault(req.loop, []).append((req, item))

    def _flush(self) -> None:
        """Retire the rows :meth:`_take` saw finish (a failed one's cache
        zeroed, not parked), then hand the items to their streams."""
        for req, park in self._done:
            if not park:
                self.core.clear(self._live.index(req))
            self._retire(req, park)
        self._done.clear()
        for loop, batch in self._outbox.items():
            loop.call_soon_threadsafe(_deliver, batch)
        self._outbox.clear()

    def _finished_stats(self, req: Request) -> None:
        if self.on_finish is not None:
            now = time.perf_counter()
            self.on_finish(
                StreamStats(
                    prompt_tokens=len(req.ids),
                    new_tokens=req.generated,
                    first_token_s=req.first_token_at - req.submitted,
                    total_s=now - req.submitted,
                    max_gap_s=req.max_gap_s,
                )
            )

    def _retire(self, req: Request, park: bool = True) -> None:
        row = self._live.index(req)
        last = len(self._live) - 1
        if park:  # keep its keys and values for a follow-up (bot/engine/prefix_cache.py)
            fed = (req.ids + req.tokens)[: req.position]
            busy = (last, self._fill_row) if self._filling is not None else (last,)
            dest = self.prefix.free_row(len(self._live), exclude=busy, evict=row != last)
            dest = row if dest is None and row == last else dest
            if dest is not None:
                if dest != row:
                    self.core.move(row, dest, req.position)
                self.prefix.park(dest, fed)
        if row != last:
            moved = self._live[last]
            self.core.move(last, row, moved.position)
            self.sampler.move(last, row)
            self._live[row] = moved
        self._live.pop()

    def _retire_cancelled(self) -> None:
        """End the streams of live rows whose reply was cancelled, and retire their rows."""
        for req in [r for r in self._live if r.cancelled]:
            _post(req, None)
            self._retire(req)

    def _launch(self, live: list[Request], tokens: list[int] | torch.Tensor, positions: list[int]) -> _Launched:
        """Queue a decode step of ``live`` and its sampling; nothing waits for the GPU."""
        return self._sampled(live, self.core.step(tokens, positions))

    def _sampled(self, live: list[Request], logits: torch.Tensor) -> _Launched:
        """Queue the sampling of a step's logits (the rows ``live``) and the
        copy of its tokens and finite flags to the host."""
        ids = self.sampler.sample_ids(logits, [r.settings for r in live])
        k = self._launches % 2
        self._launches += 1
        host = self._host[k][:, : len(live)]
        host[0].copy_(ids, non_blocking=True)
        host[1].copy_(torch.isfinite(logits).all(dim=-1).long(), non_blocking=True)
        ready = None
        if self._ready is not None:
            ready = self._ready[k]
            ready.record()
        return _Launched(live, ids, host, ready)

    def _may_look_ahead(self, live: list[Request]) -> bool:
        """Whether the step after ``live``'s current one can be queued before
        it is read: nothing waits to be admitted or filled, and no row can
        reach its token limit or the cache's end at the current step."""
        return (
            self.lookahead and self._filling is None and self._inbox.empty()
            and all(
                not r.cancelled and r.generated + 1 < r.settings.max_new_tokens and r.position + 1 < self.core.scratch
                for r in live
            )
        )

    def _advance(self, results: list[tuple[Request, int, bool]]) -> None:
        """A step's tokens read: each row's position moves past the token it fed, then :meth:`_take`."""
        self.steps += 1
        for req, _, _ in results:
            req.position += 1
        self._take(results)

    def _step(self) -> None:
        launched, self._ahead = self._ahead, None
        if launched is None:
            self._retire_cancelled()
            if not self._live:
                return
            live = list(self._live)
            launched = self._launch(live, [r.last_token for r in live], [r.position for r in live])
        live = launched.live
        ahead = None
        if self._may_look_ahead(live):
            ahead = self._launch(live, launched.ids, [r.position + 1 for r in live])
            self.steps_ahead += 1
        self._advance(launched.read())
        if ahead is not None and self._done:
            # Rows end at this step, and the next one is queued with them: read
            # it before any row moves, its tokens kept for the rows that go on.
            ended = {id(req) for req, _ in self._done}
            self._advance([res for res in ahead.read() if id(res[0]) not in ended])
            ahead = None
        self._ahead = ahead
        self._flush()
