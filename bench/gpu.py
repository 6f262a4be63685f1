"""GPU benchmark: a Xwin-70B-shaped GPTQ checkpoint through the bot's own code.

    python -m bench.gpu                 # on a GPU machine (see docs/benchmarks.md)
    python -m bench.gpu --tiny          # small, on the CPU (CI)

Steps, each printed as a row of one table at the end:

1. measured device-to-device copy bandwidth (bytes read + written);
2. build (or reuse) a synthetic GPTQ checkpoint with Xwin-LM-70B's shapes
   (80 layers, hidden 8192, intermediate 28672, 64/8 heads, vocab 32000,
   4-bit, group 128) and random int4 weights, plus a Llama-style tokenizer;
3. load it with the project's loader (``TransformersEngine._load``:
   ``AutoModelForCausalLM.from_pretrained`` + ``GPTQConfig(backend=...)``);
4. check the batched decode path against transformers' own forward;
5. one conversation: decode ms/step, tokens/s; TTFT of a 1,000-token prompt;
6. 1/4/16/32 concurrent conversations through the engine alone, through the
   bot's worker (``Bot.handle`` -> store -> ``Worker`` -> engine), and through
   plain sequential ``generate()`` (the seed's way), with % of the floor.

``--tiny`` builds a 2-layer random Llama (no GPTQ) and runs every row small,
so the script cannot rot; tests/test_bench_cpu.py runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Before torch is imported: the CUDA caching allocator without expandable
# segments (GPTQModel sets them on when unset), plain graph pools.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")

import torch

from bot.config import BotConfig, Config, GenerationConfig, ModelConfig, settings_from_generation
from bot.engine.base import StreamStats
from bot.engine.batched import BatchedEngine
from bot.engine.transformers import TransformersEngine, generation_kwargs
from bot.types import ConversationKey, Incoming, Settings

RECIPE = 4  # bump when the checkpoint recipe changes


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    group: int
    context: int
    gptq: bool
    desc_act: bool = False  # act order: g_idx a permutation's groups (no effect at group -1)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def groups(self, fin: int) -> int:
        """Quantization groups along an input dimension of ``fin`` (1 at group size -1)."""
        return 1 if self.group <= 0 else fin // self.group


# The reference checkpoint, TheBloke/Xwin-LM-70B-V0.1-GPTQ branch main: 4 bits,
# group size -1 (one scale per column), act order, GPTQ v1 zero points, sym.
XWIN_70B = Shape(80, 8192, 28672, 64, 8, 32000, -1, 4096, True, desc_act=True)
# Its branch gptq-4bit-128g-actorder_True: `--group 128`.
TINY = Shape(2, 64, 160, 4, 2, 512, 32, 512, False)


# -- the checkpoint -----------------------------------------------------------


def build_tokenizer(vocab: int) -> Any:
    """A Llama-style tokenizer (``<unk> <s> </s>``, 256 byte tokens, words),
    made here: word ``w{i}`` is one token, decoding uses byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        words[f"<0x{b:02X}>"] = len(words)
    i = 0
    while len(words) < vocab:
        words[f"▁w{i}"] = len(words)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )


def _llama_config(shape: Shape) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


