"""The batched engine on the CPU: a tiny random Llama, no download.

Greedy ids must equal transformers' own ``generate()`` for every stream, also
when streams join and leave mid-way (rows are compacted by moving caches).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.app import Bot
from bot.config import ModelConfig, Secrets
from bot.engine import make_engine as engine_from_config
from bot.engine.base import StreamStats
from bot.engine.batched import BatchedEngine, DecodeCore, Sampler
from bot.engine.batched.core import Fill
from bot.engine.batched.scheduler import Request
from bot.errors import MODEL_FAILED, GenerationError
from bot.store import Store
from bot.types import ConversationKey, Incoming, Settings
from tests.conftest import make_config
from tests.sinks import RecordingSink

VOCAB = 320


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    return tiny_llama(VOCAB)


def tiny_llama(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()  # type: ignore[no-untyped-call]


def greedy(n: int) -> Settings:
    return Settings(0.0, 1.0, 0, 1.0, n, "")


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt):]]


def make_engine(model: Any, llama_tok: Any, max_batch: int = 4, lookahead: bool = False) -> BatchedEngine:
    cfg = ModelConfig(id="tiny", max_batch=max_batch, context_length=128)
    return BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129, lookahead=lookahead)


async def collect(it: AsyncGenerator[list[int], None], limit: int | None = None) -> list[int]:
    out: list[int] = []
    async for chunk in it:
        out.extend(chunk)
        if limit is not None and len(out) >= limit:
            break
    return out


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[1, *torch.randint(3, VOCAB, (k,), generator=g).tolist()] for k in (7, 19, 12)]


async def test_concurrent_streams_match_generate(tiny_model: Any, llama_tok: Any, lookahead: bool) -> None:
    engine = make_engine(tiny_model, llama_tok, lookahead=lookahead)
    await engine.start()
    try:
        ps = prompts()
        got = await asyncio.gather(*(collect(engine.stream_ids(p, greedy(10))) for p in ps))
    finally:
        await engine.close()
    for p, ids in zip(ps, got, strict=True):
        assert ids == reference(tiny_model, p, 10)
    assert engine.last_stats is not None and engine.last_stats.new_tokens == 10


async def test_closing_a_stream_frees_its_row_and_others_go_on(
    tiny_model: Any, llama_tok: Any, lookahead: bool
) -> None:
    engine = make_engine(tiny_model, llama_tok, max_batch=2, lookahead=lookahead)
    await engine.start()
    try:
        a, b, c = prompts()
        first = engine.stream_ids(a, greedy(40))
        second = asyncio.create_task(collect(engine.stream_ids(b, greedy(25))))
        assert len(await collect(first, limit=3)) >= 3
        await first.aclose()  # row 0 leaves: row 1 (b) is moved into it
        third = asyncio.create_task(collect(engine.stream_ids(c, greedy(12))))  # takes the free row
        got_b, got_c = await asyncio.wait_for(asyncio.gather(second, third), timeout=60)
    finally:
        await engine.close()
    assert got_b == reference(tiny_model, b, 25)
    assert got_c == reference(tiny_model, c, 12)


async def test_more_streams_than_rows_wait_their_turn(tiny_model: Any, llama_tok: Any, lookahead: bool) -> None:
    engine = make_engine(tiny_model, llama_tok, max_batch=2, lookahead=lookahead)
    finished: list[StreamStats] = []
    engine.on_finish = finished.append  # the benchmark's hook
    await engine.start()
    try:
        ps = prompts()
        got = await asyncio.gather(*(collect(engine.stream_ids(p, greedy(6))) for p in ps))
    finally:
        await engine.close()
    assert got == [reference(tiny_model, p, 6) for p in ps]
    # one call per reply; the engine itself keeps only the last (nothing grows per reply)
    assert sorted(s.prompt_tokens for s in finished) == sorted(len(p) for p in ps)
    assert [s.new_tokens for s in finished] == [6, 6, 6]
    # each reply's longest wait between two of its tokens, within its decode time
    assert all(0 < s.max_gap_s <= s.total_s - s.first_token_s for s in finished)
    assert engine.last_stats is finished[-1]
    assert not [k for k, v in vars(engine).items() if isinstance(v, (list, dict)) and len(v) >= len(ps)]


async def test_a_reply_keeps_its_first_token_time_and_its_longest_wait_between_tokens() -> None:
    req = Request([1, 5], greedy(5), asyncio.get_running_loop(), asyncio.Queue())
    for now in (10.0, 10.5, 10.7, 11.6, 11.7):  # the times its tokens were emitted
        req.token_at(now)
    assert req.first_token_at == 10.0
    assert req.max_gap_s == pytest.approx(0.9)  # 10.7 -> 11.6; the first token's wait is TTFT
    one = Request([1], greedy(1), asyncio.get_running_loop(), asyncio.Queue())
    one.token_at(3.0)
    assert (one.first_token_at, one.max_gap_s) == (3.0, 0.0)


async def test_closing_the_engine_fails_the_streams_still_waiting_for_a_row(
    tiny_model: Any, llama_tok: Any
) -> None:
    engine = make_engine(tiny_model, llama_tok, max_batch=1)
    core, scheduler = engine.core, engine.scheduler
    assert core is not None and scheduler is not None
    gate = threading.Event()
    real_step = core.step

    def held_step(tokens: Any, positions: Any) -> torch.Tensor:
        assert gate.wait(timeout=30)  # the decode thread waits here, row 0 taken
        return real_step(tokens, positions)

    core.step = held_step  # type: ignore[method-assign]
    await engine.start()
    a, b = prompts()[:2]
    first = engine.stream_ids(a, greedy(40))
    try:
        assert len(await first.__anext__()) == 1  # prefilled; its first step is held
        waiting = asyncio.create_task(collect(engine.stream_ids(b, greedy(5))))
        deadline = time.monotonic() + 30
        while scheduler._inbox.qsize() < 1:  # no free row: it stays in the inbox
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        closing = asyncio.create_task(engine.close())
        while not scheduler._stop:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        gate.set()
        await asyncio.wait_for(closing, timeout=30)
        with pytest.raises(GenerationError, match="engine closed"):
            await asyncio.wait_for(waiting, timeout=10)  # not left waiting forever
        with pytest.raises(GenerationError, match="engine closed"):
            await collect(first)
    finally:
        gate.set()
        await engine.close()


async def test_eos_ends_the_stream_and_is_not_sent(tiny_model: Any, llama_tok: Any, lookahead: bool) -> None:
    p = prompts()[0]
    ref = reference(tiny_model, p, 8)
    cfg = ModelConfig(id="tiny", max_batch=2, context_length=128)
    engine = BatchedEngine.over(tiny_model, llama_tok, cfg, eos_ids=(ref[3],), max_len=129, lookahead=lookahead)
    await engine.start()
    try:
        got = await collect(engine.stream_ids(p, greedy(8)))
    finally:
        await engine.close()
    assert got == ref[: ref.index(ref[3])]


async def test_rows_ending_mid_batch_leave_the_others_and_their_follow_ups_exact(
    tiny_model: Any, llama_tok: Any, lookahead: bool
) -> None:
    """Three rows decode; one meets its end of sequence mid-way while the
    others go on (with lookahead, a step of all three is queued by then:
    its token for the ended row is dropped, and rows move only after it is
    read). Every reply is generate()'s cut at the end token, and a follow-up
    on the ended reply's parked row is generate()'s too."""
    g = torch.Generator().manual_seed(4)
    ps = [[1, *torch.randint(3, VOCAB, (k,), generator=g).tolist()] for k in (39, 19, 12)]  # the first parkable
    refs = [reference(tiny_model, p, 14) for p in ps]
    # an end token that cuts row 0's reply after a few tokens and no other reply
    eos = next(t for t in refs[0][3:10] if t not in refs[1] and t not in refs[2] and t not in refs[0][:3])
    cut = refs[0][: refs[0].index(eos)]
    cfg = ModelConfig(id="tiny", max_batch=4, context_length=128)
    engine = BatchedEngine.over(tiny_model, llama_tok, cfg, eos_ids=(eos,), max_len=129, lookahead=lookahead)
    await engine.start()
    try:
        got = await asyncio.wait_for(
            asyncio.gather(*(collect(engine.stream_ids(p, greedy(14))) for p in ps)), timeout=60
        )
        follow = [*ps[0], *cut, 5, 6, 7]
        again = await collect(engine.stream_ids(follow, greedy(6)))
    finally:
        await engine.close()
    assert got == [cut, refs[1], refs[2]]
    ref_again = reference(tiny_model, follow, 6)
    assert again == (ref_again[: ref_again.index(eos)] if eos in ref_again else ref_again)
    scheduler = engine.scheduler
    assert scheduler is not None and scheduler.prefix.reused_tokens == len(ps[0]) + len(cut)
    assert (scheduler.steps_ahead > 0) == lookahead


async def test_prompt_too_long_fails_cleanly(tiny_model: Any, llama_tok: Any) -> None:
    engine = make_engine(tiny_model, llama_tok)
    await engine.start()
    try:
        with pytest.raises(GenerationError):
            await collect(engine.stream_ids([1] * 200, greedy(4)))
        # the engine still serves afterwards
        p = prompts()[1]
        assert await collect(engine.stream_ids(p, greedy(3))) == reference(tiny_model, p, 3)
    finally:
        await engine.close()


#: What a CUDA or Python error inside generation may carry: a path and a token.
LEAKY = "CUDA error: illegal address at /home/ops/xwin/.env token=xoxb-1234-SECRET-5678"


async def test_a_crash_inside_decode_reaches_the_log_not_the_user(
    llama_tok: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A model that knows every id of the tokenizer the prompt builder uses.
    engine = make_engine(tiny_llama(len(llama_tok.hf)), llama_tok)
    assert engine.core is not None
    real_step, steps = engine.core.step, 0

    def failing_step(tokens: Any, positions: Any) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if steps == 3:  # mid-reply, after some text was streamed
            raise RuntimeError(LEAKY)
        return real_step(tokens, positions)

    engine.core.step = failing_step  # type: ignore[method-assign]
    config = make_config(tmp_path, generation={"max_new_tokens": 16, "system_prompt": "Hi."})
    key = ConversationKey("console", "dm", "u1", "")
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        sink = RecordingSink()
        await bot.handle(Incoming(key, "m1", "u1", "U1", "hello there", True, time.time()), sink)
        assert await sink.wait() == (
            "fail", f"Sorry, I could not finish that reply: {MODEL_FAILED}. Try again in a moment.")
        assert not any("SECRET" in str(v) or "/home/ops" in str(v) for _, v in sink.events)
        job = await store.job(1)
        assert job is not None and job.state == "failed"
    assert steps >= 3
    assert "xoxb-1234-SECRET-5678" in caplog.text and "/home/ops/xwin/.env" in caplog.text


async def test_text_never_holds_half_a_character(tiny_model: Any, llama_tok: Any) -> None:
    engine = make_engine(tiny_model, llama_tok)
    byte_ids = [llama_tok.hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "日本".encode()]

    async def scripted(prompt_ids: list[int], settings: Settings) -> AsyncGenerator[list[int], None]:
        for t in byte_ids:
            yield [t]

    engine.stream_ids = scripted  # type: ignore[method-assign]
    pieces = [p async for p in engine.stream([1, 5], greedy(8))]
    assert "".join(pieces) == "日本"
    assert all("\ufffd" not in p for p in pieces)


def test_config_decode_batched_makes_the_batched_engine() -> None:
    engine = engine_from_config(ModelConfig(id="tiny", decode="batched", max_batch=3), Secrets())
    assert isinstance(engine, BatchedEngine)
    assert engine.max_batch == 3 and engine.scheduler is None  # nothing loaded before start()


def test_sampler_top_k_one_is_greedy_and_survives_nan() -> None:
    s = Sampler(4, 16, torch.device("cpu"))
    logits = torch.randn(3, 16)
    logits[2] = float("nan")
    sampled = s.sample(logits, [Settings(0.7, 0.9, 1, 1.0, 4, "")] * 3)
    assert sampled[:2] == torch.argmax(logits[:2], dim=-1).tolist()
    assert 0 <= sampled[2] < 16


def test_sampler_draws_each_token_as_often_as_its_probability() -> None:
    """Temperature 1, no top-k or top-p, no penalty: over many draws of a
    batch, each token comes up as often as softmax says; a token top-p drops
    never comes up; a row that turns greedy later is greedy (the settings
    on the device follow the rows')."""
    torch.manual_seed(0)
    s = Sampler(2, 4, torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    free, nucleus = Settings(1.0, 1.0, 0, 1.0, 1, ""), Settings(1.0, 0.7, 0, 1.0, 1, "")
    draws = torch.stack([s.sample_ids(logits, [free, nucleus]) for _ in range(8000)])
    freq = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.02), freq
    nucleus_freq = torch.bincount(draws[:, 1], minlength=4).float() / len(draws)  # 0.5 + 0.3 reach 0.7
    assert nucleus_freq[2:].sum() == 0 and abs(float(nucleus_freq[0]) - 0.5 / 0.8) < 0.02, nucleus_freq
    greedy = Settings(0.0, 1.0, 0, 1.0, 1, "")
    assert all(s.sample(logits, [free, greedy])[1] == 0 for _ in range(50))


def test_decode_core_step_matches_forward(tiny_model: Any) -> None:
    core = DecodeCore(tiny_model, 2, 65)
    p = prompts()[1]
    with torch.inference_mode():
        core.prefill(1, [1, 2])  # another row in use
        core.prefill(0, p)
        step = core.step([7, 9], [len(p), 2])[0]
        ref = tiny_model(torch.tensor([[*p, 7]])).logits[0, -1]
    assert float((step - ref).norm() / ref.norm()) < 1e-4


def test_one_forward_of_prompt_chunks_and_decode_rows_matches_them_apart(tiny_model: Any) -> None:
    """``DecodeCore.forward``: two rows decode while one forward also fills
    row 2 with a prompt's second chunk (past a prefix already in the cache)
    and row 3 with a whole prompt: every logit and every cache entry as a
    prefill of each and a step apart give them, and as the forward."""
    a, b, c, d = prompts()[0], prompts()[1], prompts()[2], [1, 5, 9, 33, 70, 4]
    apart, together = DecodeCore(tiny_model, 4, 65), DecodeCore(tiny_model, 4, 65)
    with torch.inference_mode():
        for core in (apart, together):
            core.prefill(0, a)
            core.prefill(1, b)
            core.prefill(2, c[:5])  # the first chunk
        want_c = apart.prefill(2, c, start=5)
        want_d = apart.prefill(3, d)
        want_step = apart.step([7, 9], [len(a), len(b)])
        fills, step = together.forward([Fill(2, c, 5), Fill(3, d)], [7, 9], [len(a), len(b)])
        ref_step = tiny_model(torch.tensor([[*a, 7]])).logits[0, -1]
        ref_c = tiny_model(torch.tensor([c])).logits[0, -1]
    assert fills.shape == (2, VOCAB) and step.shape == (2, VOCAB)
    for got, want in ((fills[0], want_c), (fills[1], want_d), (step, want_step)):
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert float((step[0] - ref_step).norm() / ref_step.norm()) < 1e-4
    assert float((fills[0] - ref_c).norm() / ref_c.norm()) < 1e-4
    lengths = (len(a) + 1, len(b) + 1, len(c), len(d))
    for row, n in enumerate(lengths):
        for cache in ("k_cache", "v_cache"):
            got, want = getattr(together, cache)[:, row, :, :n], getattr(apart, cache)[:, row, :, :n]
            assert torch.allclose(got, want, atol=1e-6), (row, cache)
    with pytest.raises(ValueError, match="decoding rows"):  # a fill into a decoding row
        together.forward([Fill(1, d)], [7, 9], [len(a) + 1, len(b) + 1])
    with pytest.raises(ValueError, match="another fill's"):  # two fills into one row
        together.forward([Fill(2, d), Fill(2, c)])


def test_steps_of_one_row_take_the_attention_kernels_path(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the decode attention kernels on (off the GPU their torch form
    stands in), a one-row step goes through them and a two-row step through
    torch's matmuls (core.ATTENTION_KERNEL_MAX_ROWS); both give the forward's
    logits, also with the kernels taking every step."""
    from bot.engine import attention

    calls: list[int] = []
    decode = attention.decode

    def counted(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(q.shape[0])
        return decode(q, *args, **kwargs)

    monkeypatch.setattr(attention, "decode", counted)
    p = prompts()[1]
    with torch.inference_mode():
        ref_one = tiny_model(torch.tensor([[*p, 7]])).logits[0, -1]
        ref_two = tiny_model(torch.tensor([[*p, 7, 8]])).logits[0, -1]
        ref_other = tiny_model(torch.tensor([[1, 2, 9]])).logits[0, -1]
    for max_rows, kernel_rows in ((1, [1]), (2, [1, 2])):
        core = DecodeCore(tiny_model, 2, 65)
        assert not core.attention_kernel  # not built off the GPU
        core.attention_kernel, core.attention_max_rows = True, max_rows
        calls.clear()
        with torch.inference_mode():
            core.prefill(1, [1, 2])
            core.prefill(0, p)
            one = core.step([7], [len(p)])[0]
            two = core.step([8, 9], [len(p) + 1, 2])
        assert sorted(set(calls)) == kernel_rows and len(calls) == 2 * len(kernel_rows)  # a call a layer
        for got, want in ((one, ref_one), (two[0], ref_two), (two[1], ref_other)):
            assert float((got - want).norm() / want.norm()) < 1e-4


def test_dependent_launch_reaches_every_extension_and_only_a_hopper_asks_for_it(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The core's dependent-launch setting reaches each of the project's
    extensions, those loaded before and those loaded after; off the GPU
    (no Hopper) the core leaves every launch plain whatever it is asked."""
    from bot.engine import cuda_ext

    said: list[tuple[str, bool]] = []

    class Extension:
        def __init__(self, name: str) -> None:
            self.name = name

        def set_dependent_launch(self, on: bool) -> None:
            said.append((self.name, on))

    monkeypatch.setattr(cuda_ext, "_loaded", {"rowquant": Extension("rowquant")})
    monkeypatch.setattr(cuda_ext, "_dependent", False)
    monkeypatch.setattr(cuda_ext, "_import_or_build", lambda name, *args: Extension(name))
    monkeypatch.setattr(cuda_ext, "dependent_launch_supported", lambda device: True)
    core = DecodeCore(tiny_model, 2, 65, use_graphs=False)
    assert core.dependent_launch and said == [("rowquant", True)]
    cuda_ext.load("norm", Path("norm.cu"), (), "norm")
    assert said[-1] == ("norm", True)
    assert not core.set_dependent_launch(False) and said[-2:] == [("rowquant", False), ("norm", False)]
    monkeypatch.setattr(cuda_ext, "dependent_launch_supported", lambda device: False)
    assert not DecodeCore(tiny_model, 2, 65, use_graphs=False, dependent_launch=True).dependent_launch
    assert said[-2:] == [("rowquant", False), ("norm", False)]


def test_compiled_steps_take_the_residual_norm_kernels_path(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the residual add + RMSNorm kernel on (off the GPU its torch form
    stands in), every compiled decode step calls it twice a layer and once
    before the head, at one row and at two, and gives the forward's logits.
    A core without the compiled glue does not ask for the kernel at all."""
    from bot.engine import norm

    calls: list[int] = []
    add_rms_norm = norm.add_rms_norm

    def counted(x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.shape[0])
        return add_rms_norm(x, *args)

    monkeypatch.setattr(norm, "add_rms_norm", counted)
    asked: list[int] = []
    monkeypatch.setattr(norm, "supports", lambda *args: asked.append(1) or False)
    eager = DecodeCore(tiny_model, 2, 65, use_graphs=False)
    assert not eager.norm_kernel and asked == []  # nothing would call it: not even built
    core = DecodeCore(tiny_model, 2, 65, use_graphs=False, compile_glue=True)
    assert asked == [1]
    assert not core.norm_kernel  # not built off the GPU
    core.norm_kernel = True
    p = prompts()[1]
    layers = len(core.layers)
    with torch.inference_mode():
        core.prefill(1, [1, 2])
        core.prefill(0, p)
        assert calls == []  # prompts keep their own glue
        one = core.step([7], [len(p)])[0]
        two = core.step([8, 9], [len(p) + 1, 2])
        ref_one = tiny_model(torch.tensor([[*p, 7]])).logits[0, -1]
        ref_two = tiny_model(torch.tensor([[*p, 7, 8]])).logits[0, -1]
        ref_other = tiny_model(torch.tensor([[1, 2, 9]])).logits[0, -1]
    assert calls == [1] * (2 * layers + 1) + [2] * (2 * layers + 1)
    for got, want in ((one, ref_one), (two[0], ref_two), (two[1], ref_other)):
        assert float((got - want).norm() / want.norm()) < 1e-4


def test_compiled_decode_glue_matches_the_forward(tiny_model: Any) -> None:
    """On the GPU a decode step's glue is compiled, rope and the two cache
    writes in one function that writes into the whole caches in place: at
    one row and at two its logits are the forward's, and it leaves the
    caches exactly as the eager step does."""
    compiled = DecodeCore(tiny_model, 2, 65, use_graphs=False, compile_glue=True)
    eager = DecodeCore(tiny_model, 2, 65, use_graphs=False)
    assert compiled.glue is not None and "rope_store" in compiled.glue
    p = prompts()[1]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    with torch.inference_mode():
        for core in (compiled, eager):
            core.prefill(1, [1, 2])
            core.prefill(0, p)
        one = compiled.step([7], [len(p)])[0]
        two = compiled.step([8, 9], [len(p) + 1, 2])
        eager.step([7], [len(p)])
        eager.step([8, 9], [len(p) + 1, 2])
        ref_one = tiny_model(torch.tensor([[*p, 7]])).logits[0, -1]
        ref_two = tiny_model(torch.tensor([[*p, 7, 8]])).logits[0, -1]
        ref_other = tiny_model(torch.tensor([[1, 2, 9]])).logits[0, -1]
    assert rel(one, ref_one) < 1e-4
    assert rel(two[0], ref_two) < 1e-4 and rel(two[1], ref_other) < 1e-4
    assert torch.allclose(compiled.k_cache, eager.k_cache, atol=1e-6)
    assert torch.allclose(compiled.v_cache, eager.v_cache, atol=1e-6)
    assert float(compiled.k_cache[:, 0, :, len(p) + 1].abs().sum()) > 0  # the step's own key was written


def test_compiled_prompt_glue_matches_the_forward_at_every_length(tiny_model: Any) -> None:
    """On the GPU a prompt's glue (rope + layout, residual + RMSNorm, SiLU x
    up) is compiled, the length dynamic from the second length on: its
    prefill logits, at several lengths and for a second chunk onto a cached
    prefix, are the forward's."""
    compiled = DecodeCore(tiny_model, 2, 200, use_graphs=False, compile_glue=True)
    assert compiled.glue is not None and "prompt_rope_qk" in compiled.glue
    compiled.prompt_min_tokens = 16  # longer prompts take the compiled glue (on a GPU: 256)
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for n in (37, 90, 9):  # the last one eager
            ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
            ref = tiny_model(torch.tensor([ids])).logits[0, -1]
            got = compiled.prefill(0, ids)
            assert float((got - ref).norm() / ref.norm()) < 1e-5, n
        ids = torch.randint(1, VOCAB, (120,), generator=gen).tolist()
        compiled.prefill(1, ids[:64])
        got = compiled.prefill(1, ids, start=64)
        ref = tiny_model(torch.tensor([ids])).logits[0, -1]
    assert float((got - ref).norm() / ref.norm()) < 1e-5


async def test_warm_prompts_leave_no_trace(tiny_model: Any, llama_tok: Any) -> None:
    """The start-up warm-up of prompt shapes runs prefills (a chunked one
    too) in the last row and zeroes it: replies afterwards are unchanged."""
    engine = make_engine(tiny_model, llama_tok)
    core, scheduler = engine.core, engine.scheduler
    assert core is not None and scheduler is not None
    scheduler.prefill_chunk = 16
    calls: list[tuple[int, int]] = []
    prefill = core.prefill

    def spy(row: int, ids: Any, start: int = 0) -> torch.Tensor:
        calls.append((len(ids), start))
        return prefill(row, ids, start)

    core.prefill = spy  # type: ignore[method-assign]
    engine.warm_prompts()
    del core.prefill
    # (prompt length, start): prompts over the chunk run as a first chunk and the rest
    assert calls == [(16, 0), (64, 16), (8, 0), (16, 0), (16, 0), (39, 16)]
    assert not bool(core.k_cache[:, -1].any()) and not bool(core.v_cache[:, -1].any())
    await engine.start()
    try:
        p = prompts()[1]
        assert await collect(engine.stream_ids(p, greedy(6))) == reference(tiny_model, p, 6)
    finally:
        await engine.close()


def test_the_idle_warm_up_plans_every_step_shape_shortest_contexts_first(tiny_model: Any) -> None:
    """``DecodeCore.warm_next`` captures, one per call, the graph of every
    (batch bucket, context bucket) a step can take (the capture itself runs
    on a GPU: the benchmark's checks replay such graphs), the shortest
    contexts first, skipping the ones already captured; False at the end."""
    core = DecodeCore(tiny_model, max_batch=5, max_len=700, use_graphs=False)
    assert not core.warm_next()  # without graphs: nothing to capture
    core.use_graphs = True
    captured: list[tuple[int, int]] = []

    def capture(bb: int, ctx: int) -> Any:
        captured.append((bb, ctx))
        core._graphs[(bb, ctx)] = (None, None)  # type: ignore[assignment]

    core._graph = capture  # type: ignore[assignment, method-assign]
    capture(*core.buckets(1, 10))  # the start's one-row graph
    while core.warm_next():
        pass
    shapes = {core.buckets(n, pos) for n in range(1, 6) for pos in range(core.scratch)}
    assert sorted(captured) == sorted(shapes) and len(captured) == len(set(captured))
    assert [ctx for _, ctx in captured[1:]] == sorted(ctx for _, ctx in captured[1:])
    assert core.graphs() == sorted(shapes)
    core.reset_graphs()  # the graphs dropped (a kernel turned off): planned again
    assert core.warm_next() and core.graphs() == [(1, 256)]


async def test_an_idle_engine_warms_between_looks_at_its_inbox(
    tiny_model: Any, llama_tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The decode thread calls ``warm_next`` only while nothing decodes or
    waits, serves a request that arrives meanwhile after at most the capture
    in progress, stops once it returns False, and a capture that fails is
    logged and ends the warm-up without touching the replies."""
    engine = make_engine(tiny_model, llama_tok)
    core, scheduler = engine.core, engine.scheduler
    assert core is not None and scheduler is not None
    busy: list[tuple[int, bool]] = []  # (rows live, a prompt filling) at each call
    left = [6]

    def warm_next() -> bool:
        busy.append((len(scheduler._live), scheduler._filling is not None))
        time.sleep(0.05)  # a capture
        left[0] -= 1
        return left[0] > 0

    core.warm_next = warm_next  # type: ignore[method-assign]
    await engine.start()
    try:
        for _ in range(100):
            if busy:
                break
            await asyncio.sleep(0.01)
        p = prompts()[0]
        assert await collect(engine.stream_ids(p, greedy(8))) == reference(tiny_model, p, 8)
        assert len(busy) < 6  # served in the warm-up, not after it
        for _ in range(200):
            if not scheduler.warm_idle:
                break
            await asyncio.sleep(0.01)
        assert len(busy) == 6 and set(busy) == {(0, False)}
        await asyncio.sleep(0.6)  # an idle admission wait: no more calls
        assert len(busy) == 6

        def broken() -> bool:
            raise RuntimeError("CUDA error: out of memory")

        core.warm_next = broken  # type: ignore[method-assign]
        scheduler.warm_idle = True
        for _ in range(100):
            if not scheduler.warm_idle:
                break
            await asyncio.sleep(0.01)
        assert not scheduler.warm_idle
        assert "capturing a decode step's graph while idle failed" in caplog.text
        assert await collect(engine.stream_ids(p, greedy(8))) == reference(tiny_model, p, 8)
    finally:
        await engine.close()
