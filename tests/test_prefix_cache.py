"""A follow-up reuses the parked keys and values of the reply before it.

On the CPU with a tiny random Llama: greedy ids of a follow-up prefilled from
a parked row must equal transformers' own ``generate()`` on the whole prompt;
parked rows are evicted when live conversations need them, and the result is
still right.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import torch

from bot.config import ModelConfig
from bot.engine.batched import BatchedEngine
from bot.engine.prefix_cache import PrefixCache, common_prefix
from tests.test_batched import VOCAB, collect, greedy, reference, tiny_model  # noqa: F401


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()]


async def started(model: Any, tokenizer: Any, max_batch: int, lookahead: bool = False) -> BatchedEngine:
    cfg = ModelConfig(id="tiny", max_batch=max_batch, context_length=128)
    engine = BatchedEngine.over(model, tokenizer, cfg, eos_ids=(), max_len=129, lookahead=lookahead)
    await engine.start()
    return engine


async def test_follow_up_reuses_the_thread_and_matches_generate(
    tiny_model: Any, llama_tok: Any, lookahead: bool  # noqa: F811
) -> None:
    engine = await started(tiny_model, llama_tok, max_batch=2, lookahead=lookahead)
    try:
        first = prompt(5, 40)
        reply = await collect(engine.stream_ids(first, greedy(8)))
        assert reply == reference(tiny_model, first, 8)
        follow = [*first, *reply, 7, 8, 9, 10, 11]
        again = await collect(engine.stream_ids(follow, greedy(6)))
        assert again == reference(tiny_model, follow, 6)
        prefix = engine.scheduler.prefix  # type: ignore[union-attr]
        # the reply's last token was never fed: 40 + 7 positions came from the cache
        assert prefix.hits == 1 and prefix.reused_tokens == 47

        # two other conversations need both rows: the parked follow-up is evicted
        others = [prompt(6, 36), prompt(7, 38)]
        got = list(await asyncio.gather(*(collect(engine.stream_ids(p, greedy(5))) for p in others)))
        assert got == [reference(tiny_model, p, 5) for p in others]
        assert prefix.evictions >= 1
        third = [*follow, *again, 12, 13]
        assert await collect(engine.stream_ids(third, greedy(4))) == reference(tiny_model, third, 4)
    finally:
        await engine.close()


async def test_parked_row_moves_to_the_next_live_row(
    tiny_model: Any, llama_tok: Any, lookahead: bool  # noqa: F811
) -> None:
    """A finished reply is parked in a top row; two other conversations take
    rows 0 and 1; the follow-up, admitted into row 2, gets its prefix copied
    there from the parked row while the others decode."""
    engine = await started(tiny_model, llama_tok, max_batch=4, lookahead=lookahead)
    try:
        first = prompt(8, 34)
        reply = await collect(engine.stream_ids(first, greedy(6)))
        prefix = engine.scheduler.prefix  # type: ignore[union-attr]
        assert 3 in prefix  # parked at the top (before its stream ended)
        others = [prompt(9, 20), prompt(10, 25)]
        follow = [*first, *reply, 4, 5, 6]
        runs = [collect(engine.stream_ids(p, greedy(12))) for p in others]
        runs.append(collect(engine.stream_ids(follow, greedy(7))))
        got = await asyncio.gather(*runs)
        assert got[:2] == [reference(tiny_model, p, 12) for p in others]
        assert got[2] == reference(tiny_model, follow, 7)
        assert prefix.hits == 1 and prefix.reused_tokens == 34 + 5
    finally:
        await engine.close()


async def test_another_conversation_sharing_only_a_prefix_never_sees_the_rest(
    tiny_model: Any, llama_tok: Any  # noqa: F811
) -> None:
    """One row: conversation A's 100 prompt + 20 reply tokens stay parked in
    it; B shares A's first 34 tokens (as prompts share a system prompt), then
    differs. B reuses those 34 and decodes over positions where A's keys and
    values still lie: its ids must equal generate() on B alone."""
    engine = await started(tiny_model, llama_tok, max_batch=1)
    try:
        a = prompt(21, 100)
        reply = await collect(engine.stream_ids(a, greedy(20)))
        prefix = engine.scheduler.prefix  # type: ignore[union-attr]
        assert 0 in prefix  # parked in place
        b = [*a[:34], *prompt(22, 5)[1:]]
        shared = common_prefix([*a, *reply], b)
        assert 34 <= shared < len(b)
        got = await collect(engine.stream_ids(b, greedy(12)))
    finally:
        await engine.close()
    assert got == reference(tiny_model, b, 12)
    assert prefix.hits == 1 and prefix.reused_tokens == shared


async def test_a_reply_is_parked_before_its_stream_ends(
    tiny_model: Any, llama_tok: Any, lookahead: bool  # noqa: F811
) -> None:
    """When the stream has ended the row is parked (or not) already: a caller
    that then clears the cache (the benchmark before a cold measurement)
    cannot be overtaken by the decode thread parking it afterwards."""
    engine = await started(tiny_model, llama_tok, max_batch=2, lookahead=lookahead)
    prefix = engine.scheduler.prefix  # type: ignore[union-attr]
    real_park = prefix.park

    def slow_park(row: int, ids: Sequence[int]) -> None:
        time.sleep(0.2)  # the decode thread is slow to park
        real_park(row, ids)

    prefix.park = slow_park  # type: ignore[method-assign]
    try:
        await collect(engine.stream_ids(prompt(23, 40), greedy(3)))
        assert len(prefix) == 1  # parked before the end reached the stream
        prefix.clear()
        await asyncio.sleep(0.3)
        assert len(prefix) == 0  # and nothing parked behind the clear
    finally:
        await engine.close()


def test_prefix_cache_picks_the_longest_prefix_and_evicts_least_recent() -> None:
    cache = PrefixCache(rows=4, min_reuse=3)
    cache.park(3, [1, 2, 3, 4, 5])
    cache.park(2, [1, 2, 3, 9])
    cache.park(1, [1, 2])  # too short to park
    assert len(cache) == 2 and 1 not in cache
    assert cache.lookup([1, 2, 3, 4, 5, 6]) == (3, 5)
    assert cache.lookup([1, 2, 3, 4, 5]) == (3, 4)  # one token is always left to prefill
    assert cache.lookup([1, 2, 3, 9, 9]) == (2, 4)
    assert cache.lookup([7, 2, 3, 4]) is None
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    # rows 0..1 live: row 3 and 2 parked, none free: the least recently parked (3) goes
    assert cache.free_row(live=2, exclude=(), evict=False) is None
    assert cache.free_row(live=2, exclude=()) == 3
    assert 3 not in cache and cache.evictions == 1
    cache.take(2)
    assert cache.hits == 1 and len(cache) == 0
    assert cache.free_row(live=4, exclude=()) is None


async def test_the_prefix_cache_can_be_turned_off(tiny_model: Any, llama_tok: Any) -> None:  # noqa: F811
    cfg = ModelConfig(id="tiny", max_batch=2, context_length=128, prefix_cache=False)
    engine = BatchedEngine.over(tiny_model, llama_tok, cfg, eos_ids=(), max_len=129)
    await engine.start()
    try:
        first = prompt(5, 40)
        reply = await collect(engine.stream_ids(first, greedy(8)))
        follow = [*first, *reply, 7, 8, 9]
        assert await collect(engine.stream_ids(follow, greedy(4))) == reference(tiny_model, follow, 4)
        prefix = engine.scheduler.prefix  # type: ignore[union-attr]
        assert len(prefix) == 0 and prefix.hits == 0 and prefix.reused_tokens == 0
    finally:
        await engine.close()
