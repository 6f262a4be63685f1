"""Build the project's CUDA extensions side by side, before a benchmark loads them.

    python -m bench.build_kernels

bot/engine/cuda_ext.py builds each extension at its first load, one after
the other (~70 s each on the H200 machine); here each builds in a process of
its own, so a call whose sources changed waits for the slowest build alone.
An extension already built from the current sources is only imported.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor


def _build(name: str) -> tuple[str, float]:
    from bot.engine import attention, norm, rowquant

    t0 = time.perf_counter()
    {"rowquant": rowquant, "attention": attention, "norm": norm}[name]._kernels()
    return name, time.perf_counter() - t0


def main() -> int:
    names = ("rowquant", "attention", "norm")
    failed = 0
    with ProcessPoolExecutor(len(names)) as pool:
        for name, future in zip(names, [pool.submit(_build, n) for n in names], strict=True):
            try:
                print(f"{name}: ready in {future.result()[1]:.0f} s", flush=True)
            except Exception as exc:  # the engine logs and falls back on its own; say it here too
                print(f"{name}: build failed: {exc!r}", flush=True)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