def build_checkpoint(dest: Path, shape: Shape, seed: int = 0) -> float:
    """Write the checkpoint unless one with this recipe is there; seconds spent."""
    marker = dest / "bench-recipe.json"
    want = {"recipe": RECIPE, "shape": shape.__dict__}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    build_tokenizer(shape.vocab).save_pretrained(dest)
    if not shape.gptq:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = _llama_config(shape)
        cfg["torch_dtype"] = "float32"
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        model.save_pretrained(dest)
        marker.write_text(json.dumps(want))
        return time.perf_counter() - t0

    from safetensors.torch import save_file

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, m, kvd = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    projs = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kvd),
        "self_attn.v_proj": (h, kvd),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, m),
        "mlp.up_proj": (h, m),
        "mlp.down_proj": (m, h),
    }
    weight_map: dict[str, str] = {}

    def rand_i32(*size: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31 - 1, size, dtype=torch.int32, device=dev, generator=gen)

    def rand_f16(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(size, device=dev, generator=gen) * std).half()

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(dest / name))
        weight_map.update({k: name for k in tensors})

    for i in range(shape.layers):
        t: dict[str, torch.Tensor] = {}
        for name, (fin, fout) in projs.items():
            p = f"model.layers.{i}.{name}"
            t[p + ".qweight"] = rand_i32(fin // 8, fout)
            # zero point 8 (stored as 7 in the GPTQ v1 format); scale 1/(4 x 4.6 sqrt(in)):
            # each layer adds a quarter of unit variance (80 layers at full scale overflow fp16)
            ng = shape.groups(fin)
            t[p + ".qzeros"] = torch.full((ng, fout // 8), 0x77777777, dtype=torch.int32, device=dev)
            base = 0.25 / (4.6 * math.sqrt(fin))
            t[p + ".scales"] = (
                base * (0.5 + torch.rand((ng, fout), device=dev, generator=gen))
            ).half()
            t[p + ".g_idx"] = _g_idx(fin, ng, shape.desc_act, gen, dev)
        ones = torch.ones(h, dtype=torch.float16, device=dev)
        t[f"model.layers.{i}.input_layernorm.weight"] = ones
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = ones.clone()
        save(f"layer-{i:03d}.safetensors", t)
    save(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": rand_f16(shape.vocab, h, std=1.0),
            "model.norm.weight": torch.ones(h, dtype=torch.float16, device=dev),
            "lm_head.weight": rand_f16(shape.vocab, h, std=1.0 / math.sqrt(h)),
        },
    )
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=0)
    )
    cfg = _llama_config(shape)
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": shape.group,
        "desc_act": shape.desc_act,
        "sym": True,
        "damp_percent": 0.1,
        "checkpoint_format": "gptq",
    }
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    (dest / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )
    marker.write_text(json.dumps(want))
    return time.perf_counter() - t0


