"""The compiled rope + KV-cache store of a decode step, on the GPU:

    python3 -m bench.gpu_rope_store

``core._glue_rope_store`` compiled as inductor does by default (its
candidate kernels timed at each compilation, after a copy of every tensor
they write: the key cache) and with one configuration (what
``DecodeCore.set_compiled_glue`` compiles, docs/gpu-notes.md item 44): the
memory each compilation took above the caches, and a call's time at 1 and 32
rows from a CUDA graph of 80 calls.
"""

from __future__ import annotations

from typing import Any

import torch

from bot.engine.batched.core import _glue_rope_store

LAYERS, ROWS, KV_HEADS, POSITIONS, HEAD_DIM, HEADS = 8, 32, 8, 3073, 128, 64


def _args(bb: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[Any, ...]:
    dev, half = k_cache.device, torch.float16
    g = torch.Generator(device=dev).manual_seed(bb)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=half, device=dev, generator=g)

    return (randn(bb, HEADS, HEAD_DIM), randn(bb, KV_HEADS, HEAD_DIM), randn(bb, KV_HEADS, HEAD_DIM),
            randn(bb, 1, HEAD_DIM), randn(bb, 1, HEAD_DIM), k_cache, v_cache,
            torch.full((1,), 3, device=dev), torch.arange(bb, device=dev), torch.full((bb,), 5, device=dev))


def _call_us(fn: Any, args: tuple[Any, ...], calls: int = 80, reps: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / reps / calls * 1e3


def main() -> int:
    k_cache = torch.zeros(LAYERS, ROWS, KV_HEADS, POSITIONS, HEAD_DIM, dtype=torch.float16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(2):
        for name, opts in (("autotuned", {}), ("one config", {"triton.autotune_pointwise": False})):
            torch._dynamo.reset()
            fn = torch.compile(_glue_rope_store, fullgraph=True, options=opts)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for bb in (1, 2, 4, 32):  # static, then the batch dynamic
                fn(*_args(bb, k_cache, v_cache))
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
            print(f"{name}: compilations took {peak:.3f} GB above the caches", flush=True)
            for bb in (1, 32):
                times.setdefault((name, bb), []).append(_call_us(fn, _args(bb, k_cache, v_cache)))
    for (name, bb), us in times.items():
        print(f"{name}, {bb} row(s): " + ", ".join(f"{t:.3f}" for t in us) + " us a call", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
