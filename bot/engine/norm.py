"""The decode step's residual add and RMSNorm: one CUDA kernel (``norm.cu``).

Twice a layer a decode step adds a product's output to the residual stream
and normalizes the sum for the next product (``x + y`` and ``w * rmsnorm(x +
y)``). torch.compile makes that one Triton kernel (``core._glue_add_norm``),
4.1 µs at one row on the H200, 161 of them a step at 80 layers.
:func:`add_rms_norm` is the same arithmetic in a kernel of its own (one
block a row; built at load like the row kernels: bot/engine/cuda_ext.py):
the sum rounded to half as torch rounds it, the squares summed in float, the
normalized value rounded to half before the weight multiplies it, as
:func:`reference` does. 2.5 µs at one row; the 80-layer step 11.50 against
11.69 ms at one row, 26.94 against 27.22 at 32 (docs/gpu-notes.md, item 36).

:func:`reference` is that arithmetic in torch: the CPU path, what the
decode step's glue compiles, and the oracle the kernel is compared with
(bench/gpu_fidelity.py; the engine's load check compares the whole step
against transformers' forward).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bot.engine import cuda_ext

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("norm.cu")
_SOURCES = (_SOURCE, _SOURCE.with_name("dependent_launch.cuh"))


def _kernels() -> Any:
    """The compiled kernels (bot/engine/cuda_ext.py: built once per source and torch version)."""
    return cuda_ext.load("norm", _SOURCE, _SOURCES, "residual add + RMSNorm kernel")


def supports(device: torch.device, dtype: torch.dtype, hidden: int) -> bool:
    """The kernel takes this model's rows on this device, and is built."""
    if device.type != "cuda" or dtype != torch.float16 or hidden % 8:
        return False
    try:
        _kernels()
    except Exception:
        log.exception("the residual add + RMSNorm kernel could not be built; decode uses the compiled glue")
        return False
    return True


def reference(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + y, w * rmsnorm(x + y))``: the sum in ``x``'s dtype, its squares'
    mean in float."""
    x = x + y
    xf = x.float()
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return x, w * h.to(x.dtype)


def _fits(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.is_cuda and x.dtype == y.dtype == w.dtype == torch.float16 and x.dim() == 2 and x.shape == y.shape
        and x.shape[-1] % 8 == 0 and w.shape == (x.shape[-1],)
        and x.is_contiguous() and y.is_contiguous() and w.is_contiguous()
        and all(t.data_ptr() % 16 == 0 for t in (x, y, w))
    )


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference` for ``x, y [rows, hidden]``: in the kernel where it
    takes them (half, contiguous, aligned, on a GPU), else in torch."""
    if _fits(x, y, w):
        s, h = _kernels().add_rms_norm(x, y, w, eps)
        return s, h
    return reference(x, y, w, eps)
