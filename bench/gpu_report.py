"""The benchmark's report: its results as the Markdown table docs/benchmarks.md shows.

:func:`table` reads the results dict that ``bench.gpu`` builds (and writes as
JSON with ``--out``); nothing here measures or loads anything.
"""

from __future__ import annotations

import statistics
from typing import Any, Protocol


class RunOptions(Protocol):
    """What the report needs of the run's options (``bench.gpu.Options``)."""

    batches: list[int]
    prompt_tokens: int
    new_tokens: int
    ttft_tokens: int
    baseline_tokens: int
    followup_tokens: int


def _graph_ms(res: dict[str, Any], n: int) -> float:
    run = res["runs"]["engine"].get(str(n), {})
    return float(run.get("extra", {}).get("graph_step_ms", 0.0))


def _ttft(r: dict[str, Any]) -> str:
    return f"{r['ttft_s'] * 1e3:.0f} ms (p90 {r['extra'].get('ttft_p90_s', 0.0) * 1e3:.0f})"


def _gap(r: dict[str, Any]) -> str:
    """Each conversation's longest wait between two tokens: median (max) over them."""
    if "gap_p50_s" not in r["extra"]:
        return "-"
    return f"{r['extra']['gap_p50_s'] * 1e3:.0f} ms (max {r['extra']['gap_max_s'] * 1e3:.0f})"


def _ratio(res: dict[str, Any], key: str) -> str:
    """worker/engine at one batch: the median of the pairs' ratios and, with
    more than one pair, their range in brackets."""
    r = res.get("worker_engine", {}).get(key)
    if r is None:
        return ""
    if len(r["pairs"]) < 2:
        return f"{r['ratio']:.3f}"
    return f"{r['ratio']:.3f} ({r['min']:.2f}–{r['max']:.2f})"


def _pair_count(res: dict[str, Any]) -> int:
    return max((len(r["pairs"]) for r in res.get("worker_engine", {}).values()), default=1)


