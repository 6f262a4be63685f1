"""Decode attention: one new token per row against the row's cached keys.

A decode step's attention, as the batched engine first computed it, is three
kernels a layer: q.kᵀ over the whole context bucket (a batched matmul), the
masked softmax, p.v (another). At one row on the H200 they took 11.3 µs a
layer, 0.9 ms of a 12 ms step at 80 layers (docs/gpu-notes.md, item 31),
for a few hundred keys: the launches and the matmuls' small grids, not the
bytes. :func:`decode` does it in two CUDA kernels (``attention.cu``, built at
load like the row kernels: bot/engine/cuda_ext.py), split over the keys so
that a single row's step spreads over the GPU (flash decoding): each block
scores a split of one row's keys for one kv head, its warps sharing out the
query heads that read it, keeps a running max and sum, and a second kernel
merges the splits. Keys past a row's own position are not read at all.

On for steps of one row (``core.ATTENTION_KERNEL_MAX_ROWS``): on the H200,
8 layers at ~1,100 positions, the step took 1.263 ms with them against 1.283
with torch's matmuls at one row, but 2.895 against 2.863 at 32 rows
(bench/gpu_fidelity.py, 2026-12-03; docs/gpu-notes.md, item 34). An earlier
form (a warp a split) had measured slower than the matmuls even at one row.

:func:`reference` is the same attention in torch (the CPU path, and the
oracle the GPU kernels are compared with in bench/gpu_fidelity.py; the
engine's load check compares the whole step against transformers' forward).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bot.engine import cuda_ext

log = logging.getLogger(__name__)

HEAD_DIM = 128  # the kernels' head dim
GROUPS = (1, 2, 4, 8)  # query heads per kv head the kernels take
_SOURCE = Path(__file__).with_name("attention.cu")
_SOURCES = (_SOURCE, _SOURCE.with_name("attention_kernels.cuh"), _SOURCE.with_name("dependent_launch.cuh"))


def _kernels() -> Any:
    """The compiled kernels (bot/engine/cuda_ext.py: built once per source and torch version)."""
    return cuda_ext.load("attention", _SOURCE, _SOURCES, "decode attention kernels")


def supports(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """The kernels take this model's attention on this device, and are built."""
    if device.type != "cuda" or dtype != torch.float16 or head_dim != HEAD_DIM or group not in GROUPS:
        return False
    try:
        _kernels()
    except Exception:
        log.exception("the decode attention kernels could not be built; decode uses torch's matmuls")
        return False
    return True


def decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, ctx: int, scale: float,
    per: int = 0,
) -> torch.Tensor:
    """``q [rows, heads, head_dim]`` (the step's queries, rope applied)
    against one layer's caches ``[>= rows, kv_heads, max_len, head_dim]``:
    row ``r`` reads its keys and values ``0..pos[r]`` (at most the first
    ``ctx``). Returns ``[rows, heads * head_dim]``. On the GPU the kernels,
    ``per`` keys a block (0: their own plan); elsewhere :func:`reference`.
    Launched as dependent launches (bot/engine/cuda_ext.py), the kernels
    read ``pos`` and the keys before ``pos`` before they wait for the
    kernel launched just before them: that kernel must not write them (the
    engine's positions are copied in before a step, its older keys written
    by earlier steps)."""
    if q.is_cuda and q.dtype == torch.float16 and q.shape[-1] == HEAD_DIM:
        out: torch.Tensor = _kernels().decode_attention(q.contiguous(), k_cache, v_cache, pos, ctx, scale, per)
        return out
    return reference(q, k_cache, v_cache, pos, ctx, scale)


def reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, ctx: int, scale: float
) -> torch.Tensor:
    """:func:`decode` in torch: softmax(q.kᵀ · scale) over keys ``0..pos[r]``
    (float), times v."""
    rows, heads, hd = q.shape
    n_kv = k_cache.shape[1]
    keys = k_cache[:rows, :, :ctx]
    s = torch.matmul(q.view(rows, n_kv, heads // n_kv, hd), keys.transpose(-1, -2)).float() * scale
    visible = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v_cache[:rows, :, :ctx]).reshape(rows, heads * hd)
