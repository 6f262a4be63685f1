"""bench/gpu.py, small, on the CPU: the GPU benchmark cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--checkpoint", str(tmp_path / "ckpt"),
         "--out", str(out), "--prefill-chunk", "16", "--chunk-variants", "16,0", "--mixed-variants", "apart,mixed",
         "--short-burst", "12", "--fresh-lengths", "2", "--dense-variants", "--warm-all",
         "--pairs", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout

    def number(pattern: str) -> float:
        m = re.search(pattern, text)
        assert m, f"no match for {pattern!r} in:\n{text[-2000:]}"
        return float(m.group(1))

    assert number(r"\| copy bandwidth \(read\+write\) \| ([\d.]+) GB/s") > 0
    assert number(r"\| decode, 1 conversation \| ([\d.]+) ms/step") > 0
    assert number(r"\| TTFT, \d+-token prompt \| ([\d.]+) ms") > 0
    for n in (1, 4, 16, 32):
        for path in ("batched engine", "bot worker \\+ engine", "sequential generate\\(\\)"):
            row = re.search(rf"^\| {n} \| {path}[^|]* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text, re.M)
            assert row, f"row {n} {path} missing"
            assert all(float(x) > 0 for x in row.groups())
    res = json.loads(out.read_text())
    assert res["check_step_rel_err"] < 1e-3
    # one conversation both ways: the lookahead queued steps ahead and changed no greedy token
    la = res["lookahead"]
    assert len(la["off"]) == len(la["on"]) == 2 and min(la["off"] + la["on"]) > 0
    assert la["same_ids"] is True and la["steps_ahead"] > 0
    assert len(res["greedy_pairs"]["sampled"]) == len(res["greedy_pairs"]["greedy"]) == 2
    for split in res["cpu_split"].values():  # every part of the scheduler's loop ran and was timed
        assert {"step_ms", "sample_ms", "read_ms", "decode_ms_per_token"} <= set(split)
        assert all(v > 0 for v in split.values())
    assert re.search(r"the scheduler thread's ms a call \(median\), lookahead off / on: step [\d.]+ / [\d.]+", text)
    prof = res["profile_one"]  # on the CPU no GPU time (the profiler sees the GPU's kernels from every thread)
    assert prof["decode_ms_per_token"] > 0 and prof["gpu_busy_ms_per_token"] == 0
    assert re.search(r"under torch's profiler: [\d.]+ ms a token, the GPU busy 0.00 ms", text)
    assert set(res["sampler_ms"]) == {"sampled_1", "sampled_32", "greedy_1", "greedy_32"}
    assert all(0 < g == w for g, w in res["sampler_ms"].values())  # on the CPU both are the call's time
    assert re.search(r"the sampler alone, .* ms a call .*sampled at 1 rows [\d.]+ / [\d.]+", text)
    assert res["sampler_waits"] == {}  # no stream to wait for on the CPU
    assert not any(r["extra"].get("errors") for r in res["runs"]["worker"].values())
    # each conversation's longest wait between two tokens: median and max over them
    for kind in ("engine", "worker", "generate"):
        for r in res["runs"][kind].values():
            assert 0 < r["extra"]["gap_p50_s"] <= r["extra"]["gap_max_s"] <= r["wall_s"], (kind, r)
    assert res["prefill_chunk"] == 16
    # dense weights none / kept, alternating (the tiny model has no fused products: none kept either way)
    dense = res["dense_variants"]
    assert res["dense_gb"] == 0 and set(dense) == {"none", "kept"}
    for row in dense.values():
        assert len(row["ttft_ms"]) == 2 and min(row["ttft_ms"]) > 0 and row["burst"]["n"] == 32
    assert re.search(r"dense weights none / kept: TTFT \d+ tokens \(ms\) \[[\d., ]+\] / \[[\d., ]+\]", text)
    assert res["warm_all"]["graphs"] == 0  # no graphs on the CPU
    for n in (1, 4, 16, 32):
        _assert_pairs(res, text, str(n), 2)
    # the largest burst again, once per chunk (0: off) and way of running it, each a row of its own table
    variants = res["chunk_variants"]
    assert set(variants) == {"16 apart", "16 mixed", "0 apart", "0 mixed"}
    for key, label in (("16 apart", "16 apart"), ("16 mixed", "16 mixed"), ("0 apart", "off apart"),
                       ("0 mixed", "off mixed")):
        v = variants[key]
        assert v["n"] == 32 and v["tokens"] == 32 * 8
        assert 0 < v["extra"]["gap_p50_s"] <= v["extra"]["gap_max_s"] <= v["wall_s"]
        assert 0 < v["ttft_s"] <= v["extra"]["ttft_p90_s"] and v["decode_ms_per_token"] > 0
        row = re.search(rf"^\| {label} \| ([\d.]+) \| ([\d.]+) \| (\d+) ms \(p90 (\d+)\) \| "
                        rf"(\d+) ms \(max (\d+)\) \| (\d+) \| [^|]+ \| (\d+) \|", text, re.M)
        assert row, f"no chunk {label} row in:\n{text[-2000:]}"
        assert int(row[5]) <= int(row[6]) and int(row[7]) == v["extra"]["prefill_chunks"]
        where = v["extra"]["where"]  # the scheduler's time: every prompt prefilled, steps run
        assert where["prompt_tokens"] == round(32 * res["prompt_len"]["32"]) and where["steps"] >= 7
        # apart, a forward (or more) a prompt; mixed, prompts arriving together share
        # forwards: with chunks of 16, each full but the first (a whole prompt) and the last
        if key.endswith("apart"):
            assert where["prefills"] >= 32, (key, where)
        elif key.startswith("16"):
            assert where["prefills"] <= math.ceil(where["prompt_tokens"] / 16) + 1, (key, where)
        else:
            assert where["prefills"] < 32, (key, where)
        assert 0 < where["prefill_s"] + where["step_s"] <= v["wall_s"]
        # mixed: the prompts admitted while others decode ride with their step; apart: none
        assert int(row[8]) == where["mixed"] and (where["mixed"] > 0) == key.endswith("mixed")
    # prompts longer than 16 tokens are chunked while others decode; off, never
    # (mixed: only where a turn's budget, the cache's length, ends mid-prompt)
    assert variants["16 apart"]["extra"]["prefill_chunks"] > 0 == variants["0 apart"]["extra"]["prefill_chunks"]
    assert variants["16 mixed"]["extra"]["prefill_chunks"] > variants["0 mixed"]["extra"]["prefill_chunks"]
    # prompts of new lengths, each way of a prompt's attention (on the CPU both are torch's own)
    fresh = res["fresh_lengths"]
    assert {w: [len(v) for v in d.values()] for w, d in fresh.items()} == {"cudnn": [2, 2], "flash": [2, 2]}
    assert all(t > 0 for d in fresh.values() for v in d.values() for t in v)
    assert re.search(r"^\| TTFT, prompts of new lengths \(~\d+ tokens\), first / again, median of 2 \| "
                     r"attention on torch's choice \(cuDNN on Hopper\) \d+ / \d+ ms; flash", text, re.M)
    # short prompts arriving together, apart and mixed (a table of their own; here
    # they are longer than the chunk of 16: the worker's prompt adds its system prompt)
    shorts = res["short_burst"]
    assert set(shorts) == {"16 apart", "16 mixed"}
    apart, mixed = (shorts[k]["extra"]["where"] for k in ("16 apart", "16 mixed"))
    assert mixed["mixed"] > 0 == apart["mixed"]
    assert apart["prompt_tokens"] == mixed["prompt_tokens"] == round(32 * res["short_burst_len"])
    assert re.search(rf"^short prompts: 32 prompts of {res['short_burst_len']:.0f} tokens", text, re.M)


def _assert_pairs(res: dict[str, Any], text: str, n: str, k: int) -> None:
    """Engine and worker ran k times each at batch n, in ABBA order; each
    row is its kind's median run; worker/engine is the median of the pairs'
    ratios, computed here again from the stored runs."""
    pair_runs, runs, we = res["pair_runs"], res["runs"], res["worker_engine"]
    eng, wrk = pair_runs["engine"][n], pair_runs["worker"][n]
    assert len(eng) == len(wrk) == k
    assert all(r["n"] == int(n) and r["tokens"] == int(n) * 8 for r in eng + wrk)
    speed = [[r["tokens"] / r["wall_s"] for r in rs] for rs in (eng, wrk)]
    ratios = [w / e for e, w in zip(*speed, strict=True)]
    got = we[n]
    assert got["order"] == ["EW", "WE"][:k]
    assert got["pairs"] == pytest.approx(ratios, rel=1e-9)
    assert got["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-9)
    assert (got["min"], got["max"]) == (min(got["pairs"]), max(got["pairs"]))
    for kind, rs, sp in (("engine", eng, speed[0]), ("worker", wrk, speed[1])):
        row = runs[kind][n]
        assert row["wall_s"] == rs[got["reported"][kind]]["wall_s"]  # one of the runs, not an average
        assert sorted(sp)[(k - 1) // 2] == sp[got["reported"][kind]]  # the (lower) median by speed
    shown = f"| {got['ratio']:.3f} ({got['min']:.2f}–{got['max']:.2f}) |"
    assert re.search(rf"^\| {n} \| bot worker \+ engine .*{re.escape(shown)}$", text, re.M), shown


def test_the_report_shows_both_batch_kernels() -> None:
    """The GPU run times the decode step with fused Marlin and with the
    tensor-core kernel (bench.gpu_measure.batch_kernel_steps); the report puts
    them side by side, one row per batch, with the latter's check."""
    from bench.gpu_report import _batch_kernel_rows

    assert _batch_kernel_rows({}) == []
    k: dict[str, float] = {"check_prefill_rel_err": 4.1e-4, "check_step_rel_err": 4.6e-4, "free_gb_after": 137.1}
    for n, (a, b, c, d) in {1: (1.44, 1.03, 1.45, 1.03), 32: (2.67, 1.77, 3.66, 2.72)}.items():
        k.update({f"marlin_step_ms_{n}": a, f"marlin_gemms_ms_{n}": b,
                  f"mma_step_ms_{n}": c, f"mma_gemms_ms_{n}": d})
    lines = _batch_kernel_rows({"batch_kernels": k})
    assert "two-row step 4.6e-04" in lines[0] and "137.1 GB" in lines[0]
    assert "| 1 | 1.44 (1.03) | 1.45 (1.03) |" in lines
    assert "| 32 | 2.67 (1.77) | 3.66 (2.72) |" in lines
    assert lines.index("| 1 | 1.44 (1.03) | 1.45 (1.03) |") < lines.index("| 32 | 2.67 (1.77) | 3.66 (2.72) |")
