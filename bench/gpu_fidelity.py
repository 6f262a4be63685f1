"""Every GPTQ kernel on the reference quantizations: correct, and how fast.

    python -m bench.gpu_fidelity --layers 8 --backends marlin,torch,triton,exllama_v2

For each checkpoint (group size -1 + act order, the reference; group 128 +
act order, its second branch) bench/gpu.py's synthetic Xwin-70B-shaped
checkpoint is built, the torch kernel's transformers forward on it is taken as
the reference, and each kernel is loaded through the project's loader
(``TransformersEngine``, so group size -1 with "marlin" is regrouped into
groups of 128, and refusals are the loader's own). A row: the load check's
verdict, the batched path's prefill and graph-replayed decode step against the
kernel's own transformers forward and against the reference, the graph step
time at 1 and 32 rows and a 1,000-token prefill. ``marlin-raw`` is Marlin
without the regrouping (the load check must refuse it on group size -1).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Before GPTQModel is imported: as bench/gpu.py, no expandable segments.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")

import torch

from bench.gpu_checkpoint import XWIN_70B, build_checkpoint
from bench.gpu_measure import (
    attention_kernels,
    check_attention_kernel,
    check_logits,
    check_long_prefill,
    check_norm_kernel,
    dependent_launch,
    dependent_launch_steps,
    engine_run,
    log,
    lookahead_pairs,
    norm_kernel,
    profile_step,
    random_prompt,
    time_gemms,
    time_step,
    time_step_attention,
    time_step_norm,
    time_step_unfused_rope,
)
from bot.config import GenerationConfig, ModelConfig, settings_from_generation
from bot.engine import rowquant
from bot.engine.batched import BatchedEngine
from bot.engine.fidelity import relative_error
from bot.engine.transformers import TransformersEngine
from bot.errors import ConfigError


def _load(path: Path, backend: str, max_batch: int, batch_kernel: str = "auto") -> TransformersEngine:
    raw = backend == "marlin-raw"
    cfg = ModelConfig(id=str(path), device_map="cuda:0", dtype="float16",
                      gptq_backend="marlin" if raw else backend,  # type: ignore[arg-type]
                      max_batch=max_batch, context_length=4096,
                      batch_kernel=batch_kernel)  # type: ignore[arg-type]
    loader = TransformersEngine(cfg)
    loader.regroup_channelwise = not raw
    loader.fuse_for_batches = True
    loader.load()
    return loader


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def reference_logits(path: Path, vocab: int) -> tuple[list[int], torch.Tensor]:
    loader = _load(path, "torch", 1)
    ids = random_prompt(torch.Generator().manual_seed(7), 48, vocab)
    with torch.no_grad():
        ref = loader.model(torch.tensor([ids], device="cuda:0")).logits[0].float().cpu()
    del loader
    _free()
    return ids, ref


def time_prefill(engine: BatchedEngine, n: int, vocab: int) -> float:
    core = engine.core
    assert core is not None
    ids = random_prompt(torch.Generator().manual_seed(3), n, vocab)
    core.prefill(0, ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        core.prefill(0, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def dependent_launch_rows(engine: BatchedEngine, model: Any, vocab: int, probe: Any) -> dict[str, Any]:
    """The project's kernels as programmatic dependent launches: the load
    check and the step against the forward with them (three times over: a
    race would not show every time), the step and the products plain and
    dependent (alternating), the row kernel letting the next kernel launch
    as soon as its blocks have waited or once they have summed, and the row
    kernel's rows a warp and words a half sum at one row with them."""
    core = engine.core
    assert core is not None
    out: dict[str, Any] = {}
    with dependent_launch(core, True) as used:
        out["dependent_launch"] = used
        if not used:
            return out
        try:
            out["dependent_load_check"] = engine.verify(probe)
        except ConfigError as exc:
            out["dependent_refused"] = str(exc)
        out["dependent_step_errs"] = [check_logits(engine, model, vocab, 48, rows=r)[1] for r in (2, 1, 2)]
    out.update(dependent_launch_steps(core, 1100))
    kernels = rowquant._kernels()
    with dependent_launch(core, True):
        try:
            for late in (False, True, False, True):
                kernels.set_gemv_late_trigger(late)
                core.reset_graphs()
                key = "late" if late else "early"
                out.setdefault(f"{key}_trigger_step_ms_1", []).append(1e3 * time_step(core, 1, 1100))
                out.setdefault(f"{key}_trigger_gemms_ms_1", []).append(1e3 * time_gemms(core, 1))
            out["late_trigger_one_row_err"] = check_logits(engine, model, vocab, 48, rows=1)[1]
        finally:
            kernels.set_gemv_late_trigger(False)
            core.reset_graphs()
        own = rowquant.ROWS_PER_WARP, rowquant.ONE_ROW_WORDS
        try:  # the row kernel's shape at one row under dependent launches: rows a warp, words a half sum
            shapes = ((4, 4), (2, 4), (8, 4), (4, 2))
            for rows, words in shapes * 2:
                rowquant.ROWS_PER_WARP, rowquant.ONE_ROW_WORDS = rows, words
                core.reset_graphs()
                out.setdefault(f"rows{rows}_words{words}_step_ms_1", []).append(1e3 * time_step(core, 1, 1100))
            for rows, words in shapes[1:]:
                rowquant.ROWS_PER_WARP, rowquant.ONE_ROW_WORDS = rows, words
                core.reset_graphs()
                out[f"rows{rows}_words{words}_one_row_err"] = check_logits(engine, model, vocab, 48, rows=1)[1]
        finally:
            rowquant.ROWS_PER_WARP, rowquant.ONE_ROW_WORDS = own
            core.reset_graphs()
        log(json.dumps(out, default=str))
    return out


