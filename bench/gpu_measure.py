"""The benchmark's measurements, each through the bot's own code.

Device bandwidth (:func:`copy_bandwidth`); one decode step's GPU time and its
quantized products' share (:func:`time_step`, :func:`time_gemms`,
:func:`step_breakdown`); N conversations through the batched engine
(:func:`engine_run`), through the bot's worker (:func:`worker_run`), the two
alternately in pairs (:func:`paired_runs`), through
sequential ``generate()`` and transformers' ``generate_batch`` (the baselines);
a follow-up's TTFT with its prefix reused (:func:`followup_run`); and the
batched path's logits against transformers' forward (:func:`check_logits`,
:func:`check_long_prefill`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend

from bot.config import BotConfig, Config, GenerationConfig
from bot.engine import attention
from bot.engine import norm as residual_norm
from bot.engine.base import StreamStats
from bot.engine.batched import BatchedEngine, DecodeCore
from bot.engine.batched.core import PROMPT_ATTENTION, Fill, _glue_rope_qk
from bot.engine.batched.sampler import Sampler
from bot.engine.batched.scheduler import ADMIT_WAIT_S, _Launched
from bot.engine.fidelity import forward_logits, relative_error
from bot.engine.transformers import generation_kwargs
from bot.types import ConversationKey, Incoming, QuietSink, Settings


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def timed_call(fn: Callable[[], object], device: torch.device, busy_first: bool = False) -> tuple[float, float]:
    """One call of ``fn``: (seconds of GPU time between two events around it,
    seconds the call itself takes on the CPU). ``busy_first``: the GPU is
    kept busy (~1 ms of ``torch.cuda._sleep``) while it is launched, as the
    scheduler launches work behind a decode step. On the CPU both are the
    call's time."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return dt, dt
    if busy_first:
        torch.cuda.synchronize(device)
    e0 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    e1 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    if busy_first:
        torch.cuda._sleep(2_000_000)  # type: ignore[no-untyped-call]  # ~1 ms at ~2 GHz
    e0.record()
    t0 = time.perf_counter()
    fn()
    dt_cpu = time.perf_counter() - t0
    e1.record()
    e1.synchronize()
    return float(e0.elapsed_time(e1)) / 1e3, dt_cpu


