"""The row-layout 4-bit kernels (bot/engine/rowquant.py) against Marlin, on
Xwin-70B's product shapes, on the GPU:

    python3 -m bench.gpu_rowquant --out rowquant.json [--batches 1,2,8,32] [--splits 0,4]

For each shape (q/k/v fused, o, gate/up fused, down) and each batch of rows:
the time of ``LAYERS`` distinct matrices in one CUDA graph (distinct so that
the 60 MB L2 cannot hold them) for the row kernel (up to 4 rows), for the
tensor-core kernel at each of ``--splits`` and both warp layouts (up to 32
rows), and for fused Marlin regrouped from the same weights (the engine's
batch kernel where its copy fits); the bytes read per second; the error of
each against the float32 product of the same dequantized weights; and the
80 layers' products per batch. Then prompts: 1,000 tokens through dequantize
+ cuBLAS against fused Marlin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from bot.engine import rowquant
from bot.engine.gptq_regroup import fused_marlin

LAYERS = 8
# name, in, outs (fused products share their input)
SHAPES = (
    ("qkv", 8192, (8192, 1024, 1024)),
    ("o", 8192, (8192,)),
    ("gate_up", 8192, (28672, 28672)),
    ("down", 28672, (8192,)),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def channelwise(fin: int, fout: int, gen: torch.Generator, dev: torch.device) -> SimpleNamespace:
    """A channelwise 4-bit GPTQ module's tensors (GPTQModel's plain layout,
    v2 zero points of 8), random codes, scales like the synthetic checkpoint's."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (fin // 8, fout), generator=gen, dtype=torch.int64)
    scales = (torch.rand(1, fout, generator=gen) * 0.5 + 0.75) / (4 * 4.6 * fin**0.5)
    qzeros = torch.full((1, fout // 8), 0x88888888 - 2**32, dtype=torch.int64)
    return SimpleNamespace(
        in_features=fin, out_features=fout, bits=4, sym=True, bias=None, name="bench",
        qweight=torch.nn.Parameter(qweight.to(torch.int32).to(dev), requires_grad=False),
        scales=torch.nn.Parameter(scales.to(torch.float16).to(dev), requires_grad=False),
        qzeros=torch.nn.Parameter(qzeros.to(torch.int32).to(dev), requires_grad=False),
        g_idx=torch.zeros(fin, dtype=torch.int32, device=dev),
    )


def graph_ms(fn: Callable[[], Any], reps: int = 20) -> float:
    """Mean ms of ``fn`` replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def bench_shape(name: str, fin: int, outs: tuple[int, ...], dev: torch.device, res: dict[str, Any],
                batches: tuple[int, ...], splits: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(name))
    layers = [[channelwise(fin, n, gen, dev) for n in outs] for _ in range(LAYERS)]
    rqs = [rowquant.pack(mods) for mods in layers]
    marlin_fused = [fused_marlin(mods) for mods in layers]
    nbytes = sum(rq.nbytes() for rq in rqs)
    row: dict[str, Any] = {"in": fin, "outs": outs, "bytes_per_layer": nbytes / LAYERS}

    def timed(fn: Callable[[torch.Tensor], torch.Tensor], every: Callable[[torch.Tensor], Any],
              x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        out = fn(x)
        torch.cuda.synchronize()
        ms = graph_ms(lambda: every(x))
        return {"ms": ms / LAYERS, "gbs": nbytes / (ms * 1e-3) / 1e9, "err": rel_err(out, ref)}

    for m in batches:
        x = torch.randn(m, fin, generator=gen).to(dev, torch.float16)
        ref = F.linear(x.float(), rowquant.reference(rqs[0]).float())
        cell: dict[str, Any] = {}
        if m <= rowquant.MAX_ROWS:
            cell["row4"] = timed(lambda x: rowquant.gemv(rqs[0], x),
                                 lambda x: [rowquant.gemv(rq, x) for rq in rqs], x, ref)
        if rowquant.mma_fits(rqs[0], m):
            for sp in splits:
                for tl in (1, 2):
                    cell[f"mma_s{sp}_t{tl}"] = timed(
                        lambda x, sp=sp, tl=tl: rowquant.mma(rqs[0], x, sp, tl),
                        lambda x, sp=sp, tl=tl: [rowquant.mma(rq, x, sp, tl) for rq in rqs], x, ref)
        cell["marlin_fused"] = timed(lambda x: marlin_fused[0](x),
                                     lambda x: [mod(x) for mod in marlin_fused], x, ref)
        row[str(m)] = cell
        log(f"{name} m={m}: " + ", ".join(f"{k} {v['ms'] * 1e3:.0f} us {v['gbs']:.0f} GB/s err {v['err']:.1e}"
                                        for k, v in cell.items()))
    # prompts: 1,000 tokens
    x = torch.randn(1000, fin, generator=gen).to(dev, torch.float16)
    ref = F.linear(x[:64].float(), rowquant.reference(rqs[0]).float())
    out = rowquant.linear(rqs[0], x)
    row["prompt_err"] = rel_err(out[:64], ref)
    row["prompt_dequant_ms"] = graph_ms(lambda: [rowquant.linear(rq, x) for rq in rqs], reps=5) / LAYERS
    row["prompt_marlin_ms"] = graph_ms(lambda: [mod(x) for mod in marlin_fused], reps=5) / LAYERS
    log(f"{name} 1000 tokens: dequant+cuBLAS {row['prompt_dequant_ms']:.2f} ms, "
        f"marlin {row['prompt_marlin_ms']:.2f} ms, err {row['prompt_err']:.1e}")
    res[name] = row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batches", default="1,2,4,8,16,24,32", help="rows of input to time")
    ap.add_argument("--splits", default="0,1,2,4,8",
                    help="the tensor-core kernel's splits of in_features (0: its own choice)")
    opt = ap.parse_args(argv)
    batches = tuple(int(b) for b in opt.batches.split(","))
    splits = tuple(int(b) for b in opt.splits.split(","))
    dev = torch.device("cuda:0")
    t0 = time.perf_counter()
    ok = rowquant.available(dev)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "build_s": time.perf_counter() - t0,
                           "kernels": ok}
    log(f"row kernels built/loaded in {res['build_s']:.1f} s: {ok}")
    if not ok:
        return 1
    for name, fin, outs in SHAPES:
        bench_shape(name, fin, outs, dev, res, batches, splits)
        torch.cuda.empty_cache()  # the shape's matrices are gone with its frame
    # a decode step's products at 80 layers, each way
    for m in map(str, batches):
        step = {k: 80 * sum(res[s][m][k]["ms"] for s, _, _ in SHAPES) for k in res["qkv"][m]}
        res[f"step80_ms_{m}"] = step
        log(f"80 layers' products at {m} row(s): " + ", ".join(f"{k} {v:.2f} ms" for k, v in step.items()))
    if opt.out:
        opt.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