def one(path: Path, backend: str, ref_ids: list[int], ref: torch.Tensor, vocab: int,
        profile: bool = False, batch_kernel: str = "auto", sweep: bool = True,
        focus: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"backend": backend, "batch_kernel": batch_kernel}
    t0 = time.perf_counter()
    try:
        loader = _load(path, backend, 32, batch_kernel)
    except ConfigError as exc:
        row["refused"] = str(exc)
        return row
    except Exception as exc:  # a kernel that does not load at all
        row["error"] = repr(exc)[:300]
        return row
    row["load_s"] = time.perf_counter() - t0
    row["kernel"] = loader.describe().get("gptq kernel", "")
    model = loader.model
    engine = BatchedEngine.over(model, loader.tokenizer, loader.config, eos_ids=(), max_len=1281,
                                compile_glue=True)
    engine._description = loader.describe()
    core = engine.core
    assert core is not None
    core.set_products(loader.layer_products)
    try:
        row["verify"] = engine.verify(loader.probe_logits)
    except ConfigError as exc:
        row["refused"] = str(exc)
    pe, se = check_logits(engine, model, vocab, 48)
    row["own_prefill_err"], row["own_step_err"] = pe, se
    with torch.no_grad():
        out = model(torch.tensor([ref_ids], device=model.device)).logits[0].float().cpu()
    row["vs_torch_ref_err"] = relative_error(out, ref)
    row["finite"] = bool(torch.isfinite(out).all())
    if "refused" not in row:
        row["long_prefill_err"] = check_long_prefill(engine, model, vocab, 1000)
        row["step_ms_1"] = 1e3 * time_step(core, 1, 1100)
        row["step_ms_2"] = 1e3 * time_step(core, 2, 1100)
        row["step_ms_32"] = 1e3 * time_step(core, 32, 1100)
        row["gemms_ms_1"] = 1e3 * time_gemms(core, 1)
        if focus == "dependent":  # this round's question alone, then the conversation
            row.update(dependent_launch_rows(engine, model, vocab, loader.probe_logits))
            log(json.dumps(row, default=str))
            row["lookahead"] = asyncio.run(lookahead(engine, vocab))
            with dependent_launch(core, False):
                row["plain_lookahead"] = asyncio.run(lookahead(engine, vocab))
            del engine, core, model, loader
            _free()
            return row
        for n in (1, 32):  # the same step with rope compiled alone and the cache writes eager
            row[f"unfused_rope_step_ms_{n}"] = 1e3 * time_step_unfused_rope(core, n, 1100)
        if core.products:  # words a half sum at one row (rowquant.ONE_ROW_WORDS): 4 against the forward
            row.update(one_row_words(engine, model, vocab, loader.probe_logits))
        row["lookahead"] = asyncio.run(lookahead(engine, vocab))
        log(json.dumps(row, default=str))  # so far: the attention kernels below are new to the card
        row["attention_kernel_err"] = check_attention_kernel(core)
        for n in (1, 32):  # the same step with the decode attention kernels, then in torch's matmuls
            row[f"attention_kernel_step_ms_{n}"] = 1e3 * time_step_attention(core, n, 1100, True)
            row[f"matmul_attention_step_ms_{n}"] = 1e3 * time_step_attention(core, n, 1100, False)
        with attention_kernels(core, True) as used:  # steps of any size with the kernels, against the forward
            if used:
                row["attention_kernel_load_check"] = engine.verify(loader.probe_logits)
                row["attention_kernel_own_step_err"] = check_logits(engine, model, vocab, 48)[1]
                row["attention_kernel_one_row_err"] = check_logits(engine, model, vocab, 48, rows=1)[1]
        row["norm_kernel_err"] = check_norm_kernel(core)
        for n in (1, 32):  # the same step with the residual add + RMSNorm in its kernel, then in the compiled glue
            row[f"norm_kernel_step_ms_{n}"] = 1e3 * time_step_norm(core, n, 1100, True)
            row[f"glue_norm_step_ms_{n}"] = 1e3 * time_step_norm(core, n, 1100, False)
        with norm_kernel(core, not core.norm_kernel) as used:  # the step the other way, against the forward
            row["norm_kernel_other_way"] = used
            row["norm_kernel_other_way_step_err"] = check_logits(engine, model, vocab, 48)[1]
        if profile:
            row["profile_step_1"] = profile_step(core, 1, 1100)
            print(row["profile_step_1"], flush=True)
        row["prefill_1000_ms"] = 1e3 * time_prefill(engine, 1000, vocab)
        for n in (64, 128, 256, 512, 1000) if sweep else ():
            row[f"prefill_ms_{n}"] = 1e3 * time_prefill(engine, n, vocab)
            if core.products:  # the crossover: dequantize + cuBLAS against the batch kernel
                saved, core.prompt_min_tokens = core.prompt_min_tokens, 1
                row[f"prefill_dequant_ms_{n}"] = 1e3 * time_prefill(engine, n, vocab)
                core.prompt_min_tokens = 10**9
                row[f"prefill_batch_ms_{n}"] = 1e3 * time_prefill(engine, n, vocab)
                core.prompt_min_tokens = saved
    del engine, core, model, loader
    _free()
    return row


