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
6. 1/4/16/32 concurrent conversations through the engine alone and through the
   bot's worker (``Bot.handle`` -> store -> ``Worker`` -> engine), alternately
   ``--pairs`` times each (worker/engine: the median of the pairs' ratios), and through
   plain sequential ``generate()`` (the seed's way), with % of the floor and
   each conversation's longest wait between two tokens (median and max);
7. with ``--chunk-variants 256,512,0``: the largest batch's burst again,
   engine only, once per prefill chunk (0: off), to show what chunked
   prefill does to those waits, ms/token and TTFT; with ``--mixed-variants
   apart,mixed`` each chunk both ways (a prefill then a step, or the two in
   one forward: ``[model] mixed_prefill``); with ``--short-burst 100`` a
   burst of as many prompts of ~100 tokens, both ways.

``--tiny`` builds a 2-layer random Llama (no GPTQ) and runs every row small,
so the script cannot rot; tests/test_bench_cpu.py runs it.

This module is the command line that ties the steps together:
``bench.gpu_checkpoint`` (the synthetic checkpoint), ``bench.gpu_measure``
(every measurement) and ``bench.gpu_report`` (the table).
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

from bench.gpu_checkpoint import (
    TINY,
    XWIN_70B,
    build_checkpoint,
    kv_bytes_per_token,
    weight_bytes,
)
from bench.gpu_measure import (
    RunResult,
    batch_kernel_steps,
    check_logits,
    check_long_prefill,
    chunk_variants,
    copy_bandwidth,
    dense_variants,
    dependent_launch_pairs,
    engine_run,
    followup_run,
    fresh_length_ttft,
    generate_batch_run,
    generate_run,
    log,
    one_conversation_diagnostics,
    paired_runs,
    production_free,
    random_prompt,
    sampler_waits,
    step_breakdown,
    time_sampler,
    ttft_median,
    worker_prompt_ids,
    worker_texts,
)
from bench.gpu_report import table
from bot.config import GenerationConfig, ModelConfig, settings_from_generation
from bot.engine.batched import BatchedEngine
from bot.engine.transformers import TransformersEngine


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
    no_peers: bool = False
    group: int = 0
    followup_tokens: int = 0
    prefill_chunk: int = ModelConfig.prefill_chunk  # [model] prefill_chunk of the engine
    chunk_variants: list[int] = field(default_factory=list)  # the largest burst again at each (0: off)
    mixed_variants: list[bool] = field(default_factory=list)  # ... and each way a chunk runs (mixed / apart)
    short_burst: int = 0  # tokens of each prompt of a burst of short ones, apart and mixed (0: skipped)
    fresh_lengths: int = 0  # prompts of lengths not seen before, each way of a prompt's attention (0: skipped)
    pairs: int = 2  # engine and worker runs per batch, alternating (bench.gpu_measure.paired_runs)
    kernel_steps: bool = True  # the decode step with fused Marlin, then with the tensor-core kernel
    batch_kernel: str = "auto"  # [model] batch_kernel of the engine
    dense: bool = True  # [model] dense_weights, in the memory a production start would leave
    dense_variants: bool = False  # the TTFT and the burst without and with dense weights
    warm_all: bool = False  # every step graph captured (the idle warm-up), timed, before the runs


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
    ap.add_argument("--no-peers", action="store_true",
                    help="skip transformers' generate_batch (the slowest baseline; generate() stays)")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    ap.add_argument("--prefill-chunk", type=int, default=ModelConfig.prefill_chunk,
                    help="[model] prefill_chunk for the engine (default: the config's, %(default)s)")
    ap.add_argument("--chunk-variants", default="",
                    help="after the batch runs, the largest batch's burst again at each of these "
                         "prefill chunks, e.g. 256,512,0 (0: off); default: skipped")
    ap.add_argument("--mixed-variants", default="",
                    help="with --chunk-variants, each chunk once per way of running it: mixed (with "
                         "the decode step in one forward), apart (a prefill, then a step), e.g. "
                         "apart,mixed; default: the engine's own ([model] mixed_prefill)")
    ap.add_argument("--short-burst", type=int, default=0,
                    help="after the batch runs, a burst of as many prompts as the largest batch, each "
                         "about this many tokens, once apart and once mixed (chat-room mentions); default: skipped")
    ap.add_argument("--fresh-lengths", type=int, default=0,
                    help="after the TTFT, this many prompts alone of lengths no prompt had before, "
                         "and each again, with the prompts' attention on torch's SDPA choice (cuDNN on "
                         "Hopper) and on the engine's (flash), alternating; default: skipped")
    ap.add_argument("--no-kernel-steps", dest="kernel_steps", action="store_false",
                    help="skip the decode step timed with fused Marlin and with the tensor-core kernel")
    ap.add_argument("--batch-kernel", default="auto", choices=["auto", "marlin", "mma"],
                    help="[model] batch_kernel for the engine (default %(default)s; mma: no fused Marlin)")
    ap.add_argument("--no-dense", dest="dense", action="store_false",
                    help="keep no dense weights ([model] dense_weights = false); default: what the GPU "
                         "would hold with the engine's KV cache for max_batch rows of the whole context")
    ap.add_argument("--dense-variants", action="store_true",
                    help="after the batch runs, the TTFT and the largest burst with no dense weights "
                         "and with them, alternating; default: skipped")
    ap.add_argument("--warm-all", action="store_true",
                    help="before the runs, capture every step graph as an idle engine does, timed; "
                         "default: only the runs' own, and no idle warm-up while they run")
    ap.add_argument("--pairs", type=int, default=2,
                    help="engine and worker runs per batch, alternating in ABBA order (E W, W E, ...); "
                         "worker/engine is the median of the pairs' ratios (default %(default)s)")
    a = ap.parse_args(argv)
    if a.pairs < 1:
        ap.error("--pairs must be 1 or more")
    if a.prefill_chunk < 1:
        ap.error("--prefill-chunk must be 1 or more")
    try:
        variants = [int(x) for x in a.chunk_variants.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--chunk-variants takes whole numbers separated by commas, got {a.chunk_variants!r}")
    if any(v < 0 for v in variants):
        ap.error("--chunk-variants: each chunk must be 0 (off) or more")
    modes = [x.strip() for x in a.mixed_variants.split(",") if x.strip()]
    if any(m not in ("mixed", "apart") for m in modes):
        ap.error(f"--mixed-variants takes mixed and apart, separated by commas, got {a.mixed_variants!r}")
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
        no_peers=bool(a.no_peers),
        group=a.group,
        followup_tokens=100 if tiny else a.followup_tokens,
        prefill_chunk=a.prefill_chunk,
        chunk_variants=variants,
        mixed_variants=[m == "mixed" for m in modes],
        short_burst=max(0, a.short_burst),
        fresh_lengths=max(0, a.fresh_lengths),
        pairs=a.pairs,
        kernel_steps=bool(a.kernel_steps),
        batch_kernel=a.batch_kernel,
        dense=bool(a.dense),
        dense_variants=bool(a.dense_variants),
        warm_all=bool(a.warm_all),
    )


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
        prefill_chunk=opt.prefill_chunk,
        batch_kernel=opt.batch_kernel,  # type: ignore[arg-type]
    )
    t0 = time.perf_counter()
    loader = TransformersEngine(mcfg)
    loader.fuse_for_batches = True  # as BatchedEngine loads
    loader.load()  # the project's loading code path
    res["load_s"] = time.perf_counter() - t0
    model, tok = loader.model, loader.tokenizer
    res["kernel"] = loader.describe().get("gptq kernel", "")
    res["batch_kernel"] = opt.batch_kernel
    log(f"loaded in {res['load_s']:.1f} s, kernel {res['kernel'] or '-'}")

    cache_len = 256 * math.ceil((ctx_needed + 1) / 256) + 1
    engine = BatchedEngine.over(
        model, tok, mcfg, eos_ids=(), max_len=cache_len, compile_glue=cuda and not opt.no_compile
    )
    core = engine.core
    assert core is not None
    core.set_products(loader.layer_products)
    dense_free = production_free(engine, max_batch, mcfg.context_length) if cuda else 0
    res["dense_gb"] = engine.keep_dense(free=dense_free if opt.dense else 0) / 1e9
    log(f"dense weights: {engine.describe().get('dense weights', 'none')} "
        f"(production's free memory here: {dense_free / 1e9:.1f} GB)")
    res["cache_len"] = cache_len
    res["prefill_chunk"] = opt.prefill_chunk
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
    # every batch bucket a burst ramps through: captures stay out of the timings
    core.warmup(core.batch_buckets(), ctxs)
    engine._description = loader.describe()
    res["load_check"] = engine.verify(loader.probe_logits)  # the engine's own start-up check
    engine.warm_prompts()  # as the engine's start does
    log(f"load check (batched vs forward, probe prompt): {res['load_check']}")
    res["capture_s"] = time.perf_counter() - t0
    log(f"graphs captured in {core.capture_s:.1f} s (compiled glue: {core.glue is not None}): {len(core.graphs())}")
    assert engine.scheduler is not None
    if opt.warm_all:  # what an idle engine does after its start, one graph at a time
        t0, n0, cap0 = time.perf_counter(), len(core.graphs()), core.capture_s
        held0 = torch.cuda.memory_reserved() if cuda else 0
        while core.warm_next():
            pass
        res["warm_all"] = {"graphs": len(core.graphs()) - n0, "capture_s": core.capture_s - cap0,
                           "wall_s": time.perf_counter() - t0,
                           "reserved_gb": ((torch.cuda.memory_reserved() if cuda else 0) - held0) / 1e9}
        log(f"idle warm-up: {res['warm_all']}")
    else:  # the runs' graphs are captured above: none while they are timed
        engine.scheduler.warm_idle = False

    gen = GenerationConfig(max_new_tokens=opt.new_tokens)
    settings = settings_from_generation(gen)
    await engine.start()
    rng = torch.Generator().manual_seed(0)

    # TTFT, 1 conversation, max_new_tokens=1
    long_prompt = random_prompt(rng, opt.ttft_tokens, shape.vocab)
    res["ttft_s"] = await ttft_median(engine, long_prompt, settings)
    log(f"TTFT {opt.ttft_tokens} tokens: {res['ttft_s'] * 1e3:.0f} ms")
    # a follow-up of 20 tokens in a thread with 3,000 tokens of history: with
    # no prefix cache the whole thread is prefilled again
    if opt.followup_tokens:
        await followup_run(engine, res, rng, opt.followup_tokens, shape.vocab, settings)
    # prompts of new lengths: what a chat user's prompt (of any length) pays
    if opt.fresh_lengths:
        res["fresh_lengths"] = await fresh_length_ttft(
            engine, shape.vocab, settings, opt.ttft_tokens + 101, opt.fresh_lengths)
        log(f"TTFT of prompts of new lengths, first / again (ms): {res['fresh_lengths']}")

    runs: dict[str, dict[int, RunResult]] = {"engine": {}, "worker": {}, "generate": {}, "generate_batch": {}}
    every: dict[str, dict[int, list[RunResult]]] = {"engine": {}, "worker": {}}  # every paired run
    ratios: dict[int, dict[str, Any]] = {}  # worker/engine per batch (Pairs.summary)
    words = max(1, opt.prompt_tokens - 45)  # the worker's prompt adds the system prompt
    # warm-up at the run's shapes (first-use kernel selection stays out of the numbers)
    await engine_run(engine, worker_prompt_ids(engine, worker_texts(1, words, shape.vocab), settings),
                     replace(settings, max_new_tokens=4))
    burst: list[list[int]] = []  # the largest batch's prompts
    with tempfile.TemporaryDirectory() as db_dir:
        for n in opt.batches:
            texts = worker_texts(n, words, shape.vocab)
            prompts = worker_prompt_ids(engine, texts, settings)  # the same ids the worker sends
            if n == max_batch:
                burst = prompts
            res.setdefault("prompt_len", {})[n] = statistics.mean(len(p) for p in prompts)
            pairs = await paired_runs(engine, prompts, texts, settings, gen, Path(db_dir), opt.pairs)
            ratio = ratios[n] = pairs.summary()
            every["engine"][n], every["worker"][n] = pairs.engine, pairs.worker
            for kind in ("engine", "worker"):  # the median run of each kind is its row
                runs[kind][n] = every[kind][n][ratio["reported"][kind]]
            log(f"worker/engine n={n}: {ratio['ratio']:.3f} (pairs {', '.join(f'{x:.3f}' for x in ratio['pairs'])})")
    # chunked prefill: the same burst at each chunk, engine only, cold
    variants = await chunk_variants(engine, burst, settings, opt.chunk_variants, opt.mixed_variants)
    if opt.dense_variants:
        res["dense_variants"] = await dense_variants(engine, long_prompt, burst, settings,
                                                     dense_free if opt.dense else 0)
    # short prompts arriving together: each a forward of its own, or packed into shared ones
    shorts: dict[str, RunResult] = {}
    if opt.short_burst:
        texts = worker_texts(max_batch, max(1, opt.short_burst - 45), shape.vocab)
        short_prompts = worker_prompt_ids(engine, texts, settings)
        res["short_burst_len"] = statistics.mean(len(p) for p in short_prompts)
        shorts = await chunk_variants(engine, short_prompts, settings, [opt.prefill_chunk], [False, True])
    # one conversation: lookahead, sampling, the scheduler thread and the profiler (its time beyond the step)
    if 1 in opt.batches:
        one = worker_prompt_ids(engine, worker_texts(1, words, shape.vocab), settings)
        res.update(await one_conversation_diagnostics(engine, one, settings))
        res["dependent_pairs"] = await dependent_launch_pairs(engine, one, settings)
        log(f"one conversation, kernels launched plainly / dependent, decode tok/s: {res['dependent_pairs']}")
    await engine.close()
    # where a decode step's time goes: the quantized products alone, and the
    # step with the module's own RMSNorm instead of the fused one
    diag = step_breakdown(core, sorted({min(opt.batches), max(opt.batches)}),
                          opt.prompt_tokens + opt.new_tokens // 2)
    res["diag"] = diag
    # the sampler alone, launched behind other work: its GPU time and the call's own time on the CPU (ms),
    # 1 and the largest batch; and which calls wait for the GPU (torch's sync debug mode)
    res["sampler_ms"] = {
        f"{key}_{n}": [1e3 * t for t in time_sampler(core, n, s)]
        for key, s in (("sampled", settings), ("greedy", replace(settings, temperature=0.0)))
        for n in sorted({1, max(opt.batches)})
    }
    res["sampler_waits"] = sampler_waits(core, settings)
    log(f"sampler (GPU queued / the call on the CPU, ms): {res['sampler_ms']}; waits: {res['sampler_waits']}")
    log(f"diagnostics: {diag}")
    if opt.kernel_steps and core.products and core.products[0].qkv.batch is not None:
        batches = [n for n in (1, 2, 4, 8, 16, 32) if n <= max_batch]
        kd = res["batch_kernels"] = batch_kernel_steps(engine, model, shape.vocab, batches,
                                                       opt.prompt_tokens + opt.new_tokens // 2)
        log(f"batch kernels (fused Marlin, then the tensor-core kernel): {kd}")
    res["decode_steps"] = engine.scheduler.steps if engine.scheduler else 0

    base_settings = replace(settings, max_new_tokens=opt.baseline_tokens)
    generate_run(model, tok, [long_prompt[: opt.prompt_tokens]], replace(base_settings, max_new_tokens=2), 1)
    for n in opt.batches:
        prompts = [random_prompt(rng, opt.prompt_tokens, shape.vocab) for _ in range(n)]
        runs["generate"][n] = generate_run(model, tok, prompts, base_settings, opt.baseline_max)
        log(f"generate n={n}: {runs['generate'][n]}")
    # transformers' own continuous batching, same checkpoint, same prompt lengths
    # (at the largest batch only: eager, it is slow; ~20 s a call on the CPU)
    for i, n in enumerate([] if opt.tiny or opt.no_peers else [0, max(opt.batches)]):
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
                **_run_json(r),
                "floor_tok_s": floor_tok_s(n),
            }
            for n, r in by_n.items()
        }
        for kind, by_n in runs.items()
    }
    res["pair_runs"] = {  # every run of the pairs, in pair order; "runs" holds each kind's median
        kind: {str(n): [_run_json(r) for r in rs] for n, rs in by_n.items()}
        for kind, by_n in every.items()
    }
    res["worker_engine"] = {str(n): v for n, v in ratios.items()}
    res["chunk_variants"] = {c: _run_json(r) for c, r in variants.items()}
    res["short_burst"] = {c: _run_json(r) for c, r in shorts.items()}
    res["options"] = {k: str(v) for k, v in opt.__dict__.items()}
    one = runs["engine"].get(1)
    res["single_ms_step"] = one.decode_ms_per_token if one else 0.0
    res["table"] = table(res, opt)
    return res


def _run_json(r: RunResult) -> dict[str, Any]:
    return {**r.__dict__, "wall_tok_s": r.wall_tok_s}


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
