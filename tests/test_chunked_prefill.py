"""Chunked prefill: a long prompt does not stall the replies already decoding.

On the CPU with a tiny random Llama (``[model] prefill_chunk`` = 16 here):
while a row decodes, a longer prompt is prefilled 16 tokens at a time into its
own row with a decode step between chunks, both ways a turn can run
(``[model] mixed_prefill``: a prefill and then a step, or prompts packed into
one forward with the step). Greedy ids must still equal transformers' own
``generate()`` (also with a reused prefix), the decoding row must get steps
between the chunks, and a NaN in one chunk fails that reply only, at that
chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from bot.config import ModelConfig
from bot.engine.batched import MSG_NON_FINITE, BatchedEngine
from bot.engine.batched.core import Fill
from bot.errors import MODEL_FAILED, GenerationError
from tests.test_batched import VOCAB, collect, greedy, reference, tiny_llama, tiny_model  # noqa: F401
from tests.test_prefix_cache import prompt

CHUNK = 16
# ("prefill", row, start, end, the prompt's first ids) for each prompt chunk
# of a forward, then ("step", rows, mixed, 0, ()): a decode step, in that
# forward (mixed = 1) or alone
Event = tuple[str, int, int, int, tuple[int, ...]]


class Gate:
    """Holds the decode thread in its first forward: ``entered`` is set once
    it waits there, and it goes on once ``opened`` is."""

    def __init__(self) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()

    async def reach(self) -> None:
        deadline = time.monotonic() + 30
        while not self.entered.is_set():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)


def recorded(
    model: Any, tokenizer: Any, max_batch: int = 4, gate: Gate | None = None, lookahead: bool = False,
    mixed: bool = False,
) -> tuple[BatchedEngine, list[Event]]:
    """An engine whose DecodeCore logs every prompt chunk and decode step, in
    order; with ``gate``, the first forward waits for it."""
    cfg = ModelConfig(id="tiny", max_batch=max_batch, context_length=128, prefill_chunk=CHUNK, mixed_prefill=mixed)
    engine = BatchedEngine.over(model, tokenizer, cfg, eos_ids=(), max_len=129, lookahead=lookahead)
    core = engine.core
    assert core is not None
    events: list[Event] = []
    real_forward, real_step = core.forward, core.step

    def forward(
        fills: Sequence[Fill], tokens: Sequence[int] | torch.Tensor = (), positions: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        events.extend(("prefill", f.row, f.start, len(f.ids), key(f.ids)) for f in fills)
        if len(tokens):
            events.append(("step", len(tokens), 1, 0, ()))
        if gate is not None:
            gate.entered.set()
            assert gate.opened.wait(timeout=30)
        return real_forward(fills, tokens, positions)

    def step(tokens: Sequence[int] | torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        events.append(("step", len(tokens), 0, 0, ()))
        return real_step(tokens, positions)

    core.forward = forward  # type: ignore[method-assign]
    core.step = step  # type: ignore[method-assign]
    return engine, events


@pytest.fixture(params=[False, True], ids=["prefill-then-step", "mixed"])
def mixed(request: pytest.FixtureRequest) -> bool:
    """Both ways a turn runs a chunk: a prefill and then a decode step, or the
    chunk and the step in one forward (``[model] mixed_prefill``)."""
    return bool(request.param)


def key(ids: Sequence[int]) -> tuple[int, ...]:
    """What tells the test's prompts apart in the events."""
    return tuple(ids[:6])