async def lookahead(engine: BatchedEngine, vocab: int) -> dict[str, Any]:
    """One conversation (a 1,000-token prompt, 128 tokens) with the
    scheduler's lookahead off and on, alternating, and whether it changed
    the greedy reply (bench.gpu_measure.lookahead_pairs)."""
    prompt = random_prompt(torch.Generator().manual_seed(3), 1000, vocab)
    settings = settings_from_generation(GenerationConfig(max_new_tokens=128))
    await engine.start()
    try:
        await engine_run(engine, [prompt], settings, time_graph=False)  # captures out of the pairs
        return await lookahead_pairs(engine, [prompt], settings)
    finally:
        await engine.close()


def one_row_words(engine: BatchedEngine, model: Any, vocab: int, probe: Any) -> dict[str, Any]:
    """The one-row step and its products with 2 and 4 words a half sum in the
    row kernel (alternating), and each one's load check and one-row step
    against the forward. The module's own setting is put back."""
    core = engine.core
    assert core is not None
    own, out = rowquant.ONE_ROW_WORDS, {}
    try:
        for words in (2, 4, 2, 4):  # alternating: a drift of the card's clocks shows
            rowquant.ONE_ROW_WORDS = words
            core.reset_graphs()
            out.setdefault(f"words{words}_step_ms_1", []).append(1e3 * time_step(core, 1, 1100))
            out.setdefault(f"words{words}_gemms_ms_1", []).append(1e3 * time_gemms(core, 1))
        for words in (2, 4):
            rowquant.ONE_ROW_WORDS = words
            core.reset_graphs()
            try:
                out[f"words{words}_load_check"] = engine.verify(probe)
            except ConfigError as exc:
                out[f"words{words}_refused"] = str(exc)
            out[f"words{words}_one_row_err"] = check_logits(engine, model, vocab, 48, rows=1)
    finally:
        rowquant.ONE_ROW_WORDS = own
        core.reset_graphs()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--backends", default="marlin,marlin-raw,torch,triton,exllama_v2")
    ap.add_argument("--groups", default="-1,128")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--batch-kernel", default="auto", choices=["auto", "marlin", "mma"],
                    help="[model] batch_kernel for every backend (mma: no Marlin build where none is needed)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false",
                    help="skip the prefill crossover sweep (64-1,000 tokens, three ways each)")
    ap.add_argument("--profile-step", action="store_true",
                    help="also the one-row decode step's GPU time by kernel (torch's profiler)")
    ap.add_argument("--focus", default="", choices=["", "dependent"],
                    help="dependent: after the checks, the dependent launches' measurements alone")
    a = ap.parse_args(argv)
    results: list[dict[str, Any]] = []
    for group in [int(g) for g in a.groups.split(",")]:
        shape = replace(XWIN_70B, layers=a.layers, group=group, desc_act=True)
        path = Path(f"/dev/shm/xwin-fid-g{group}-l{a.layers}")
        build_checkpoint(path, shape)
        ref_ids, ref = reference_logits(path, shape.vocab)
        log(f"group {group}: reference (torch kernel) ready")
        for backend in a.backends.split(","):
            if group > 0 and backend == "marlin-raw":
                continue
            row = one(path, backend, ref_ids, ref, shape.vocab, a.profile_step, a.batch_kernel, a.sweep, a.focus)
            row["group"] = group
            log(json.dumps(row, default=str))
            results.append(row)
            if a.out is not None:
                a.out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results, a.layers), flush=True)
    return 0


def table(rows: list[dict[str, Any]], layers: int) -> str:
    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, float) and math.isfinite(x) else str(x if x is not None else "")

    lines = [
        f"{layers} layers, act order; errors are relative L2 of logits",
        "| group | gptq_backend | kernel | load check | batched vs own forward (prefill / graph step) | "
        "forward vs torch kernel | 1k prefill vs forward | step ms 1 / 32 rows | products ms | 1k prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "refused" if "refused" in r else ("error" if "error" in r else "ok")
        lines.append(
            f"| {r['group']} | {r['backend']} | {r.get('kernel', '')} | {verdict} | "
            f"{f(r.get('own_prefill_err'), '.1e')} / {f(r.get('own_step_err'), '.1e')} | "
            f"{f(r.get('vs_torch_ref_err'), '.1e')} | {f(r.get('long_prefill_err'), '.1e')} | "
            f"{f(r.get('step_ms_1'), '.2f')} / "
            f"{f(r.get('step_ms_32'), '.2f')} | {f(r.get('gemms_ms_1'), '.2f')} | "
            f"{f(r.get('prefill_1000_ms'), '.1f')} |"
        )
        if "refused" in r or "error" in r:
            lines.append(f"|  | | {r.get('refused') or r.get('error')} | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