def _g_idx(fin: int, groups: int, desc_act: bool, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Each input row's group. With act order, GPTQ quantizes the rows in a
    permuted order (largest Hessian diagonal first) and stores the original
    order: a row's group is its rank in the permutation // group size."""
    if groups == 1:
        return torch.zeros(fin, dtype=torch.int32, device=dev)
    rank = torch.arange(fin, device=dev)
    if desc_act:
        rank = torch.argsort(torch.randperm(fin, device=dev, generator=gen))
    return (rank // (fin // groups)).to(torch.int32)


# -- measurements -------------------------------------------------------------


def copy_bandwidth(dev: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    if dev.type != "cuda":
        a = torch.rand(16 * 2**20)
        b = torch.empty_like(a)
        t0 = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        return 5 * 2 * a.numel() * 4 / (time.perf_counter() - t0)
    n = 2**30  # 1 GiB
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        e0 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        e1 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(float(e0.elapsed_time(e1)) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def weight_bytes(shape: Shape) -> float:
    """Bytes of weights one decode step reads (int4 + fp16 scales/zeros, lm_head)."""
    h, m, kvd = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = 0.0
    for fin, fout in ((h, h), (h, kvd), (h, kvd), (h, h), (h, m), (h, m), (m, h)):
        if shape.gptq:
            per_layer += fin * fout / 2 + shape.groups(fin) * fout * (2 + 0.5)
        else:
            per_layer += fin * fout * 4
        per_layer += 2 * h * 2
    head = shape.vocab * h * (2 if shape.gptq else 4)
    return shape.layers * per_layer + head


def kv_bytes_per_token(shape: Shape) -> float:
    return 2.0 * shape.layers * shape.kv_heads * shape.head_dim * (2 if shape.gptq else 4)


@dataclass
class RunResult:
    n: int
    tokens: int
    wall_s: float
    decode_ms_per_token: float  # mean over conversations, first -> last token
    ttft_s: float  # median over conversations, from submission
    decode_tok_s: float  # sum over conversations of their decode rates
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def _summarize(n: int, stats: list[StreamStats], wall: float) -> RunResult:
    per_tok = [
        (s.total_s - s.first_token_s) / (s.new_tokens - 1) for s in stats if s.new_tokens > 1
    ]
    rates = [1.0 / x for x in per_tok if x > 0]
    firsts = sorted(s.first_token_s for s in stats)
    return RunResult(
        n=n,
        tokens=sum(s.new_tokens for s in stats),
        wall_s=wall,
        decode_ms_per_token=1e3 * statistics.mean(per_tok) if per_tok else 0.0,
        ttft_s=statistics.median([s.first_token_s for s in stats]) if stats else 0.0,
        decode_tok_s=sum(rates),
        extra={"ttft_p90_s": firsts[min(len(firsts) - 1, int(0.9 * len(firsts)))] if firsts else 0.0},
    )


def random_prompt(rng: torch.Generator, length: int, vocab: int) -> list[int]:
    ids: list[int] = torch.randint(259, vocab, (length - 1,), generator=rng).tolist()
    return [1, *ids]


async def engine_run(
    engine: BatchedEngine, prompts: list[list[int]], settings: Settings, cold: bool = True
) -> RunResult:
    """N conversations straight into the engine (text streams, detok included),
    cold: no prefix of theirs is reused from earlier runs."""
    engine.finished.clear()
    if cold and engine.scheduler is not None:
        engine.scheduler.prefix.clear()

    async def one(p: list[int]) -> None:
        async for _ in engine.stream(p, settings):
            pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    res = _summarize(len(prompts), list(engine.finished), wall)
    core = engine.core
    if core is not None:  # the GPU time of one step alone, at this batch and context
        ctx = len(prompts[0]) + settings.max_new_tokens // 2
        res.extra["graph_step_ms"] = 1e3 * await asyncio.to_thread(core.time_step, len(prompts), ctx)
    return res


class _BenchSink:
    update_interval = 1.0

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.text = ""
        self.error = ""

    async def queued(self, position: int) -> None:
        return None

    async def started(self) -> None:
        return None

    async def update(self, text_so_far: str) -> None:
        return None

    async def finish(self, text: str) -> None:
        self.text = text
        self.done.set()

    async def fail(self, user_message: str) -> None:
        self.error = user_message
        self.done.set()


def worker_texts(n: int, words: int, vocab: int) -> list[str]:
    rng = torch.Generator().manual_seed(n)
    out = []
    for _ in range(n):
        ws = torch.randint(0, vocab - 300, (words,), generator=rng)
        out.append(" ".join(f"w{int(w)}" for w in ws))
    return out


def worker_prompt_ids(engine: BatchedEngine, texts: list[str], settings: Settings) -> list[list[int]]:
    """The ids the worker's PromptBuilder makes of these messages (a DM each)."""
    from bot.prompt import PromptBuilder
    from bot.types import Turn

    builder = PromptBuilder(engine.tokenizer, fmt=engine.prompt_format, context_length=engine.context_length)
    return [builder.build([Turn("user", t, "user", "m")], settings, is_dm=True).ids for t in texts]


async def worker_run(
    engine: BatchedEngine, texts: list[str], gen: GenerationConfig, db_dir: Path, tag: str
) -> RunResult:
    """N conversations through the bot: Bot.handle -> store -> Worker -> engine."""
    from bot.app import Bot
    from bot.store import Store

    n = len(texts)
    config = Config(
        model=engine.config,
        generation=gen,
        bot=BotConfig(database=str(db_dir / f"bench-{tag}.sqlite3"), max_queue=4 * n + 8,
                      max_pending_per_user=4 * n + 8),
    )
    engine.finished.clear()
    if engine.scheduler is not None:  # as cold as the engine's own run of these prompts
        engine.scheduler.prefix.clear()
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, engine)
        await bot.start()
        sinks = []
        t0 = time.perf_counter()
        for i, text in enumerate(texts):
            key = ConversationKey("console", "bench", f"{tag}-{i}", "")
            sink = _BenchSink()
            sinks.append(sink)
            incoming = Incoming(key, f"m{tag}{i}", f"user{i}", f"user{i}", text, True, time.time())
            await bot.handle(incoming, sink)
        await asyncio.gather(*(s.done.wait() for s in sinks))
        wall = time.perf_counter() - t0
        errors = [s.error for s in sinks if s.error]
        await bot.worker.stop()
    result = _summarize(n, list(engine.finished), wall)
    result.extra["errors"] = errors
    return result


class _TimingStreamer:
    def __init__(self) -> None:
        self.skipped = False
        self.first = 0.0
        self.count = 0

    def put(self, value: Any) -> None:
        if not self.skipped:
            self.skipped = True
            return
        if self.count == 0:
            self.first = time.perf_counter()
        self.count += int(value.numel())

    def end(self) -> None:
        return None


def generate_run(
    model: Any, tokenizer: Any, prompts: list[list[int]], settings: Settings, measured: int
) -> RunResult:
    """The seed's way: one ``generate()`` after another (EOS ignored). Only the
    first ``measured`` conversations run; the rest would take as long each."""
    stats: list[StreamStats] = []
    t0 = time.perf_counter()
    for p in prompts[:measured]:
        kw = generation_kwargs(settings, tokenizer)
        kw["min_new_tokens"] = settings.max_new_tokens
        streamer = _TimingStreamer()
        start = time.perf_counter()
        inputs = torch.tensor([p], device=model.device)
        with torch.inference_mode():
            model.generate(inputs, attention_mask=torch.ones_like(inputs), streamer=streamer, **kw)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        # the time a conversation waits behind the earlier ones counts in its TTFT
        stats.append(StreamStats(len(p), streamer.count, streamer.first - t0, end - t0))
        del start
    wall = time.perf_counter() - t0
    n = len(prompts)
    if measured < n:  # sequential: each further conversation costs the same again
        wall *= n / measured
    res = _summarize(n, stats, wall)
    res.tokens = settings.max_new_tokens * n
    # one conversation at a time: the aggregate decode rate is one conversation's
    res.decode_tok_s = 1e3 / res.decode_ms_per_token if res.decode_ms_per_token > 0 else 0.0
    res.extra["measured"] = min(measured, n)
    return res


def generate_batch_run(model: Any, prompts: list[list[int]], new_tokens: int) -> RunResult:
    """transformers' own continuous batching (``generate_batch``: paged
    attention, its own scheduler), greedy, all prompts submitted together.
    Its TTFT is not observable from outside: the median is left at 0."""
    import inspect

    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    accepted = inspect.signature(model.generate_batch).parameters
    kw: dict[str, Any] = {k: v for k, v in {"progress_bar": False}.items() if k in accepted}
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    # not under inference_mode: its scheduler thread updates tensors made here
    with torch.no_grad():
        out = model.generate_batch(inputs=prompts, generation_config=cfg, **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(getattr(o, "generated_tokens", []) or []) for o in out.values())
    return RunResult(len(prompts), tokens, wall, 0.0, 0.0, tokens / wall if wall > 0 else 0.0)


def check_logits(engine: BatchedEngine, model: Any, vocab: int, length: int) -> tuple[float, float]:
    """Relative error of the batched path's logits against transformers'
    forward: after a prefill, and after one graph-replayed decode step of two rows."""
    core = engine.core
    assert core is not None
    rng = torch.Generator().manual_seed(1)
    pa = random_prompt(rng, length, vocab)
    pb = random_prompt(rng, length // 2, vocab)
    nxt = [300, 301]
    with torch.inference_mode():
        la = core.prefill(0, pa)
        core.prefill(1, pb)
        step = core.step(nxt, [len(pa), len(pb)]).float()
        ref_a = model(torch.tensor([[*pa, nxt[0]]], device=model.device)).logits[0].float()
        ref_b = model(torch.tensor([[*pb, nxt[1]]], device=model.device)).logits[0].float()

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    prefill_err = rel(la.float(), ref_a[-2])
    step_err = max(rel(step[0], ref_a[-1]), rel(step[1], ref_b[-1]))
    return prefill_err, step_err


async def followup_run(
    engine: BatchedEngine, res: dict[str, Any], rng: torch.Generator, total: int, vocab: int,
    settings: Settings,
) -> None:
    """A thread of ``total`` tokens: a prompt of ``total - 40`` tokens gets a
    20-token reply; then the follow-up (prompt + reply + 20 new tokens) is
    sent. Its TTFT, with the parked row's keys and values reused, against the
    first prompt's (everything prefilled)."""
    history = random_prompt(rng, total - 40, vocab)
    engine.finished.clear()
    assert engine.scheduler is not None
    engine.scheduler.prefix.clear()
    reply = [t async for chunk in engine.stream_ids(history, replace(settings, max_new_tokens=20))
             for t in chunk]
    cold = engine.finished[-1].first_token_s
    before = engine.scheduler.prefix.reused_tokens
    follow = [*history, *reply, *random_prompt(rng, 21, vocab)[1:]]
    r = await engine_run(engine, [follow], replace(settings, max_new_tokens=1), cold=False)
    res["ttft_followup_s"] = r.ttft_s
    res["ttft_thread_cold_s"] = cold
    res["followup_reused_tokens"] = engine.scheduler.prefix.reused_tokens - before
    log(f"follow-up of {len(follow)} tokens: TTFT {r.ttft_s * 1e3:.0f} ms with "
        f"{res['followup_reused_tokens']} reused; its thread's first prompt ({len(history)} tokens) "
        f"{cold * 1e3:.0f} ms")


def check_long_prefill(engine: BatchedEngine, model: Any, vocab: int, length: int) -> float:
    """Relative error against transformers' forward of a long prompt's
    prefill logits (through the prompt-time twins where the engine has them)
    and of 20 more tokens prefilled onto the same row (prefix reuse)."""
    from bot.engine.fidelity import forward_logits, relative_error

    core = engine.core
    assert core is not None
    ids = random_prompt(torch.Generator().manual_seed(2), length, vocab)
    with torch.inference_mode():
        got = core.prefill(0, ids)
        err = relative_error(got, forward_logits(model, ids)[-1])
        # the same row extended by 20 tokens, as a follow-up reusing its prefix is
        more = [*ids, *random_prompt(torch.Generator().manual_seed(4), 21, vocab)[1:]]
        ext = core.prefill(0, more, start=len(ids))
        return max(err, relative_error(ext, forward_logits(model, more)[-1]))


# -- the run ------------------------------------------------------------------


@dataclass
class Options:
    tiny: bool
    checkpoint: Path
    backend: str
    layers: int
    batches: list[int]
    prompt_tokens: int
    new_tokens: int
    ttft_tokens: int
    baseline_tokens: int
    baseline_max: int
    out: Path | None
    no_compile: bool
    group: int = 0
    followup_tokens: int = 0


def parse(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tiny", action="store_true", help="small CPU run (CI)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="where the synthetic checkpoint lives")
    ap.add_argument("--backend", default="marlin", help="GPTQ kernel: marlin, exllama_v2, triton, torch")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (quick tries)")
    ap.add_argument("--followup-tokens", type=int, default=3020,
                    help="TTFT of a thread this long (3,000 tokens of history + 20 new)")
    ap.add_argument("--group", type=int, default=0,
                    help="GPTQ group size (default -1, the reference; 128: its 128g act-order branch)")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--prompt-tokens", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=0)
    ap.add_argument("--ttft-tokens", type=int, default=0)
    ap.add_argument("--baseline-tokens", type=int, default=0)
    ap.add_argument("--baseline-max", type=int, default=0, help="sequential generate() runs at most")
    ap.add_argument("--no-compile", action="store_true", help="decode without the torch.compile'd glue")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    a = ap.parse_args(argv)
    tiny = bool(a.tiny)
    default_ckpt = Path(tempfile.gettempdir()) / ("xwin-bench-tiny" if tiny else "xwin-bench-70b")
    if not tiny and Path("/dev/shm").is_dir():
        import shutil

        need = weight_bytes(replace(XWIN_70B, layers=a.layers or XWIN_70B.layers)) * 1.1
        if shutil.disk_usage("/dev/shm").free > need:  # RAM-backed: fast to write and read
            default_ckpt = Path(f"/dev/shm/xwin-bench-70b-g{a.group or -1}")
    return Options(
        tiny=tiny,
        checkpoint=a.checkpoint or default_ckpt,
        backend=a.backend,
        layers=a.layers,
        batches=[int(x) for x in a.batches.split(",")],
        prompt_tokens=a.prompt_tokens or (24 if tiny else 1024),
        new_tokens=a.new_tokens or (8 if tiny else 128),
        ttft_tokens=a.ttft_tokens or (64 if tiny else 1000),
        baseline_tokens=a.baseline_tokens or (8 if tiny else 16),
        baseline_max=a.baseline_max or (32 if tiny else 8),
        out=a.out,
        no_compile=bool(a.no_compile),
        group=a.group,
        followup_tokens=100 if tiny else a.followup_tokens,
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def main_async(opt: Options) -> dict[str, Any]:
    shape = TINY if opt.tiny else XWIN_70B
    if opt.layers:
        shape = replace(shape, layers=opt.layers)
    if opt.group and shape.gptq:
        shape = replace(shape, group=opt.group)
    cuda = torch.cuda.is_available() and not opt.tiny
    dev = torch.device("cuda:0" if cuda else "cpu")
    res: dict[str, Any] = {"shape": shape.__dict__, "backend": opt.backend if shape.gptq else "none"}
    res["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    import transformers

    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import gptqmodel

        res["versions"]["gptqmodel"] = gptqmodel.__version__
    except Exception:
        pass

    if cuda:
        _free, total = torch.cuda.mem_get_info()
        res["gpu_mem_gb"] = total / 1e9
    bw = copy_bandwidth(dev)
    res["copy_bandwidth_gbs"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s on {res['device']}")

    res["build_s"] = build_checkpoint(opt.checkpoint, shape)
    log(f"checkpoint at {opt.checkpoint} (built in {res['build_s']:.1f} s)")

    max_batch = max(opt.batches)
    ctx_needed = max(opt.prompt_tokens + opt.new_tokens + 64, opt.ttft_tokens + 8, opt.followup_tokens + 8)
    mcfg = ModelConfig(
        id=str(opt.checkpoint),
        device_map="cuda:0" if cuda else "cpu",
        dtype="float16" if cuda else "float32",
        gptq_backend=opt.backend if shape.gptq else "auto",  # type: ignore[arg-type]
        max_batch=max_batch,
        context_length=shape.context,
    )
    t0 = time.perf_counter()
    loader = TransformersEngine(mcfg)
    loader.keep_prefill_twins = True  # as BatchedEngine loads
    loader.load()  # the project's loading code path
    res["load_s"] = time.perf_counter() - t0
    model, tok = loader.model, loader.tokenizer
    res["kernel"] = loader.describe().get("gptq kernel", "")
    log(f"loaded in {res['load_s']:.1f} s, kernel {res['kernel'] or '-'}")

    cache_len = 256 * math.ceil((ctx_needed + 1) / 256) + 1
    engine = BatchedEngine.over(
        model, tok, mcfg, eos_ids=(), max_len=cache_len, compile_glue=cuda and not opt.no_compile
    )
    core = engine.core
    assert core is not None
    core.set_prefill_twins(loader.prefill_twins)
    res["cache_len"] = cache_len
    t0 = time.perf_counter()
    pe, se = check_logits(engine, model, shape.vocab, 48)
    le = check_long_prefill(engine, model, shape.vocab, opt.ttft_tokens)
    if not (pe < 1e-2 and se < 1e-2 and le < 1e-2):
        log("WARNING: the batched path does not match transformers' forward")
    res["check_prefill_rel_err"], res["check_step_rel_err"] = pe, se
    res["check_long_prefill_rel_err"] = le
    log(f"check vs transformers forward: prefill rel err {pe:.2e}, decode step {se:.2e}, "
        f"{opt.ttft_tokens}-token prefill {le:.2e}")
    ctxs = sorted(range(opt.prompt_tokens + 1, opt.prompt_tokens + opt.new_tokens + 48, 256))
    core.warmup(sorted(set(opt.batches) | {1}), ctxs)
    engine._description = loader.describe()
    res["load_check"] = engine.verify(loader.probe_logits)  # the engine's own start-up check
    log(f"load check (batched vs forward, probe prompt): {res['load_check']}")
    res["capture_s"] = time.perf_counter() - t0
    log(f"graphs captured in {core.capture_s:.1f} s (compiled glue: {core.glue is not None})")

    gen = GenerationConfig(max_new_tokens=opt.new_tokens)
    settings = settings_from_generation(gen)
    await engine.start()
    rng = torch.Generator().manual_seed(0)

    # TTFT, 1 conversation, max_new_tokens=1
    ttfts = []
    long_prompt = random_prompt(rng, opt.ttft_tokens, shape.vocab)
    for _ in range(3):
        r = await engine_run(engine, [long_prompt], replace(settings, max_new_tokens=1))
        ttfts.append(r.ttft_s)
    res["ttft_s"] = statistics.median(ttfts)
    log(f"TTFT {opt.ttft_tokens} tokens: {res['ttft_s'] * 1e3:.0f} ms")
    # a follow-up of 20 tokens in a thread with 3,000 tokens of history: with
    # no prefix cache the whole thread is prefilled again
    if opt.followup_tokens:
        await followup_run(engine, res, rng, opt.followup_tokens, shape.vocab, settings)

    runs: dict[str, dict[int, RunResult]] = {"engine": {}, "worker": {}, "generate": {}, "generate_batch": {}}
    words = max(1, opt.prompt_tokens - 45)  # the worker's prompt adds the system prompt
    # warm-up at the run's shapes (first-use kernel selection stays out of the numbers)
    await engine_run(engine, worker_prompt_ids(engine, worker_texts(1, words, shape.vocab), settings),
                     replace(settings, max_new_tokens=4))
    with tempfile.TemporaryDirectory() as db_dir:
        for n in opt.batches:
            texts = worker_texts(n, words, shape.vocab)
            prompts = worker_prompt_ids(engine, texts, settings)  # the same ids the worker sends
            res.setdefault("prompt_len", {})[n] = statistics.mean(len(p) for p in prompts)
            runs["engine"][n] = await engine_run(engine, prompts, settings)
            log(f"engine  n={n}: {runs['engine'][n]}")
            try:
                runs["worker"][n] = await worker_run(engine, texts, gen, Path(db_dir), f"n{n}")
            except Exception as exc:  # keep the other rows
                log(f"worker n={n} failed: {exc!r}")
                runs["worker"][n] = RunResult(n, 0, 0.0, 0.0, 0.0, 0.0, {"error": repr(exc)})
            log(f"worker  n={n}: {runs['worker'][n]}")
    await engine.close()
    # where a decode step's time goes: the quantized products alone, and the
    # step with the module's own RMSNorm instead of the fused one
    diag: dict[str, float] = {}
    glued = core.glue is not None
    for n in sorted({min(opt.batches), max(opt.batches)}):
        ctx = opt.prompt_tokens + opt.new_tokens // 2
        diag[f"gemms_ms_{n}"] = 1e3 * core.time_gemms(n)
        diag[f"step_ms_{n}"] = 1e3 * core.time_step(n, ctx)
        core.set_compiled_glue(False)
        diag[f"step_plain_ms_{n}"] = 1e3 * core.time_step(n, ctx)  # fused RMSNorm only
        core.fused_norm = False
        core.reset_graphs()
        diag[f"step_module_norm_ms_{n}"] = 1e3 * core.time_step(n, ctx)
        core.fused_norm = True
        core.set_compiled_glue(glued)  # drops the graphs too
    res["diag"] = diag
    log(f"diagnostics: {diag}")
    res["decode_steps"] = engine.scheduler.steps if engine.scheduler else 0

    base_settings = replace(settings, max_new_tokens=opt.baseline_tokens)
    generate_run(model, tok, [long_prompt[: opt.prompt_tokens]], replace(base_settings, max_new_tokens=2), 1)
    for n in opt.batches:
        prompts = [random_prompt(rng, opt.prompt_tokens, shape.vocab) for _ in range(n)]
        runs["generate"][n] = generate_run(model, tok, prompts, base_settings, opt.baseline_max)
        log(f"generate n={n}: {runs['generate'][n]}")
    # transformers' own continuous batching, same checkpoint, same prompt lengths
    # (at the largest batch only: eager, it is slow; ~20 s a call on the CPU)
    for i, n in enumerate([] if opt.tiny else [0, max(opt.batches)]):
        prompts = [random_prompt(rng, opt.prompt_tokens, shape.vocab) for _ in range(max(n, 1))]
        try:
            r = generate_batch_run(model, prompts, opt.baseline_tokens * 4 if n else 4)
        except Exception as exc:  # keep the other rows
            log(f"generate_batch n={n} failed: {exc!r}")
            r = RunResult(n, 0, 0.0, 0.0, 0.0, 0.0, {"error": repr(exc)[:300]})
        if i:  # the first call is a warm-up
            runs["generate_batch"][n] = r
            log(f"generate_batch n={n}: {r}")
    # TTFT of the seed's way
    r = generate_run(model, tok, [long_prompt], replace(settings, max_new_tokens=1), 1)
    res["ttft_generate_s"] = r.ttft_s

    wbytes = weight_bytes(shape)
    kvb = kv_bytes_per_token(shape)
    res["weight_gb"] = wbytes / 1e9
    mean_ctx = opt.prompt_tokens + opt.new_tokens / 2

    def floor_tok_s(n: int) -> float:
        return n * bw / (wbytes + n * mean_ctx * kvb)

    res["runs"] = {
        kind: {
            str(n): {
                **r.__dict__,
                "wall_tok_s": r.wall_tok_s,
                "floor_tok_s": floor_tok_s(n),
            }
            for n, r in by_n.items()
        }
        for kind, by_n in runs.items()
    }
    res["options"] = {k: str(v) for k, v in opt.__dict__.items()}
    one = runs["engine"].get(1)
    res["single_ms_step"] = one.decode_ms_per_token if one else 0.0
    res["table"] = table(res, opt)
    return res


def _graph_ms(res: dict[str, Any], n: int) -> float:
    run = res["runs"]["engine"].get(str(n), {})
    return float(run.get("extra", {}).get("graph_step_ms", 0.0))


def table(res: dict[str, Any], opt: Options) -> str:
    bw = res["copy_bandwidth_gbs"]
    s = res["shape"]
    lines = [
        f"device: {res['device']}  kernel: {res['kernel'] or '-'}  versions: {res['versions']}",
        f"model: {s['layers']} layers, hidden {s['hidden']}, inter {s['intermediate']}, "
        f"heads {s['heads']}/{s['kv_heads']}, vocab {s['vocab']}; weights read/step "
        f"{res['weight_gb']:.2f} GB; prompts {opt.prompt_tokens} tok, {opt.new_tokens} new "
        f"(generate(): {opt.baseline_tokens} new)",
        f"check vs transformers: prefill rel err {res['check_prefill_rel_err']:.1e}, "
        f"graph decode step {res['check_step_rel_err']:.1e}, "
        f"{opt.ttft_tokens}-token prefill {res['check_long_prefill_rel_err']:.1e}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| copy bandwidth (read+write) | {bw:.0f} GB/s |",
        f"| decode, 1 conversation | {res['single_ms_step']:.1f} ms/step, "
        f"{1e3 / max(res['single_ms_step'], 1e-9):.1f} tok/s |",
        f"| decode step alone (graph replay), {min(opt.batches)} / {max(opt.batches)} conversations | "
        f"{_graph_ms(res, min(opt.batches)):.2f} / {_graph_ms(res, max(opt.batches)):.2f} ms |",
        f"| TTFT, {opt.ttft_tokens}-token prompt | {res['ttft_s'] * 1e3:.0f} ms "
        f"(generate(): {res['ttft_generate_s'] * 1e3:.0f} ms) |",
        f"| TTFT, follow-up of 20 tokens in a {opt.followup_tokens}-token thread | "
        f"{res.get('ttft_followup_s', 0.0) * 1e3:.0f} ms ({res.get('followup_reused_tokens', 0)} tokens "
        f"reused; the thread's first prompt: {res.get('ttft_thread_cold_s', 0.0) * 1e3:.0f} ms) |",
        "",
        "| conversations | path | wall tok/s | decode tok/s | ms/token each | TTFT median (p90) | "
        "% of floor | worker/engine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = res["runs"]
    for n in opt.batches:
        key = str(n)
        eng = runs["engine"][key]
        for kind in ("engine", "worker", "generate", "generate_batch"):
            r = runs[kind].get(key)
            if r is None:
                continue
            ratio = (f"{r['wall_tok_s'] / eng['wall_tok_s']:.3f}"
                     if kind == "worker" and eng["wall_tok_s"] > 0 else "")
            label = {"engine": "batched engine", "worker": "bot worker + engine",
                     "generate": "sequential generate()",
                     "generate_batch": "transformers generate_batch"}[kind]
            if kind == "generate" and r["extra"].get("measured", n) < n:
                label += f" ({r['extra']['measured']} run, rest scaled)"
            if r["extra"].get("error"):
                label += " (failed: " + r["extra"]["error"][:80] + ")"
            pct = 100 * r["decode_tok_s"] / r["floor_tok_s"]
            lines.append(
                f"| {n} | {label} | {r['wall_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                f"{r['decode_ms_per_token']:.1f} | {r['ttft_s'] * 1e3:.0f} ms "
                f"(p90 {r['extra'].get('ttft_p90_s', 0.0) * 1e3:.0f}) | {pct:.0f}% | {ratio} |"
            )
    lines.append("")
    d = res.get("diag", {})
    for n in sorted({min(opt.batches), max(opt.batches)}):
        if f"gemms_ms_{n}" in d:
            lines.append(
                f"step at {n}: {d[f'step_ms_{n}']:.2f} ms as run; without compiled glue "
                f"{d[f'step_plain_ms_{n}']:.2f} ms; also with the module's RMSNorm "
                f"{d[f'step_module_norm_ms_{n}']:.2f} ms; its GPTQ products alone "
                f"{d[f'gemms_ms_{n}']:.2f} ms"
            )
    lines.append(
        "floor: N x copy bandwidth / (weight bytes + N x context x KV bytes/token); "
        "decode tok/s: sum over conversations of (tokens-1)/(last-first token time); "
        "wall tok/s: all new tokens / (first submission -> last token), prefill included"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opt = parse(argv)
    res = asyncio.run(main_async(opt))
    print(res["table"], flush=True)
    if opt.out is not None:
        opt.out.parent.mkdir(parents=True, exist_ok=True)
        opt.out.write_text(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