def time_step(core: DecodeCore, n: int, ctx: int, reps: int = 20) -> float:
    """Median seconds of one decode step (graph replay, or eager) for n rows
    reading ``ctx`` positions; writes only at the scratch position."""
    times: list[float] = []
    with torch.no_grad():
        for i in range(reps + 3):
            core.tokens[:n].fill_(1)
            core.positions[:n].fill_(core.scratch)
            bb, cb = core.buckets(n, ctx - 1)
            if core.device.type == "cuda" and core.use_graphs:
                graph, _ = core._graph(bb, cb)  # captured before the events
                dt = timed_call(graph.replay, core.device)[0]
            else:
                dt = timed_call(lambda: core._decode_body(bb, cb), core.device)[0]  # noqa: B023 (called at once)
            if i >= 3:
                times.append(dt)
    times.sort()
    return times[len(times) // 2]


def profile_step(core: DecodeCore, n: int, ctx: int, reps: int = 10) -> str:
    """GPU time by kernel over ``reps`` decode steps of ``n`` rows (as
    :func:`time_step` runs them), torch's profiler table: where a step's time
    outside the products goes."""
    time_step(core, n, ctx, reps=1)  # captured and warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_step(core, n, ctx, reps=reps)
    table: str = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    return table


async def cpu_split(engine: BatchedEngine, prompt: list[int], settings: Settings) -> dict[str, float]:
    """One conversation with the scheduler thread's time split, nothing
    synchronized that the engine does not: the median ms a call of
    ``DecodeCore.step`` (the inputs' copies and the graph's launch),
    ``Sampler.sample_ids`` (its launches) and a queued step's read (the wait
    for its tokens), and the decode time a token. A launch that took about a
    step would mean the launch itself waits for the GPU."""
    scheduler, core = engine.scheduler, engine.core
    assert scheduler is not None and core is not None
    spans: dict[str, list[float]] = {"step": [], "sample": [], "read": []}

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spans[key].append(time.perf_counter() - t0)
        return wrapper

    read = _Launched.read
    setattr(core, "step", timed("step", core.step))  # noqa: B010 (instance attributes over the methods)
    setattr(scheduler.sampler, "sample_ids", timed("sample", scheduler.sampler.sample_ids))  # noqa: B010
    setattr(_Launched, "read", timed("read", read))  # noqa: B010
    try:
        r = await engine_run(engine, [prompt], settings, time_graph=False)
    finally:
        delattr(core, "step")
        delattr(scheduler.sampler, "sample_ids")
        setattr(_Launched, "read", read)  # noqa: B010
    out = {f"{key}_ms": 1e3 * statistics.median(v) for key, v in spans.items() if v}
    out["decode_ms_per_token"] = r.decode_ms_per_token
    return out


async def one_conversation_diagnostics(
    engine: BatchedEngine, prompts: list[list[int]], settings: Settings
) -> dict[str, Any]:
    """Where one conversation's time a token goes beyond the graph step
    (``prompts``: that one conversation's, as the worker sends it): lookahead
    off and on (:func:`lookahead_pairs`), sampled against greedy
    (alternating), the scheduler thread's time split both ways
    (:func:`cpu_split`) and 32 tokens under torch's profiler
    (:func:`profile_conversation`). A part that fails is logged and left out:
    the run's other figures stand."""
    scheduler = engine.scheduler
    assert scheduler is not None
    own = scheduler.lookahead
    out: dict[str, Any] = {"lookahead": await lookahead_pairs(engine, prompts, settings)}
    log(f"lookahead off / on, one conversation, decode tok/s: {out['lookahead']}")
    pairs: dict[str, list[float]] = {"sampled": [], "greedy": []}
    for key, s in (("sampled", settings), ("greedy", replace(settings, temperature=0.0))) * 2:
        pairs[key].append((await engine_run(engine, prompts, s, time_graph=False)).decode_tok_s)
    out["greedy_pairs"] = pairs
    log(f"one conversation sampled / greedy, decode tok/s: {pairs}")
    try:
        split = {}
        for key in ("off", "on"):
            scheduler.lookahead = key == "on"
            split[key] = await cpu_split(engine, prompts[0], settings)
        out["cpu_split"] = split
        log(f"one conversation, the scheduler's time a call (ms), lookahead off / on: {split}")
        prof = out["profile_one"] = await profile_conversation(
            engine, prompts[0], replace(settings, max_new_tokens=32)
        )
        log(f"one conversation under the profiler: {prof['decode_ms_per_token']:.2f} ms a token, "
            f"GPU busy {prof['gpu_busy_ms_per_token']:.2f} ms a token\n{prof['table']}")
    except Exception as exc:  # diagnostics only: the run goes on without them
        log(f"one conversation's diagnostics stopped: {exc!r}")
    finally:
        scheduler.lookahead = own
    return out


async def profile_conversation(engine: BatchedEngine, prompt: list[int], settings: Settings) -> dict[str, Any]:
    """One conversation through the engine under torch's profiler: the
    decode time a token against the GPU's busy time a decode step (the sum
    of every kernel's and copy's own time, whichever thread launched them,
    less that of the same prompt with one token: its prefill), and the table
    of kernels by GPU time. Busy time well below the time a token means the
    GPU waits for the CPU; close to it, the work is on the GPU. (The
    scheduler thread's CPU ops are not recorded, :func:`cpu_split` times
    them: on the CPU the table is near empty.)"""
    on_gpu = engine.core is not None and engine.core.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    async def profiled(s: Settings) -> tuple[RunResult, Any, float]:
        with torch.profiler.profile(activities=activities) as prof:
            r = await engine_run(engine, [prompt], s, time_graph=False)
        events = prof.key_averages()
        busy_us = sum(float(getattr(e, "self_device_time_total", 0.0)) for e in events) if on_gpu else 0.0
        return r, events, busy_us

    _, _, prefill_us = await profiled(replace(settings, max_new_tokens=1))
    r, events, busy_us = await profiled(settings)
    steps = max(1, r.tokens - 1)
    return {
        "decode_ms_per_token": r.decode_ms_per_token,
        "gpu_busy_ms_per_token": max(0.0, busy_us - prefill_us) / 1e3 / steps,
        "table": events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                              row_limit=25, max_name_column_width=70),
    }


def time_gemms(core: DecodeCore, n: int, reps: int = 10) -> float:
    """Median seconds of the quantized matrix products of one decode step
    alone (graph-captured; 7 per layer, or 4 where the core has fused
    products, through the kernels a step of ``n`` rows uses): the kernels'
    share of a step."""
    if core.device.type != "cuda":
        return 0.0
    cfg = core.model.config
    x = torch.randn(n, cfg.hidden_size, dtype=core.dtype, device=core.device) * 0.1
    a = torch.randn(n, cfg.intermediate_size, dtype=core.dtype, device=core.device) * 0.1

    row = n <= core.row_max_rows

    def body() -> None:
        for li in range(len(core.layers)):
            for name in ("qkv", "o", "gate_up"):
                core._proj(li, name, x, row)
            core._proj(li, "down", a, row)

    with torch.no_grad():
        body()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=core._pool):
            body()
        times = []
        for _ in range(reps):
            e0 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            e1 = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            times.append(float(e0.elapsed_time(e1)) / 1e3)
    times.sort()
    return times[len(times) // 2]


def unfused_rope_store(rope_qk: Any) -> Any:
    """The decode step's rope and cache writes as they were before
    ``_glue_rope_store``: rope compiled alone, k and v written by two eager
    index writes (the same-run baseline of that fusion)."""

    def store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              k_cache: torch.Tensor, v_cache: torch.Tensor, layer: torch.Tensor, rows: torch.Tensor,
              pos: torch.Tensor) -> torch.Tensor:
        q, k = rope_qk(q, k, cos, sin)
        k_cache[layer, rows, :, pos] = k
        v_cache[layer, rows, :, pos] = v
        return q  # type: ignore[no-any-return]

    return store


def time_step_unfused_rope(core: DecodeCore, n: int, ctx: int) -> float:
    """:func:`time_step` with :func:`unfused_rope_store` in the compiled
    glue's place (0.0 without compiled glue); the core is left as found."""
    if core.glue is None:
        return 0.0
    fused = core.glue["rope_store"]
    core.glue["rope_store"] = unfused_rope_store(torch.compile(_glue_rope_qk, fullgraph=True))
    core.reset_graphs()
    try:
        return time_step(core, n, ctx)
    finally:
        core.glue["rope_store"] = fused
        core.reset_graphs()


