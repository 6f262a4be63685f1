"""Where a long prompt's prefill time goes, and the dequantize-ahead against
dequantizing in line, on the GPU:

    python3 -m bench.gpu_prefill --layers 8 --out prefill.json

1. **Products alone**, 1,000 tokens, ``LAYERS`` distinct layers of Xwin-70B's
   four fused products (bench/gpu_rowquant.py's random channelwise weights):
   dequantize + cuBLAS in line (what long prompts did), cuBLAS alone on
   matrices dequantized beforehand (what hiding the dequantize could reach),
   the dequantize alone, and :class:`~bot.engine.prompt_weights.PromptWeights`
   (the next layer dequantized on a side stream into two reused buffers) at
   several grid sizes and stream priorities.
2. **The whole prefill** of a 1,000-token prompt through ``DecodeCore`` on a
   synthetic checkpoint of ``--layers`` layers (bench/gpu.py's, reference
   quantization), each variant's logits against transformers' forward, and
   the profiler's GPU time by kernel for the default variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # as bench/gpu.py

import torch
import torch.nn.functional as F

from bench.gpu_rowquant import SHAPES, channelwise
from bot.engine import rowquant
from bot.engine.products import LayerProducts, Product
from bot.engine.prompt_weights import NAMES, PromptWeights

LAYERS = 8
TOKENS = 1000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def products_alone(dev: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    layers = []
    for _ in range(LAYERS):
        made = {name: Product(rowquant.pack([channelwise(fin, n, gen, dev) for n in outs]), None)
                for name, fin, outs in SHAPES}
        layers.append(LayerProducts(**made))
    xs = {name: torch.randn(TOKENS, fin, generator=gen).to(dev, torch.float16) for name, fin, _ in SHAPES}
    flops = 2 * TOKENS * LAYERS * sum(fin * sum(outs) for _, fin, outs in SHAPES)
    res: dict[str, Any] = {"layers": LAYERS, "tokens": TOKENS, "tflop": flops / 1e12}

    def inline() -> None:
        for layer in layers:
            for name in NAMES:
                getattr(layer, name)(xs[name], True)

    res["inline_ms"] = eager_ms(inline)
    dense = [{name: rowquant.dequantize(getattr(layer, name).row) for name in NAMES} for layer in layers]
    res["cublas_only_ms"] = eager_ms(lambda dense=dense: [F.linear(xs[n], w[n]) for w in dense for n in NAMES])
    dense.clear()
    torch.cuda.empty_cache()
    ahead = PromptWeights(layers, torch.float16)
    bufs = ahead.buffers[0]
    res["dequant_only_ms"] = eager_ms(
        lambda: [rowquant.dequantize(getattr(layer, n).row, out=bufs[n]) for layer in layers for n in NAMES])
    wbytes = sum(getattr(layers[0], n).row.nbytes() + bufs[n].numel() * 2 for n in NAMES) * LAYERS
    res["dequant_gbs"] = wbytes / (res["dequant_only_ms"] * 1e-3) / 1e9

    def run_ahead(pw: PromptWeights) -> None:
        for layer, w in zip(layers, pw.layers(), strict=True):
            for name in NAMES:
                getattr(layer, name)(xs[name], True, w[name])

    for blocks in (0, 1056, 264):
        for prio in (0, -1):
            pw = PromptWeights(layers, torch.float16, max_blocks=blocks, priority=prio)
            res[f"ahead_ms_blocks{blocks}_prio{prio}"] = eager_ms(lambda pw=pw: run_ahead(pw))
            del pw
            torch.cuda.empty_cache()
    # the ahead path's numbers are the in-line path's
    x = xs["gate_up"]
    want = layers[-1].gate_up(x, True)[0]
    got: torch.Tensor | None = None
    for li, w in enumerate(PromptWeights(layers, torch.float16).layers()):
        if li == LAYERS - 1:
            got = layers[li].gate_up(x, True, w["gate_up"])[0]
    assert got is not None
    res["ahead_equal"] = bool(torch.equal(got, want))
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
    engine = BatchedEngine.over(loader.model, loader.tokenizer, loader.config, eos_ids=(), max_len=1281,
                                compile_glue=True)
    core = engine.core
    assert core is not None and loader.layer_products is not None
    core.set_products(loader.layer_products)
    res: dict[str, Any] = {"layers": layers, "kernel": loader.describe().get("gptq kernel", "")}
    variants: dict[str, tuple[bool, bool, int, int]] = {  # fused norm, ahead, blocks, priority
        "before (module norms, in line)": (False, False, 0, 0),
        "fused norms, in line": (True, False, 0, 0),
        "fused norms, ahead": (True, True, 0, 0),
        "fused norms, ahead, high priority": (True, True, 0, -1),
        "fused norms, ahead, 1056 blocks": (True, True, 1056, 0),
    }
    for name, (norm, ahead, blocks, prio) in variants.items():
        core.fused_norm, core.prompt_ahead = norm, ahead
        core._ahead = PromptWeights(core.products or [], core.dtype, blocks, prio) if ahead else None
        err = check_long_prefill(engine, loader.model, shape.vocab, TOKENS)
        ms = 1e3 * time_prefill(engine, TOKENS, shape.vocab)
        res[name] = {"ms": ms, "err_vs_forward": err}
        log(f"whole prefill, {name}: {ms:.1f} ms, rel err vs forward {err:.1e}")
    core.fused_norm, core.prompt_ahead, core._ahead = True, True, None
    ids = list(range(1, TOKENS + 1))
    core.prefill(0, ids)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        core.prefill(0, ids)
        torch.cuda.synchronize()
    res["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    log("profile of the default variant:\n" + res["profile"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    opt = ap.parse_args(argv)
    dev = torch.device("cuda:0")
    t0 = time.perf_counter()
    if not rowquant.available(dev):
        return 1
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "kernels_s": time.perf_counter() - t0}
    res["products"] = products_alone(dev)
    torch.cuda.empty_cache()
    res["prefill"] = whole_prefill(opt.layers)
    if opt.out:
        opt.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
