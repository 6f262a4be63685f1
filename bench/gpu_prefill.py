"""Where a long prompt's prefill time goes, on the GPU:

    python3 -m bench.gpu_prefill --layers 8 --out prefill.json

1. **Products alone**, 1,000 tokens, ``LAYERS`` distinct layers of Xwin-70B's
   four fused products (bench/gpu_rowquant.py's random channelwise weights):
   dequantize + cuBLAS as prompts run it, cuBLAS alone on matrices
   dequantized beforehand (what a free dequantize would reach), and the
   dequantize alone, with 1, 4 and 8 words a thread (``DEQUANT_ITEMS``).
2. **The whole prefill** of a 1,000-token prompt through ``DecodeCore`` on a
   synthetic checkpoint of ``--layers`` layers (bench/gpu.py's, reference
   quantization): the glue eager or compiled, the dequantize's words a
   thread, each variant's logits against transformers' forward, and the
   profiler's GPU time by kernel for the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # as bench/gpu.py

import torch
import torch.nn.functional as F

from bench.gpu_rowquant import SHAPES, channelwise, log
from bot.engine import rowquant

LAYERS = 8
TOKENS = 1000


def eager_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    """Median ms of ``fn`` run eagerly (after one warm-up), timed with events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


BLOCKS = (1024, 2048, 4096, 8192)


def _rows(rq: rowquant.RowQuant, s: int, e: int) -> rowquant.RowQuant:
    return rowquant.RowQuant(rq.w[s:e], rq.scale[s:e], rq.zero[s:e], (e - s,))


def blocked_linear(rq: rowquant.RowQuant, x: torch.Tensor, block: int) -> torch.Tensor:
    n = rq.out_features
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        torch.mm(x, rowquant.dequantize(_rows(rq, s, e)).t(), out=out[:, s:e])
    return out


def blocked_dequant(rq: rowquant.RowQuant, block: int) -> None:
    for s in range(0, rq.out_features, block):
        rowquant.dequantize(_rows(rq, s, min(rq.out_features, s + block)))


def products_alone(dev: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    layers = [{name: rowquant.pack([channelwise(fin, n, gen, dev) for n in outs]) for name, fin, outs in SHAPES}
              for _ in range(LAYERS)]
    xs = {name: torch.randn(TOKENS, fin, generator=gen).to(dev, torch.float16) for name, fin, _ in SHAPES}
    flops = 2 * TOKENS * LAYERS * sum(fin * sum(outs) for _, fin, outs in SHAPES)
    wbytes = sum(rq.nbytes() + rq.out_features * rq.in_features * 2 for layer in layers for rq in layer.values())
    res: dict[str, Any] = {"layers": LAYERS, "tokens": TOKENS, "tflop": flops / 1e12,
                           "dequant_gb": wbytes / 1e9}
    dense = [{name: rowquant.dequantize(rq) for name, rq in layer.items()} for layer in layers]
    ms = eager_ms(lambda dense=dense: [F.linear(xs[n], w) for d in dense for n, w in d.items()])
    res["cublas_only"] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    dense.clear()
    torch.cuda.empty_cache()
    for items in (1, 4, 8):
        rowquant.DEQUANT_ITEMS = items
        ms = eager_ms(lambda: [rowquant.dequantize(rq) for layer in layers for rq in layer.values()])
        res[f"dequant_only_items{items}"] = {"ms": ms, "gbs": wbytes / (ms * 1e-3) / 1e9}
        ms = eager_ms(lambda: [rowquant.linear(rq, xs[n]) for layer in layers for n, rq in layer.items()])
        res[f"inline_items{items}"] = {"ms": ms}
    rowquant.DEQUANT_ITEMS = 4
    # The dequantize a block of output rows at a time, each block's product
    # written into its columns of the output: a block small enough stays in
    # L2 between its dequantize and its product (does HBM see the writes?).
    want = [rowquant.linear(rq, xs[n]) for n, rq in layers[0].items()]
    for block in BLOCKS:
        got = [blocked_linear(rq, xs[n], block) for n, rq in layers[0].items()]
        err = max(float((g.float() - w.float()).abs().max() / w.float().abs().max())
                  for g, w in zip(got, want, strict=True))
        ms = eager_ms(lambda block=block: [blocked_linear(rq, xs[n], block)
                                           for layer in layers for n, rq in layer.items()])
        deq = eager_ms(lambda block=block: [blocked_dequant(rq, block) for layer in layers for rq in layer.values()])
        res[f"blocked_{block}"] = {"ms": ms, "dequant_only_ms": deq, "rel_err_vs_inline": err}
    del want
    for k, v in res.items():
        log(f"products alone: {k} = {v}")
    return res


def whole_prefill(layers: int) -> dict[str, Any]:
    from bench.gpu_checkpoint import XWIN_70B, build_checkpoint
    from bench.gpu_fidelity import _load, time_prefill
    from bench.gpu_measure import check_long_prefill
    from bot.engine.batched import BatchedEngine

    shape = replace(XWIN_70B, layers=layers)
    path = Path(f"/dev/shm/xwin-prefill-l{layers}")
    build_checkpoint(path, shape)
    loader = _load(path, "marlin", 2)
    engine = BatchedEngine.over(loader.model, loader.tokenizer, loader.config, eos_ids=(), max_len=2305,
                                compile_glue=True)
    core = engine.core
    assert core is not None and core.glue is not None
    core.set_products(loader.layer_products)
    glue = core.glue
    res: dict[str, Any] = {"layers": layers, "kernel": loader.describe().get("gptq kernel", "")}
    for name, compiled, items in (("eager glue, 1 word a thread", False, 1),
                                  ("compiled glue, 1 word a thread", True, 1),
                                  ("compiled glue, 8 words a thread", True, 8),
                                  ("compiled glue, 4 words a thread (default)", True, 4)):
        core.glue, rowquant.DEQUANT_ITEMS = (glue if compiled else None), items
        t0 = time.perf_counter()
        err = check_long_prefill(engine, loader.model, shape.vocab, TOKENS)
        first_s = time.perf_counter() - t0  # compiles the prompt glue the first time
        row = {"err_vs_forward": err, "first_call_s": first_s}
        for n in (TOKENS, 512, 2000):
            row[f"ms_{n}"] = 1e3 * time_prefill(engine, n, shape.vocab)
        res[name] = row
        log(f"whole prefill, {name}: {row}")
    ids = list(range(1, TOKENS + 1))
    core.prefill(0, ids)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        core.prefill(0, ids)
        torch.cuda.synchronize()
    res["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    log("profile of the default variant:\n" + res["profile"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--products-only", action="store_true", help="the products alone, not the whole prefill")
    opt = ap.parse_args(argv)
    dev = torch.device("cuda:0")
    t0 = time.perf_counter()
    if not rowquant.available(dev):
        return 1
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "kernels_s": time.perf_counter() - t0}
    res["products"] = products_alone(dev)
    torch.cuda.empty_cache()
    if not opt.products_only:
        res["prefill"] = whole_prefill(opt.layers)
    if opt.out:
        opt.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