@contextmanager
def attention_kernels(core: DecodeCore, on: bool) -> Iterator[bool]:
    """Inside the block, every decode step's attention in the decode attention
    kernels (``on``, at any number of rows) or in torch's matmuls and
    softmax; yields whether the kernels are used (False where they do not
    take this model). The core's own setting is put back."""
    own = core.attention_kernel, core.attention_max_rows
    try:
        yield core.set_attention_kernel(on, core.max_batch)
    finally:
        core.set_attention_kernel(*own)


def time_step_attention(core: DecodeCore, n: int, ctx: int, kernel: bool) -> float:
    """:func:`time_step` with the attention in the decode attention kernels
    (``kernel``) or in torch's matmuls (:func:`attention_kernels`; 0.0 where
    the kernels do not take this model). (:func:`time_step` puts every row at
    the scratch position: both forms read the whole bucket.)"""
    with attention_kernels(core, kernel) as used:
        return time_step(core, n, ctx) if used == kernel else 0.0


@contextmanager
def norm_kernel(core: DecodeCore, on: bool) -> Iterator[bool]:
    """Inside the block, the compiled step's residual add + RMSNorm in
    bot/engine/norm.py's kernel (``on``) or in the compiled glue; yields
    whether the kernel is used. The core's own setting is put back."""
    own = core.norm_kernel
    try:
        yield core.set_norm_kernel(on)
    finally:
        core.set_norm_kernel(own)


def time_step_norm(core: DecodeCore, n: int, ctx: int, kernel: bool) -> float:
    """:func:`time_step` with the residual add + RMSNorm in its kernel
    (``kernel``) or in the compiled glue (0.0 where the kernel does not take
    this model)."""
    with norm_kernel(core, kernel) as used:
        return time_step(core, n, ctx) if used == kernel else 0.0


def check_norm_kernel(core: DecodeCore, rows: Sequence[int] = (1, 2, 32)) -> float:
    """The residual add + RMSNorm kernel against its torch form in float (the
    sum rounded to half first, as both round it), on random rows of this
    model's width and its first layer's norm weight: the largest error
    relative to the largest output (0.0 where the kernel does not take this
    model)."""
    hidden = int(core.embed.weight.shape[-1])
    if not residual_norm.supports(core.device, core.dtype, hidden):
        return 0.0
    g = torch.Generator(device=core.device).manual_seed(13)
    w = core.layers[0].input_layernorm.weight.detach()
    worst = 0.0
    for n in rows:
        x = 3 * torch.randn((n, hidden), generator=g, device=core.device, dtype=core.dtype)
        y = torch.randn((n, hidden), generator=g, device=core.device, dtype=core.dtype)
        s, h = residual_norm.add_rms_norm(x, y, w, 1e-5)
        ws, wh = residual_norm.reference((x + y).float(), torch.zeros_like(x, dtype=torch.float32), w.float(), 1e-5)
        worst = max(worst, float((s.float() - ws).abs().max()), float((h.float() - wh).abs().max() / wh.abs().max()))
    return worst


async def dependent_launch_pairs(engine: BatchedEngine, prompts: list[list[int]], settings: Settings,
                                 pairs: int = 2) -> dict[str, list[float]]:
    """The same conversations with the project's kernels launched plainly and
    as dependent launches, alternating: each run's decode tok/s (empty
    where the GPU does not take dependent launches). A switch drops the
    captured graphs, so each timed run follows an untimed one that captures
    them again (run N timed the first run after the switch: its captures
    counted in, 78.8-81.9 tok/s against 91.7 without them)."""
    core = engine.core
    assert core is not None
    out: dict[str, list[float]] = {"plain": [], "dependent": []}
    for _ in range(pairs):
        for key in ("plain", "dependent"):
            with dependent_launch(core, key == "dependent") as used:
                if used != (key == "dependent"):
                    return {}
                await engine_run(engine, prompts, settings, time_graph=False)  # the graphs captured again
                out[key].append((await engine_run(engine, prompts, settings, time_graph=False)).decode_tok_s)
    return out


@contextmanager
def dependent_launch(core: DecodeCore, on: bool) -> Iterator[bool]:
    """Inside the block, the project's kernels launched as programmatic
    dependent launches (``on``) or plainly; yields whether they are
    dependent (False where the GPU does not take them). The core's own
    setting is put back."""
    own = core.dependent_launch
    try:
        yield core.set_dependent_launch(on)
    finally:
        core.set_dependent_launch(own)


def dependent_launch_steps(core: DecodeCore, ctx: int, rows: Sequence[int] = (1, 32),
                           pairs: int = 2) -> dict[str, list[float]]:
    """The decode step (each of ``rows``) and the one-row products alone with
    the project's kernels launched plainly and as dependent launches,
    alternating ``pairs`` times (ms; empty where the GPU does not take
    dependent launches)."""
    out: dict[str, list[float]] = {}
    for _ in range(pairs):
        for on in (False, True):
            with dependent_launch(core, on) as used:
                if used != on:
                    return {}
                key = "dependent" if on else "plain"
                for n in rows:
                    out.setdefault(f"{key}_step_ms_{n}", []).append(1e3 * time_step(core, n, ctx))
                out.setdefault(f"{key}_gemms_ms_1", []).append(1e3 * time_gemms(core, 1))
    return out