def chunks_for(events: list[Event], ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each chunk of the prompt ``ids``, in order."""
    return [(r, s, e) for kind, r, s, e, k in events if kind == "prefill" and k == key(ids)]


def steps_between_chunks(events: list[Event], ids: Sequence[int]) -> list[int]:
    """Decode steps run between consecutive prefill chunks of the prompt ``ids``."""
    at = [i for i, (kind, _, _, _, k) in enumerate(events) if kind == "prefill" and k == key(ids)]
    return [sum(events[i][0] == "step" for i in range(a, b)) for a, b in itertools.pairwise(at)]


def assert_cut_in_turns(chunks: list[tuple[int, int, int]], start: int, n: int) -> None:
    """Packed turns (mixed): a prompt's chunks run from ``start`` to its
    length ``n`` without a gap, none longer than the budget."""
    assert [s for _, s, _ in chunks] == [start] + [e for _, _, e in chunks[:-1]], chunks
    assert chunks[-1][2] == n and all(0 < e - s <= CHUNK for _, s, e in chunks), chunks


async def failure(engine: BatchedEngine, ids: list[int]) -> BaseException | None:
    """The GenerationError a greedy 5-token reply to ``ids`` ends with, or None."""
    try:
        await collect(engine.stream_ids(ids, greedy(5)))
    except GenerationError as exc:
        return exc
    return None


async def test_long_prompt_is_chunked_between_decode_steps_and_matches_generate(
    tiny_model: Any, llama_tok: Any, lookahead: bool, mixed: bool  # noqa: F811
) -> None:
    engine, events = recorded(tiny_model, llama_tok, max_batch=3, lookahead=lookahead, mixed=mixed)
    short, brief, long = prompt(11, 8), prompt(16, 8), prompt(12, 90)
    await engine.start()
    try:
        # the short prompts are submitted first: they decode while the long one
        # fills row 2; the brief reply ends (row 1 frees) before it is done
        got_short, got_brief, got_long = await asyncio.wait_for(asyncio.gather(
            collect(engine.stream_ids(short, greedy(100))),
            collect(engine.stream_ids(brief, greedy(3))),
            collect(engine.stream_ids(long, greedy(8))),
        ), timeout=60)
        # the same prompt unchunked: alone (nobody decoding), prefilled at once
        prefix = engine.scheduler.prefix  # type: ignore[union-attr]
        prefix.clear()  # nothing reused (rows are parked before their streams end): the whole prompt again
        events_before = len(events)
        alone = await collect(engine.stream_ids(long, greedy(8)))
    finally:
        await engine.close()
    assert got_short == reference(tiny_model, short, 100)
    assert got_brief == reference(tiny_model, brief, 3)
    assert got_long == reference(tiny_model, long, 8)  # its row moved down to row 1 at the end
    assert alone == got_long
    assert chunks_for(events, short)[0] == (0, 0, 8) and chunks_for(events, brief)[0] == (1, 0, 8)
    chunks = chunks_for(events[:events_before], long)
    if mixed:  # packed turns: a chunk with the brief prompt, then on; its row moved down once brief ended
        assert_cut_in_turns(chunks, 0, 90)
        assert chunks[0][0] == 2 and chunks[-1][0] == 1
    else:
        assert chunks == [(2, s, min(s + 16, 90)) for s in range(0, 90, 16)]
    # a decode step of the others between every two chunks: no stall; mixed,
    # each chunk's step in the same forward as the chunk
    assert steps_between_chunks(events[:events_before], long) == [1] * (len(chunks) - 1)
    after = [next(x for x in events[i:] if x[0] == "step") for i, e in enumerate(events[:events_before])
             if e[0] == "prefill" and e[4] == key(long)]
    assert [flag for _, _, flag, _, _ in after[:-1]] == [int(mixed)] * (len(chunks) - 1)
    assert engine.scheduler.prefill_chunks == len(chunks) - 1  # type: ignore[union-attr]
    assert chunks_for(events[events_before:], long) == [(0, 0, 90)]


async def test_chunked_follow_up_reuses_the_prefix_and_matches_generate(
    tiny_model: Any, llama_tok: Any, mixed: bool  # noqa: F811
) -> None:
    engine, events = recorded(tiny_model, llama_tok, mixed=mixed)
    await engine.start()
    try:
        first = prompt(5, 40)
        reply = await collect(engine.stream_ids(first, greedy(8)))
        prefix = engine.scheduler.prefix  # type: ignore[union-attr]
        assert 3 in prefix  # row 0 parked at the top
        other = prompt(13, 10)
        follow = [*first, *reply, *prompt(14, 41)[1:]]  # 88 tokens, 47 of them parked
        mark = len(events)
        got_other, got_follow = await asyncio.wait_for(asyncio.gather(
            collect(engine.stream_ids(other, greedy(60))), collect(engine.stream_ids(follow, greedy(7)))
        ), timeout=60)
    finally:
        await engine.close()
    assert reply == reference(tiny_model, first, 8)
    assert got_other == reference(tiny_model, other, 60)
    assert got_follow == reference(tiny_model, follow, 7)
    assert prefix.hits == 1 and prefix.reused_tokens == 47
    # parked row 3 copied to row 1, then only the 41 new tokens, in chunks
    chunks = chunks_for(events[mark:], follow)
    if mixed:  # its first chunk may share a turn with the other prompt
        assert_cut_in_turns(chunks, 47, 88)
        assert {r for r, _, _ in chunks} == {1}
    else:
        assert chunks == [(1, 47, 63), (1, 63, 79), (1, 79, 88)]
    steps = steps_between_chunks(events[mark:], follow)
    if mixed:  # a first chunk packed with the other prompt had no row decoding beside it
        assert steps[1:] == [1] * (len(chunks) - 2) and steps[0] in (0, 1)
    else:
        assert steps == [1, 1]


async def test_nan_in_one_chunk_fails_that_reply_only(
    llama_tok: Any, caplog: pytest.LogCaptureFixture, lookahead: bool, mixed: bool
) -> None:
    model = tiny_llama(VOCAB)  # its own: poisoned below
    short = prompt(11, 8)
    ref_short = reference(model, short, 60)
    long = prompt(15, 70)
    poison = next(t for t in range(3, VOCAB) if t not in {*short, *ref_short, *long})
    long[20] = poison  # in the second chunk (tokens 16..31)
    ref_long = reference(model, long, 5)
    saved = model.model.embed_tokens.weight[poison].clone()
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    engine, events = recorded(model, llama_tok, lookahead=lookahead, mixed=mixed)
    caplog.set_level(logging.ERROR, logger="bot.engine.batched")
    await engine.start()
    try:
        got_short, err = await asyncio.wait_for(
            asyncio.gather(collect(engine.stream_ids(short, greedy(60))), failure(engine, long)), timeout=60
        )
        # stopped at the poisoned chunk; the decoding reply is untouched
        assert isinstance(err, GenerationError) and str(err) == MSG_NON_FINITE
        chunks = chunks_for(events, long)
        if mixed:  # packed turns: the first chunk may share a forward with the short prompt
            assert [s for _, s, _ in chunks] == [0] + [e for _, _, e in chunks[:-1]]
            assert chunks[-1][1] <= 20 < chunks[-1][2] <= 20 + CHUNK
        else:
            assert chunks == [(1, 0, 16), (1, 16, 32)]
        assert got_short == ref_short
        end = chunks[-1][2]
        assert sum(f"non-finite logits after {end} tokens" in r.getMessage() for r in caplog.records) == 1
        # the engine keeps serving, the failed prompt's row included
        with torch.no_grad():
            model.model.embed_tokens.weight[poison] = saved
        again = await asyncio.wait_for(asyncio.gather(
            collect(engine.stream_ids(short, greedy(60))), collect(engine.stream_ids(long, greedy(5)))
        ), timeout=60)
    finally:
        await engine.close()
    assert again == [ref_short, ref_long]


async def test_nan_in_the_last_chunk_of_a_moved_row_leaves_no_nan_behind(
    llama_tok: Any, caplog: pytest.LogCaptureFixture, mixed: bool
) -> None:
    """A row that ended while the long prompt filled: the filled row would be
    moved down; a NaN in its last chunk must not stay in the row it filled
    (0 x NaN would poison that row's next user)."""
    model = tiny_llama(VOCAB)  # its own: poisoned below
    short, brief, long = prompt(11, 8), prompt(16, 8), prompt(15, 70)
    poison = next(t for t in range(3, VOCAB) if t not in {*short, *brief, *long})
    long[66] = poison  # in the last chunk (tokens 64..69)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    gate = Gate()
    engine, events = recorded(model, llama_tok, max_batch=3, gate=gate, mixed=mixed)
    core = engine.core
    assert core is not None
    caplog.set_level(logging.ERROR, logger="bot.engine.batched")
    await engine.start()
    try:
        runs = [asyncio.create_task(collect(engine.stream_ids(short, greedy(100))))]
        await gate.reach()  # short's forward holds; the others queue behind it
        runs.append(asyncio.create_task(collect(engine.stream_ids(brief, greedy(3)))))
        runs.append(asyncio.create_task(failure(engine, long)))
        deadline = time.monotonic() + 30
        while engine.scheduler._inbox.qsize() < 2:  # type: ignore[union-attr]  # brief and long wait
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        gate.opened.set()
        err = await asyncio.wait_for(runs[2], timeout=60)
        assert isinstance(err, GenerationError) and str(err) == MSG_NON_FINITE
        # brief (row 1) ended while long filled row 2: the last chunk came after
        # (mixed: the row moved down before that chunk, at the start of its turn)
        chunks = chunks_for(events, long)
        assert chunks[0][0] == 2 and chunks[-1][1] <= 66 < chunks[-1][2] == 70
        assert chunks[-1][0] == (1 if mixed else 2)
        assert sum("non-finite logits after 70 tokens" in r.getMessage() for r in caplog.records) == 1
        assert bool(torch.isfinite(core.k_cache).all()) and bool(torch.isfinite(core.v_cache).all())
        await asyncio.wait_for(asyncio.gather(*runs[:2]), timeout=60)
    finally:
        gate.opened.set()
        await engine.close()


async def test_short_prompts_arriving_together_share_the_chunk_budget(
    tiny_model: Any, llama_tok: Any, mixed: bool  # noqa: F811
) -> None:
    gate = Gate()
    engine, events = recorded(tiny_model, llama_tok, gate=gate, mixed=mixed)
    first, others = prompt(11, 8), [prompt(20 + i, 10) for i in range(3)]
    await engine.start()
    try:
        runs = [asyncio.create_task(collect(engine.stream_ids(first, greedy(40))))]
        await gate.reach()  # the first prompt's forward holds; the others queue behind it
        runs += [asyncio.create_task(collect(engine.stream_ids(p, greedy(5)))) for p in others]
        deadline = time.monotonic() + 30
        while engine.scheduler._inbox.qsize() < 3:  # type: ignore[union-attr]  # all three wait
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        gate.opened.set()  # the decode thread was held in the first prompt's prefill
        got = await asyncio.wait_for(asyncio.gather(*runs), timeout=60)
    finally:
        gate.opened.set()
        await engine.close()
    assert got == [reference(tiny_model, first, 40), *(reference(tiny_model, p, 5) for p in others)]
    kinds = [(k, r) for k, r, _, _, _ in events[:7]]
    if mixed:  # row 0 decodes; then the three share forwards of 16 prompt tokens with its steps
        assert [e[:4] for e in events[:7]] == [
            ("prefill", 0, 0, 8),
            ("prefill", 1, 0, 10), ("prefill", 2, 0, 6), ("step", 1, 1, 0),
            ("prefill", 2, 6, 10), ("prefill", 3, 0, 10), ("step", 2, 1, 0),
        ]
    else:  # row 0 decodes; then 10 + 10 tokens reach the budget of 16: a step before the third
        assert kinds[:6] == [("prefill", 0), ("prefill", 1), ("prefill", 2), ("step", 3), ("prefill", 3), ("step", 4)]


async def test_a_crash_in_a_packed_turn_fails_its_prompts_and_rows_cleanly(
    tiny_model: Any, llama_tok: Any  # noqa: F811
) -> None:
    """A forward carrying prompts and the live rows' step raises: the reply
    decoding and the prompts it carried (not live yet) each get the model's
    failure, its text for users free of the exception's (which goes to the
    log), and none waits forever; the engine then serves the same prompts
    as ``generate()`` does."""
    gate = Gate()
    engine, _ = recorded(tiny_model, llama_tok, gate=gate, mixed=True)
    core = engine.core
    assert core is not None
    recording = core.forward  # the recorder's, which holds the first forward at the gate
    failed: list[int] = []

    def crashing(fills: Sequence[Fill], tokens: Sequence[int] | torch.Tensor = (),
                 positions: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        if len(tokens) and not failed:
            failed.append(len(fills))
            raise RuntimeError("CUDA error: illegal address token=xoxb-SECRET")
        return recording(fills, tokens, positions)

    core.forward = crashing  # type: ignore[method-assign]
    first, others = prompt(11, 8), [prompt(30 + i, 10) for i in range(2)]
    await engine.start()
    try:
        runs = [asyncio.create_task(failure(engine, first))]
        await gate.reach()  # the first prompt's forward holds; the others queue behind it
        runs += [asyncio.create_task(failure(engine, p)) for p in others]
        deadline = time.monotonic() + 30
        while engine.scheduler._inbox.qsize() < 2:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        gate.opened.set()
        errors = await asyncio.wait_for(asyncio.gather(*runs), timeout=60)
        again = await asyncio.wait_for(asyncio.gather(
            *(collect(engine.stream_ids(p, greedy(5))) for p in [first, *others])), timeout=60)
    finally:
        gate.opened.set()
        await engine.close()
    assert failed == [2]  # the turn that crashed carried both waiting prompts beside row 0's step
    for err in errors:
        assert isinstance(err, GenerationError) and err.user_message == MODEL_FAILED
        assert "SECRET" in err.detail  # for the log; the worker shows users user_message only
    assert again == [reference(tiny_model, p, 5) for p in [first, *others]]