def _chunk_rows(res: dict[str, Any], opt: RunOptions, short: bool = False) -> list[str]:
    variants = res.get("short_burst" if short else "chunk_variants") or {}
    if not variants:
        return []
    title = (
        f"short prompts: {max(opt.batches)} prompts of {res.get('short_burst_len', 0):.0f} tokens arriving "
        "together, engine only, cold, each in a forward of its own and then a step (apart) or packed "
        "into shared forwards with the steps (mixed)"
        if short else
        f"chunked prefill: {max(opt.batches)} prompts arriving together, engine only, cold, "
        f"once per prefill chunk (the batch runs above: {res.get('prefill_chunk', '-')})"
    )
    lines = [
        title,
        "",
        "| prefill chunk | wall s | ms/token each | TTFT median (p90) | longest gap median (max) | "
        "chunks | in prefills (ms per 1k tokens) | of them mixed | in steps | elsewhere |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in variants.items():
        chunk, _, mode = key.partition(" ")
        label = (chunk if chunk != "0" else "off") + (f" {mode}" if mode else "")
        w = r["extra"].get("where") or {}
        lines.append(
            f"| {label} | {r['wall_s']:.2f} | {r['decode_ms_per_token']:.1f} | "
            f"{_ttft(r)} | {_gap(r)} | {r['extra'].get('prefill_chunks', 0)} | "
            f"{w.get('prefill_s', 0.0):.2f} s, {w.get('prefills', 0)} ({w.get('prefill_ms_per_1k_tokens', 0.0):.0f}) | "
            f"{w.get('mixed', 0)} | {w.get('step_s', 0.0):.2f} s, {w.get('steps', 0)} | {w.get('other_s', 0.0):.2f} s |"
        )
    return [*lines, "(prefill and step times: each call between two synchronizations; a mixed forward, "
                    "a chunk with the decode step, counts as a prefill)", ""]


def _batch_kernel_rows(res: dict[str, Any]) -> list[str]:
    """The decode step with fused Marlin and with the row packing's
    tensor-core kernel ([model] batch_kernel), where the run timed both."""
    k = res.get("batch_kernels") or {}
    batches = sorted(int(key.rsplit("_", 1)[1]) for key in k if key.startswith("mma_step_ms_"))
    if not batches:
        return []
    lines = [
        f"decode step (graph replay) with each batch kernel; the tensor-core kernel's logits against "
        f"transformers' forward: prefill {k['check_prefill_rel_err']:.1e}, two-row step "
        f"{k['check_step_rel_err']:.1e}; GPU memory free after: {k.get('free_gb_after', 0.0):.1f} GB",
        "",
        "| rows | fused Marlin: step (products) ms | tensor-core kernel: step (products) ms |",
        "|---|---|---|",
    ]
    for n in batches:
        lines.append(f"| {n} | {k[f'marlin_step_ms_{n}']:.2f} ({k[f'marlin_gemms_ms_{n}']:.2f}) | "
                     f"{k[f'mma_step_ms_{n}']:.2f} ({k[f'mma_gemms_ms_{n}']:.2f}) |")
    return [*lines, "(one row: the row kernel either way)", ""]


def table(res: dict[str, Any], opt: RunOptions) -> str:
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
    ]
    if res.get("single_ms_step"):  # batch 1 was run
        lines.append(f"| decode, 1 conversation | {res['single_ms_step']:.1f} ms/step, "
                     f"{1e3 / res['single_ms_step']:.1f} tok/s |")
    lines += [
        f"| decode step alone (graph replay), {min(opt.batches)} / {max(opt.batches)} conversations | "
        f"{_graph_ms(res, min(opt.batches)):.2f} / {_graph_ms(res, max(opt.batches)):.2f} ms |",
        f"| TTFT, {opt.ttft_tokens}-token prompt | {res['ttft_s'] * 1e3:.0f} ms "
        f"(generate(): {res['ttft_generate_s'] * 1e3:.0f} ms) |",
    ]
    if "ttft_followup_s" in res:  # --followup-tokens 0 skips it
        lines.append(
            f"| TTFT, follow-up of 20 tokens in a {opt.followup_tokens}-token thread | "
            f"{res['ttft_followup_s'] * 1e3:.0f} ms ({res.get('followup_reused_tokens', 0)} tokens "
            f"reused; the thread's first prompt: {res.get('ttft_thread_cold_s', 0.0) * 1e3:.0f} ms; "
            f"the first thread: {res.get('ttft_followup_first_s', 0.0) * 1e3:.0f} / "
            f"{res.get('ttft_thread_cold_first_s', 0.0) * 1e3:.0f} ms) |"
        )
    fresh = res.get("fresh_lengths")
    if fresh:  # --fresh-lengths
        med = {w: {k: statistics.median(v) for k, v in d.items()} for w, d in fresh.items()}
        lines.append(
            f"| TTFT, prompts of new lengths (~{opt.ttft_tokens + 101} tokens), first / again, median of "
            f"{len(fresh['flash']['first'])} | attention on torch's choice (cuDNN on Hopper) "
            f"{med['cudnn']['first']:.0f} / {med['cudnn']['again']:.0f} ms; flash (the engine's) "
            f"{med['flash']['first']:.0f} / {med['flash']['again']:.0f} ms |"
        )
    lines += [
        "",
        "| conversations | path | wall tok/s | decode tok/s | ms/token each | TTFT median (p90) | "
        "longest gap median (max) | % of floor | worker/engine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs = res["runs"]
    for n in opt.batches:
        key = str(n)
        for kind in ("engine", "worker", "generate", "generate_batch"):
            r = runs[kind].get(key)
            if r is None:
                continue
            ratio = _ratio(res, key) if kind == "worker" else ""
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
                f"{r['decode_ms_per_token']:.1f} | {_ttft(r)} | {_gap(r)} | {pct:.0f}% | {ratio} |"
            )
    lines.append("")
    lines += _chunk_rows(res, opt)
    lines += _chunk_rows(res, opt, short=True)
    if la := res.get("lookahead"):
        lines.append(
            "one conversation, decode tok/s, the scheduler reading each step before queuing the next / "
            "queuing one step ahead (alternating runs): "
            + ", ".join(f"{x:.1f}" for x in la["off"]) + " / " + ", ".join(f"{x:.1f}" for x in la["on"])
            + f"; greedy reply the same both ways: {la.get('same_ids')}"
        )
    if gp := res.get("greedy_pairs"):
        lines.append(
            "one conversation, decode tok/s, sampled (the settings above) / greedy (alternating runs): "
            + ", ".join(f"{x:.1f}" for x in gp["sampled"]) + " / " + ", ".join(f"{x:.1f}" for x in gp["greedy"])
        )
    if cs := res.get("cpu_split"):
        lines.append(
            "one conversation, the scheduler thread's ms a call (median), lookahead off / on: "
            + "; ".join(
                f"{part} {cs['off'].get(part + '_ms', 0.0):.3f} / {cs['on'].get(part + '_ms', 0.0):.3f}"
                for part in ("step", "sample", "read")
            )
            + f"; a token {cs['off']['decode_ms_per_token']:.2f} / {cs['on']['decode_ms_per_token']:.2f}"
        )
    if pr := res.get("profile_one"):
        lines.append(
            f"one conversation of 32 tokens under torch's profiler: {pr['decode_ms_per_token']:.2f} ms a token, "
            f"the GPU busy {pr['gpu_busy_ms_per_token']:.2f} ms of it (every kernel's and copy's own time, "
            "less the prompt's prefill: the same prompt with one token, profiled alone)"
        )
    if sm := res.get("sampler_ms"):
        lines.append(
            "the sampler alone, launched behind other work, ms a call (its GPU time / the call on the CPU): "
            + "; ".join(f"{k.replace('_', ' at ')} rows {g:.3f} / {w:.3f}" for k, (g, w) in sm.items())
        )
    if waits := res.get("sampler_waits"):
        lines.append(
            "waits for the GPU (torch's sync debug mode): "
            + "; ".join(f"{k.replace('_', ' ')} {'yes' if w else 'no'}" for k, w in waits.items())
        )
    d = res.get("diag", {})
    for n in sorted({min(opt.batches), max(opt.batches)}):
        if f"gemms_ms_{n}" in d:
            lines.append(
                f"step at {n}: {d[f'step_ms_{n}']:.2f} ms as run; rope and the cache writes unfused "
                f"{d.get(f'step_unfused_rope_ms_{n}', 0.0):.2f} ms; attention in the decode attention kernels / "
                f"torch's matmuls {d.get(f'step_attention_kernel_ms_{n}', 0.0):.2f} / "
                f"{d.get(f'step_matmul_attention_ms_{n}', 0.0):.2f} ms; residual add + RMSNorm in its kernel / "
                f"the compiled glue {d.get(f'step_norm_kernel_ms_{n}', 0.0):.2f} / "
                f"{d.get(f'step_glue_norm_ms_{n}', 0.0):.2f} ms; without compiled glue "
                f"{d[f'step_plain_ms_{n}']:.2f} ms; also with the module's RMSNorm "
                f"{d[f'step_module_norm_ms_{n}']:.2f} ms; its GPTQ products alone "
                f"{d[f'gemms_ms_{n}']:.2f} ms"
            )
    lines += _batch_kernel_rows(res)
    lines.append(
        "floor: N x copy bandwidth / (weight bytes + N x context x KV bytes/token); "
        "decode tok/s: sum over conversations of (tokens-1)/(last-first token time); "
        "wall tok/s: all new tokens / (first submission -> last token), prefill included; "
        "longest gap: each conversation's longest wait between two of its tokens after the first; "
        f"engine and worker rows: each one's median run (by wall tok/s) of {_pair_count(res)}, the two "
        "alternating in ABBA order (E W, W E, ...); "
        "worker/engine: the median over the pairs of worker wall tok/s / engine wall tok/s (range)"
    )
    return "\n".join(lines)