def time_sampler(core: DecodeCore, n: int, settings: Settings, reps: int = 20) -> tuple[float, float]:
    """One ``Sampler.sample_ids`` call for ``n`` rows of random logits with
    these settings, in a sampler of its own, launched while the GPU is still
    busy (~1 ms of ``torch.cuda._sleep``), as the scheduler launches it behind
    a decode step: (median GPU seconds between two events around the call:
    its kernels back to back, no launch gaps; median seconds the call itself
    takes on the CPU: its launches, or about the sleep if it waits for the
    GPU). On the CPU both are the call's time."""
    sampler = Sampler(n, core.vocab, core.device)
    g = torch.Generator(device=core.device).manual_seed(5)
    logits = 4 * torch.randn((n, core.vocab), generator=g, device=core.device, dtype=core.dtype)
    every = [settings] * n
    gpu: list[float] = []
    cpu: list[float] = []
    for i in range(reps + 3):
        dt_gpu, dt_cpu = timed_call(lambda: sampler.sample_ids(logits, every), core.device, busy_first=True)
        if i >= 3:
            gpu.append(dt_gpu)
            cpu.append(dt_cpu)
    return statistics.median(gpu), statistics.median(cpu)


def sampler_waits(core: DecodeCore, settings: Settings, n: int = 1) -> dict[str, bool]:
    """Which of these wait for the GPU, by torch's own account
    (``torch.cuda.set_sync_debug_mode("error")`` raises on each call that
    synchronizes): ``Sampler.sample_ids`` sampled and greedy, and for
    comparison the indexed write ``seen[rows, ids] = True`` it used to make
    (docs/gpu-notes.md, item 35). Empty on the CPU (no stream to wait for)."""
    if core.device.type != "cuda":
        return {}
    sampler = Sampler(n, core.vocab, core.device)
    logits = torch.randn((n, core.vocab), device=core.device, dtype=core.dtype)
    ids = torch.zeros(n, dtype=torch.long, device=core.device)
    rows = torch.arange(n, device=core.device)

    def indexed_write() -> None:
        sampler.seen[rows, ids] = True

    calls: dict[str, Callable[[], object]] = {
        "sampled": lambda: sampler.sample_ids(logits, [settings] * n),
        "greedy": lambda: sampler.sample_ids(logits, [replace(settings, temperature=0.0)] * n),
        "indexed_write": indexed_write,
    }
    out: dict[str, bool] = {}
    for key, call in calls.items():
        call()  # once outside: the rows' settings reach the device (a copy that waits, once)
        torch.cuda.synchronize(core.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            out[key] = False
        except RuntimeError:
            out[key] = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out


def check_attention_kernel(core: DecodeCore, rows: Sequence[int] = (1, 2, 32), ctx: int = 1280) -> float:
    """The decode attention kernels against their torch form in float, on
    random caches of this model's shape, rows at assorted positions (0, the
    bucket's last, random): the largest error relative to the largest output
    (0.0 where the kernels do not take this model)."""
    if not attention.supports(core.device, core.dtype, core.head_dim, core.group):
        return 0.0
    g = torch.Generator(device=core.device).manual_seed(11)
    worst = 0.0
    for n in rows:
        shape = (n, core.n_kv, ctx + 1, core.head_dim)
        kc = torch.randn(shape, generator=g, device=core.device, dtype=core.dtype)
        vc = torch.randn(shape, generator=g, device=core.device, dtype=core.dtype)
        q = 2 * torch.randn((n, core.n_heads, core.head_dim), generator=g, device=core.device, dtype=core.dtype)
        pos = torch.randint(0, ctx, (n,), generator=g, device=core.device)
        pos[0] = 0
        if n > 1:
            pos[1] = ctx - 1
        # the split kernel reads pos before it waits for the kernel launched before it (a dependent
        # launch): pos must not be that kernel's output, as the engine's never is
        torch.cuda.synchronize(core.device)
        got = attention.decode(q, kc, vc, pos, ctx, core.scale).float()
        want = attention.reference(q.float(), kc.float(), vc.float(), pos, ctx, core.scale)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def step_breakdown(core: DecodeCore, batches: list[int], ctx: int) -> dict[str, float]:
    """Where a decode step's time goes, at each of ``batches`` rows: the step
    as run, with rope and the cache writes unfused, with the attention in
    the decode attention kernels and in torch's matmuls, with the residual
    add + RMSNorm in its kernel and in the compiled glue, with the kernels
    launched plainly (not as dependent launches), without the
    compiled glue, also with the module's own RMSNorm, and the quantized
    products alone (ms). Leaves the core as it found it."""
    diag: dict[str, float] = {}
    glued = core.glue is not None
    for n in batches:
        diag[f"gemms_ms_{n}"] = 1e3 * time_gemms(core, n)
        diag[f"step_ms_{n}"] = 1e3 * time_step(core, n, ctx)
        diag[f"step_unfused_rope_ms_{n}"] = 1e3 * time_step_unfused_rope(core, n, ctx)
        diag[f"step_attention_kernel_ms_{n}"] = 1e3 * time_step_attention(core, n, ctx, True)
        diag[f"step_matmul_attention_ms_{n}"] = 1e3 * time_step_attention(core, n, ctx, False)
        diag[f"step_norm_kernel_ms_{n}"] = 1e3 * time_step_norm(core, n, ctx, True)
        diag[f"step_glue_norm_ms_{n}"] = 1e3 * time_step_norm(core, n, ctx, False)
        with dependent_launch(core, False):
            diag[f"step_plain_launch_ms_{n}"] = 1e3 * time_step(core, n, ctx)
            diag[f"gemms_plain_launch_ms_{n}"] = 1e3 * time_gemms(core, n)
        core.set_compiled_glue(False)
        diag[f"step_plain_ms_{n}"] = 1e3 * time_step(core, n, ctx)  # fused RMSNorm only
        core.fused_norm = False
        core.reset_graphs()
        diag[f"step_module_norm_ms_{n}"] = 1e3 * time_step(core, n, ctx)
        core.fused_norm = True
        core.set_compiled_glue(glued)  # drops the graphs too
    return diag


def batch_kernel_steps(engine: BatchedEngine, model: Any, vocab: int, batches: list[int],
                       ctx: int) -> dict[str, Any]:
    """The decode step and its quantized products alone at each of ``batches``
    rows, with the products' batch modules (fused Marlin) and then without
    them (the row packing's tensor-core kernel, ``[model] batch_kernel =
    "mma"``), whose logits are checked against transformers' forward. The
    products keep no batch modules after; the GPU's free memory then is
    recorded (``free_gb_after``)."""
    core = engine.core
    assert core is not None and core.products is not None
    out: dict[str, Any] = {}
    for n in batches:
        out[f"marlin_step_ms_{n}"] = 1e3 * time_step(core, n, ctx)
        out[f"marlin_gemms_ms_{n}"] = 1e3 * time_gemms(core, n)
    for layer in core.products:
        for name in ("qkv", "o", "gate_up", "down"):
            getattr(layer, name).batch = None
    core.reset_graphs()
    if core.device.type == "cuda":
        torch.cuda.empty_cache()
        out["free_gb_after"] = torch.cuda.mem_get_info()[0] / 1e9
    out["check_prefill_rel_err"], out["check_step_rel_err"] = check_logits(engine, model, vocab, 24)
    for n in batches:
        out[f"mma_step_ms_{n}"] = 1e3 * time_step(core, n, ctx)
        out[f"mma_gemms_ms_{n}"] = 1e3 * time_gemms(core, n)
    return out


@contextmanager
def collecting(engine: BatchedEngine) -> Iterator[list[StreamStats]]:
    """The stats of every stream that finishes inside the block, in order
    (the engine keeps only its last; it calls ``on_finish`` for each)."""
    stats: list[StreamStats] = []
    engine.on_finish = stats.append  # list.append: atomic, safe from the decode thread
    try:
        yield stats
    finally:
        engine.on_finish = None


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
    # each conversation's longest wait between two tokens (a stall behind prefills)
    gaps = [s.max_gap_s for s in stats if s.new_tokens > 1]
    return RunResult(
        n=n,
        tokens=sum(s.new_tokens for s in stats),
        wall_s=wall,
        decode_ms_per_token=1e3 * statistics.mean(per_tok) if per_tok else 0.0,
        ttft_s=statistics.median([s.first_token_s for s in stats]) if stats else 0.0,
        decode_tok_s=sum(rates),
        extra={
            "ttft_p90_s": firsts[min(len(firsts) - 1, int(0.9 * len(firsts)))] if firsts else 0.0,
            "gap_p50_s": statistics.median(gaps) if gaps else 0.0,
            "gap_max_s": max(gaps, default=0.0),
        },
    )


def random_prompt(rng: torch.Generator, length: int, vocab: int) -> list[int]:
    ids: list[int] = torch.randint(259, vocab, (length - 1,), generator=rng).tolist()
    return [1, *ids]


async def engine_run(
    engine: BatchedEngine, prompts: list[list[int]], settings: Settings, cold: bool = True,
    time_graph: bool = True,
) -> RunResult:
    """N conversations straight into the engine (text streams, detok included),
    cold: no prefix of theirs is reused from earlier runs. With ``time_graph``,
    also one decode step's GPU time alone at this batch (``graph_step_ms``)."""
    scheduler = engine.scheduler
    if cold and scheduler is not None:
        scheduler.prefix.clear()
    chunks = scheduler.prefill_chunks if scheduler is not None else 0

    async def one(p: list[int]) -> None:
        async for _ in engine.stream(p, settings):
            pass

    with collecting(engine) as stats:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    res = _summarize(len(prompts), stats, wall)
    if scheduler is not None:  # prompts' chunks with a decode step after them
        res.extra["prefill_chunks"] = scheduler.prefill_chunks - chunks
    core = engine.core
    if core is not None and time_graph:  # the GPU time of one step alone, at this batch and context
        ctx = len(prompts[0]) + settings.max_new_tokens // 2
        res.extra["graph_step_ms"] = 1e3 * await asyncio.to_thread(time_step, core, len(prompts), ctx)
    return res


async def ttft_median(engine: BatchedEngine, prompt: list[int], settings: Settings, runs: int = 3,
                      time_graph: bool = True) -> float:
    """Seconds to the first token of ``prompt`` alone (one new token, cold),
    the median of ``runs`` runs."""
    one = replace(settings, max_new_tokens=1)
    return statistics.median([(await engine_run(engine, [prompt], one, time_graph=time_graph)).ttft_s
                              for _ in range(runs)])


async def fresh_length_ttft(
    engine: BatchedEngine, vocab: int, settings: Settings, base: int, count: int
) -> dict[str, dict[str, list[float]]]:
    """TTFT (ms) of a prompt alone whose length no prompt had before
    ("first"), and of the same prompt again, cold ("again"), with the
    prompts' attention on torch's own choice of SDPA backend (cuDNN's first
    on Hopper: "cudnn") and on the engine's (``core.PROMPT_ATTENTION``:
    "flash"); alternating, each way with lengths of its own (``base`` +
    2 i, + 2 i + 1), as cuDNN builds a graph for each new shape."""
    core = engine.core
    assert core is not None
    own = core.prompt_attention
    ways = {"cudnn": [SDPBackend.CUDNN_ATTENTION, *PROMPT_ATTENTION], "flash": list(PROMPT_ATTENTION)}
    out: dict[str, dict[str, list[float]]] = {w: {"first": [], "again": []} for w in ways}
    rng = torch.Generator().manual_seed(11)
    one = replace(settings, max_new_tokens=1)
    try:
        for i in range(count):
            for j, (way, backends) in enumerate(ways.items()):
                core.prompt_attention = backends
                ids = random_prompt(rng, base + 2 * i + j, vocab)
                for key in ("first", "again"):
                    r = await engine_run(engine, [ids], one, time_graph=False)
                    out[way][key].append(1e3 * r.ttft_s)
    finally:
        core.prompt_attention = own
    return out


async def lookahead_pairs(
    engine: BatchedEngine, prompts: list[list[int]], settings: Settings, pairs: int = 2
) -> dict[str, Any]:
    """The same conversations (cold) with the scheduler's lookahead off and
    on, alternating (off, on, off, on...): each run's decode tok/s, by
    setting; then the first prompt's greedy reply both ways (``same_ids``:
    whether lookahead changed a token). The scheduler's own setting is put
    back."""
    scheduler = engine.scheduler
    assert scheduler is not None
    own = scheduler.lookahead
    out: dict[str, Any] = {"off": [], "on": []}
    replies: dict[str, list[int]] = {}
    try:
        for _ in range(pairs):
            for key in ("off", "on"):
                scheduler.lookahead = key == "on"
                r = await engine_run(engine, prompts, settings, time_graph=False)
                out[key].append(r.decode_tok_s)
        for key in ("off", "on"):
            scheduler.lookahead = key == "on"
            scheduler.prefix.clear()
            replies[key] = [t async for chunk in engine.stream_ids(prompts[0], replace(settings, temperature=0.0))
                            for t in chunk]
    finally:
        scheduler.lookahead = own
    out["same_ids"] = replies["off"] == replies["on"]
    out["steps_ahead"] = scheduler.steps_ahead
    return out


@contextmanager
def traced(core: DecodeCore) -> Iterator[list[tuple[str, int, float]]]:
    """Every forward (a prompt's chunk alone: "prefill"; with decode rows:
    "mixed") and decode step the core runs inside the block, as (kind, prompt
    tokens or rows, seconds), each timed between two synchronizations (so
    the GPU time of that call alone; the syncs cost a little)."""
    spans: list[tuple[str, int, float]] = []
    forward, step = core.forward, core.step

    def sync() -> None:
        if core.device.type == "cuda":
            torch.cuda.synchronize(core.device)

    def timed(kind: str, count: int, call: Callable[[], Any]) -> Any:
        sync()
        t0 = time.perf_counter()
        out = call()
        sync()
        spans.append((kind, count, time.perf_counter() - t0))
        return out

    def timed_forward(
        fills: Sequence[Fill], tokens: Sequence[int] | torch.Tensor = (), positions: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return timed("mixed" if len(tokens) else "prefill",  # type: ignore[no-any-return]
                     sum(len(f.ids) - f.start for f in fills), lambda: forward(fills, tokens, positions))

    def timed_step(tokens: Sequence[int] | torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        return timed("step", len(tokens), lambda: step(tokens, positions))  # type: ignore[no-any-return]

    core.forward, core.step = timed_forward, timed_step  # type: ignore[method-assign]
    try:
        yield spans
    finally:
        del core.forward, core.step  # the class's methods again


def where_time_went(spans: list[tuple[str, int, float]], wall: float) -> dict[str, float]:
    """The scheduler's time in forwards that carry prompt tokens (``mixed``
    of them with decode rows too) and in decode steps, and what is left of
    the wall time."""
    pre = [s for s in spans if s[0] in ("prefill", "mixed")]
    steps = [s for s in spans if s[0] == "step"]
    pre_s = sum(s[2] for s in pre)
    step_s = sum(s[2] for s in steps)
    tokens = sum(s[1] for s in pre)
    return {
        "prefill_s": pre_s, "prefills": len(pre), "prefill_ms_per_1k_tokens": 1e6 * pre_s / tokens if tokens else 0.0,
        "prompt_tokens": tokens, "mixed": sum(s[0] == "mixed" for s in pre),
        "step_s": step_s, "steps": len(steps), "other_s": wall - pre_s - step_s,
    }


async def chunk_variants(
    engine: BatchedEngine, prompts: list[list[int]], settings: Settings, chunks: list[int],
    mixed: Sequence[bool] = (),
) -> dict[str, RunResult]:
    """The same burst (``prompts`` arriving together, cold) once per prefill
    chunk in ``chunks``, set on the live scheduler (0: off, a chunk longer
    than any prompt), and with ``mixed`` once per way of running a chunk
    (True: with the decode step in one forward; False: apart). Keyed by the
    chunk (and "mixed" / "apart"); the scheduler's own settings are put back."""
    scheduler = engine.scheduler
    assert scheduler is not None
    own = scheduler.prefill_chunk, scheduler.mixed
    out: dict[str, RunResult] = {}
    try:
        for chunk in chunks:
            for mode in mixed or (own[1],):
                scheduler.prefill_chunk = chunk or scheduler.core.max_len
                if scheduler.mixed != mode:
                    scheduler.mixed = mode
                    # the idle decode thread waits for a request inside the
                    # admission of the way it ran (ADMIT_WAIT_S at most): the
                    # first turn of this run must not be taken that way
                    await asyncio.sleep(ADMIT_WAIT_S + 0.1)
                with traced(scheduler.core) as spans:
                    r = await engine_run(engine, prompts, settings, time_graph=False)
                r.extra["where"] = where_time_went(spans, r.wall_s)
                key = f"{chunk} {'mixed' if mode else 'apart'}" if mixed else str(chunk)
                out[key] = r
                log(f"engine  n={len(prompts)}, prefill chunk {chunk or 'off'}"
                    f"{', mixed' if mode else ', apart'}: {r}")
    finally:
        scheduler.prefill_chunk, scheduler.mixed = own
    return out


def production_free(engine: BatchedEngine, max_batch: int, context_length: int) -> int:
    """The GPU's free memory as the engine's own start would see it when it
    keeps dense weights (``BatchedEngine.keep_dense``): the bench's cache is
    sized for its prompts, production's for ``max_batch`` rows of the model's
    whole context (``kv_cache_len``); dense copies kept now count as free."""
    from bot.engine.batched.engine import kv_cache_len, kv_token_bytes

    core = engine.core
    assert core is not None
    held = core.k_cache.nbytes + core.v_cache.nbytes
    return int(engine.free_memory() + held - kv_token_bytes(engine.model) * max_batch
               * kv_cache_len(engine.model, max_batch, context_length))


async def dense_variants(
    engine: BatchedEngine, long_prompt: list[int], burst: list[list[int]], settings: Settings, free: int,
) -> dict[str, Any]:
    """The 1,000-token prompt's TTFT (median of three) and the burst, with
    no dense weights kept and with what ``free`` bytes keep, alternating
    (none, kept, none, kept; the burst in the last two); the engine's dense
    copies as given by ``free`` afterwards."""
    out: dict[str, Any] = {}
    try:
        for i, (name, f) in enumerate((("none", 0), ("kept", free)) * 2):
            engine.keep_dense(free=f)
            row = out.setdefault(name, {"ttft_ms": []})
            row["ttft_ms"].append(1e3 * await ttft_median(engine, long_prompt, settings, time_graph=False))
            if i >= 2 and burst:
                r = await engine_run(engine, burst, settings, time_graph=False)
                row["burst"] = {**r.__dict__}
                log(f"engine  n={len(burst)}, dense weights {name}: {r}")
        log(f"dense weights none / kept: TTFT {len(long_prompt)} tokens (ms) "
            f"{out['none']['ttft_ms']} / {out['kept']['ttft_ms']}")
    finally:
        engine.keep_dense(free=free)
    return out


class _BenchSink(QuietSink):
    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.text = ""
        self.error = ""

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
    if engine.scheduler is not None:  # as cold as the engine's own run of these prompts
        engine.scheduler.prefix.clear()
    with collecting(engine) as stats:
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
    result = _summarize(n, stats, wall)
    result.extra["errors"] = errors
    return result


@dataclass
class Pairs:
    """One batch's engine and worker runs, pair by pair (``engine[i]`` and
    ``worker[i]`` ran next to each other), and the order each pair ran in."""

    engine: list[RunResult]
    worker: list[RunResult]
    order: list[str]  # "EW" or "WE", per pair

    def ratios(self) -> list[float]:
        """worker_i / engine_i in wall tok/s, pair by pair (0 where the engine made nothing)."""
        return [w.wall_tok_s / e.wall_tok_s if e.wall_tok_s > 0 else 0.0
                for e, w in zip(self.engine, self.worker, strict=True)]

    def summary(self) -> dict[str, Any]:
        """The median pair ratio, every pair's, their range, and which run of
        each kind is reported (:func:`median_index`)."""
        ratios = self.ratios()
        return {
            "ratio": statistics.median(ratios), "pairs": ratios, "min": min(ratios), "max": max(ratios),
            "order": self.order,
            "reported": {"engine": median_index(self.engine), "worker": median_index(self.worker)},
        }


def median_index(runs: list[RunResult]) -> int:
    """The run at the median wall tok/s (of an even count, the lower middle:
    a run that happened, never an average of two)."""
    by_speed = sorted(range(len(runs)), key=lambda i: runs[i].wall_tok_s)
    return by_speed[(len(runs) - 1) // 2]


async def paired_runs(
    engine: BatchedEngine, prompts: list[list[int]], texts: list[str], settings: Settings,
    gen: GenerationConfig, db_dir: Path, pairs: int,
) -> Pairs:
    """The same burst through the engine alone and through the bot's worker,
    ``pairs`` times each, alternating in ABBA order (E W, W E, E W, ...): a
    burst varies between two runs in a row by more than the worker costs, and
    whatever drifts over the runs (first-use stalls, clocks, the allocator)
    would always favour the kind that runs second in E W E W; in ABBA each
    kind runs first equally often, so a steady drift cancels in the median."""
    out = Pairs([], [], [])
    n = len(prompts)
    for i in range(pairs):
        order = "EW" if i % 2 == 0 else "WE"
        got: dict[str, RunResult] = {}
        for kind in order:
            if kind == "E":
                got[kind] = await engine_run(engine, prompts, settings)
            else:
                got[kind] = await _worker_or_error(engine, texts, gen, db_dir, f"n{n}p{i}")
            log(f"{'engine' if kind == 'E' else 'worker'}  n={n} pair {i + 1}/{pairs}: {got[kind]}")
        out.engine.append(got["E"])
        out.worker.append(got["W"])
        out.order.append(order)
    return out


async def _worker_or_error(
    engine: BatchedEngine, texts: list[str], gen: GenerationConfig, db_dir: Path, tag: str
) -> RunResult:
    """:func:`worker_run`, or an empty result that carries its error (the other rows are kept)."""
    try:
        return await worker_run(engine, texts, gen, db_dir, tag)
    except Exception as exc:
        log(f"worker {tag} failed: {exc!r}")
        return RunResult(len(texts), 0, 0.0, 0.0, 0.0, 0.0, {"error": repr(exc)})


class _TimingStreamer:
    def __init__(self) -> None:
        self.skipped = False
        self.first = 0.0
        self.last = 0.0
        self.max_gap = 0.0
        self.count = 0

    def put(self, value: Any) -> None:
        if not self.skipped:
            self.skipped = True
            return
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
        else:
            self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
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
        stats.append(StreamStats(len(p), streamer.count, streamer.first - t0, end - t0, streamer.max_gap))
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


def check_logits(engine: BatchedEngine, model: Any, vocab: int, length: int,
                 rows: int = 2) -> tuple[float, float]:
    """Relative error of the batched path's logits against transformers'
    forward: after a prefill, and after one graph-replayed decode step of
    ``rows`` rows (1 or 2)."""
    core = engine.core
    assert core is not None
    rng = torch.Generator().manual_seed(1)
    prompts = [random_prompt(rng, length, vocab), random_prompt(rng, length // 2, vocab)][:rows]
    nxt = [300, 301][:rows]
    with torch.inference_mode():
        first = core.prefill(0, prompts[0])
        for row in range(1, rows):
            core.prefill(row, prompts[row])
        step = core.step(nxt, [len(p) for p in prompts]).float()
        refs = [model(torch.tensor([[*p, t]], device=model.device)).logits[0].float()
                for p, t in zip(prompts, nxt, strict=True)]

    prefill_err = relative_error(first.float(), refs[0][-2])
    step_err = max(relative_error(step[r], refs[r][-1]) for r in range(rows))
    return prefill_err, step_err


async def followup_run(
    engine: BatchedEngine, res: dict[str, Any], rng: torch.Generator, total: int, vocab: int,
    settings: Settings,
) -> None:
    """A thread of ``total`` tokens: a prompt of ``total - 40`` tokens gets a
    20-token reply; then the follow-up (prompt + reply + 20 new tokens) is
    sent. Its TTFT, with the parked row's keys and values reused, against the
    first prompt's (everything prefilled). Twice, with other tokens: the
    second thread's figures are reported, the first's kept as ``*_first_s``
    (they include whatever a first call at these shapes costs)."""
    assert engine.scheduler is not None
    for attempt in ("_first", ""):
        history = random_prompt(rng, total - 40, vocab)
        engine.scheduler.prefix.clear()
        with collecting(engine) as stats:
            reply = [t async for chunk in engine.stream_ids(history, replace(settings, max_new_tokens=20))
                     for t in chunk]
        cold = stats[-1].first_token_s
        before = engine.scheduler.prefix.reused_tokens
        follow = [*history, *reply, *random_prompt(rng, 21, vocab)[1:]]
        r = await engine_run(engine, [follow], replace(settings, max_new_tokens=1), cold=False,
                             time_graph=False)
        res[f"ttft_followup{attempt}_s"] = r.ttft_s
        res[f"ttft_thread_cold{attempt}_s"] = cold
    res["followup_reused_tokens"] = engine.scheduler.prefix.reused_tokens - before
    log(f"follow-up of {len(follow)} tokens: TTFT {r.ttft_s * 1e3:.0f} ms with "
        f"{res['followup_reused_tokens']} reused; its thread's first prompt ({len(history)} tokens) "
        f"{cold * 1e3:.0f} ms")


def check_long_prefill(engine: BatchedEngine, model: Any, vocab: int, length: int) -> float:
    """Relative error against transformers' forward of a long prompt's
    prefill logits (through dequantize + cuBLAS where the engine has fused products)
    and of 20 more tokens prefilled onto the same row (prefix reuse)."""

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

