"""Channelwise 4-bit GPTQ weights in a row layout, for decode steps of a few rows.

The reference checkpoint is 4-bit GPTQ with one scale and one zero point per
output column (group size -1). A decode step of one conversation reads every
weight once and multiplies it by one vector: the speed limit is the memory
bandwidth, and Marlin (a tensor-core kernel built for batches) reaches about
half of it at one row (docs/gpu-notes.md). This module keeps a second packing
of the same weights made for that case, and a CUDA kernel
(``rowquant.cu``, built at load with torch's extension builder) that reads it:

- **layout**: ``w`` is ``[out, in / 8]`` int32, one output row's inputs
  contiguous (GPTQ's own ``qweight`` is ``[in / 8, out]``), so one warp reads
  512 contiguous bytes of one row at a time. Inside a word, slot ``p`` (bits
  ``4p..4p+3``) holds input ``8c + ORDER[p]``: one mask then pulls two inputs
  that sit side by side in ``x`` into one half2 (the kernel's comment).
- **fused**: products that share their input (q, k, v; gate, up) are packed
  as one matrix, one launch, and split after.
- **numbers**: ``(q - z) / 128`` (exact in half) times ``x``, summed in half
  over 8 products (at most 0.94 times the largest ``|x|``: no overflow) and in
  float beyond, each output times ``128 s`` once; before, ``(q - z) * s`` in
  half, as GPTQModel's and Marlin's kernels compute the weight, times ``x``
  (docs/gpu-notes.md, item 30). :func:`reference` is GPTQModel's weight in
  torch (the CPU path and the tests' oracle); the load check
  (bot/engine/fidelity.py) compares the whole model against transformers'
  forward on the GPU.

:func:`dequantize` turns the packing back into a half ``[out, in]`` matrix for
prompts, where cuBLAS does the product (compute-bound: the bytes do not matter);
spare GPU memory may keep that matrix for some products (``RowQuant.dense``),
which spares prompts the unpacking (~19 % of their products' time at 1,000
tokens on the H200).
:func:`mma` multiplies up to 32 rows on tensor cores, reading the same
packing: decode steps of several conversations without a second copy of the
weights (``[model] batch_kernel``; the ``(q - z)`` codes exact in half, the sums
in float, each output scaled once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bot.engine import cuda_ext

log = logging.getLogger(__name__)

# Input k0 + ORDER[p] sits in slot p of its word.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
MAX_ROWS = 4  # the kernel's largest batch (one accumulator per row and output)
MMA_MAX_ROWS = 32  # the tensor-core kernel's largest batch
MMA_PIECE = 256  # the tensor-core kernel takes in_features in multiples of this
# The tensor-core kernel's splits of in_features (a count, raised where shared
# memory needs more; or 0: per product, the count whose busiest block has the
# least to read, rowquant_kernels.cuh's mma_plan) and 16-row tiles per warp (1:
# 16 warps a block, 2: 8). H200, 80 layers' products, ms at 2 / 8 / 16 / 32
# rows: 0 splits (3 for q/k/v, 4 for o and gate/up, 4-16 for down) 13.2 / 13.2 /
# 15.1 / 20.1 against 4 splits' 13.6 / 13.5 / 17.5 / 21.8 (bench/rowquant_probe.cu,
# one run); 4 splits with 2 tiles 13.5 / 13.7 / 18.4 / 23.2 and fused Marlin
# 12.8 / 12.9 / 14.7 / 18.3 (bench/gpu_rowquant.py).
MMA_SPLITS = 0
MMA_TILES = 1
ROWS_PER_WARP = 4  # output rows a warp computes (bench/gpu_rowquant.py measures 2, 4, 8)
# Words whose products one half sum takes at one row, 2 or 4: 8 layers on the H200,
# products 0.928 against 0.950 ms a step, load check and a one-row step against
# the forward unchanged (3.7e-4, 3.6e-4 against 3.5e-4; bench/gpu_fidelity.py,
# 2026-12-03; docs/gpu-notes.md item 32). More rows keep 2 (the probe: slower).
ONE_ROW_WORDS = 4
DEQUANT_ITEMS = 4  # words a thread of the dequantize unpacks (bench/gpu_prefill.py measures 1, 4, 8)
_SOURCE = Path(__file__).with_name("rowquant.cu")
_SOURCES = (_SOURCE, _SOURCE.with_name("rowquant_kernels.cuh"),  # the glue and the device code it includes
            _SOURCE.with_name("dependent_launch.cuh"))


@dataclass
class RowQuant:
    """One product (or several fused ones sharing an input) in the row layout."""

    w: torch.Tensor  # int32 [out, in / 8]
    scale: torch.Tensor  # [out], the model's dtype (half for the CUDA kernels)
    zero: torch.Tensor  # [out], 1024 + the zero point (see the kernel), the scales' dtype
    splits: tuple[int, ...]  # the fused products' output sizes, in order
    # The weights dequantized once and kept (products.set_dense), or None:
    # :func:`dequantize` then returns it instead of unpacking the codes again.
    dense: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.w.shape[1]) * 8

    @property
    def out_features(self) -> int:
        return int(self.w.shape[0])

    def nbytes(self) -> int:
        """The packing's bytes (a kept dense copy not counted: :meth:`dense_nbytes`)."""
        return sum(t.numel() * t.element_size() for t in (self.w, self.scale, self.zero))

    def dense_nbytes(self) -> int:
        """The bytes of the weights as a ``[out, in]`` matrix in the scales' dtype."""
        return self.out_features * self.in_features * self.scale.element_size()


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words ``[...]`` as their eight 4-bit fields ``[..., 8]``, bits 0-3 first."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    return (words[..., None] >> shifts) & 15


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's ``[in / 8, out]`` int32 words as the ``[in, out]`` 4-bit codes (uint8)."""
    codes = _nibbles(qweight).transpose(1, 2)  # [in/8, 8, out]
    return codes.reshape(-1, qweight.shape[1]).to(torch.uint8)


def _zero_points(module: Any) -> torch.Tensor:
    """One zero point per output column (GPTQModel's v2 form, as its kernels read it)."""
    qzeros: torch.Tensor = module.qzeros.data
    if qzeros.shape[0] != 1:
        raise ValueError("not a channelwise module: more than one row of zero points")
    return _nibbles(qzeros[0]).reshape(-1)[: module.out_features]


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """``[rows, in]`` codes (in the natural input order) as ``[rows, in / 8]``
    int32 words in :data:`ORDER`."""
    rows, fin = codes.shape
    order = torch.tensor(ORDER, device=codes.device)
    slots = codes.reshape(rows, fin // 8, 8)[:, :, order].to(torch.int64)
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (slots << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack(modules: Sequence[Any], chunk_rows: int = 4096) -> RowQuant:
    """The channelwise 4-bit GPTQ ``modules`` (GPTQModel's plain layout, zero
    points in its v2 form; all with the same input) as one fused row-layout product."""
    if not modules:
        raise ValueError("nothing to pack")
    fin = modules[0].in_features
    ws, scales, zeros = [], [], []
    for module in modules:
        if module.in_features != fin:
            raise ValueError("fused products must share their input size")
        if int(module.bits) != 4 or fin % 32:
            raise ValueError("the row layout holds 4-bit weights with in_features a multiple of 32")
        if getattr(module, "g_idx", None) is not None and bool((module.g_idx != 0).any()):
            raise ValueError("not a channelwise module: g_idx is not all zero")
        if module.scales.shape[0] != 1:
            raise ValueError("not a channelwise module: more than one row of scales")
        qweight = module.qweight.data
        for start in range(0, module.out_features, chunk_rows):  # bounded scratch memory
            cols = qweight[:, start : start + chunk_rows]
            ws.append(_pack_rows(unpack_codes(cols).t()))
        scales.append(module.scales.data[0])
        zeros.append(_zero_points(module).to(module.scales.dtype) + 1024)
    return RowQuant(
        w=torch.cat(ws).contiguous(),
        scale=torch.cat(scales).contiguous(),
        zero=torch.cat(zeros).contiguous(),
        splits=tuple(int(m.out_features) for m in modules),
    )


def _codes(rq: RowQuant) -> torch.Tensor:
    """The ``[out, in]`` codes back in the natural input order."""
    slots = _nibbles(rq.w)  # [out, in/8, 8] in ORDER
    inverse = torch.argsort(torch.tensor(ORDER, device=rq.w.device))
    codes: torch.Tensor = slots[:, :, inverse].reshape(rq.w.shape[0], -1)
    return codes


def reference(rq: RowQuant, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[out, in]`` weights in ``dtype`` (default: the scales'), computed
    as GPTQModel's torch kernel does: ``(q - z) * s`` (q - z exact, one rounding)."""
    dtype = dtype or rq.scale.dtype
    codes = _codes(rq).to(dtype)
    zero = (rq.zero.float() - 1024).to(dtype)
    return (codes - zero[:, None]) * rq.scale.to(dtype)[:, None]


def _kernels() -> Any:
    """The compiled kernels (bot/engine/cuda_ext.py: built once per source and torch version)."""
    return cuda_ext.load("rowquant", _SOURCE, _SOURCES, "row-layout 4-bit kernels")


def available(device: torch.device) -> bool:
    """The CUDA kernels built and loaded for ``device`` (False on a CPU)."""
    if device.type != "cuda":
        return False
    try:
        _kernels()
    except Exception:
        log.exception("the row-layout 4-bit kernels could not be built; decode uses the loaded kernel")
        return False
    return True


def _on_kernels(rq: RowQuant) -> bool:
    return rq.w.device.type == "cuda" and rq.scale.dtype == torch.float16


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous and 16-byte aligned: the kernels read it 16 bytes at a time."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x


def gemv(rq: RowQuant, x: torch.Tensor) -> torch.Tensor:
    """``x [m, in] @ W.T`` for ``m <= MAX_ROWS`` (the CUDA kernel on a GPU).
    Launched as a dependent launch (bot/engine/cuda_ext.py), the kernel
    reads its weights before it waits for the kernel launched just before
    it: weights are written once, at load."""
    if _on_kernels(rq) and x.dtype == torch.float16:
        out: torch.Tensor = _kernels().gemv(_aligned(x), rq.w, rq.scale, rq.zero, ROWS_PER_WARP, ONE_ROW_WORDS)
        return out
    return F.linear(x, reference(rq, rq.scale.dtype).to(x.dtype))


def mma_fits(rq: RowQuant, rows: int) -> bool:
    """:func:`mma` takes ``rows`` rows of input for this product (on a GPU the
    kernel needs in_features in multiples of :data:`MMA_PIECE`)."""
    return 1 <= rows <= MMA_MAX_ROWS and (not _on_kernels(rq) or rq.in_features % MMA_PIECE == 0)


def mma(rq: RowQuant, x: torch.Tensor, splits: int | None = None, tiles: int | None = None) -> torch.Tensor:
    """``x [m, in] @ W.T`` for ``m <= MMA_MAX_ROWS`` on tensor cores (the CUDA
    kernel on a GPU; see :func:`mma_fits`): the weights as ``q - z``, exact,
    each output's float sum times its scale."""
    if _on_kernels(rq) and x.dtype == torch.float16:
        out: torch.Tensor = _kernels().mma(_aligned(x), rq.w, rq.scale, rq.zero,
                                           MMA_SPLITS if splits is None else splits,
                                           MMA_TILES if tiles is None else tiles)
        return out
    codes = (_codes(rq).float() - (rq.zero.float() - 1024)[:, None])
    return (F.linear(x.float(), codes) * rq.scale.float()).to(x.dtype)


def dequantize(rq: RowQuant) -> torch.Tensor:
    """The weights as a half ``[out, in]`` matrix (for prompts: cuBLAS
    multiplies): the kept copy where there is one (the same numbers: it was
    made here), else unpacked now."""
    if rq.dense is not None:
        return rq.dense
    if _on_kernels(rq):
        out: torch.Tensor = _kernels().dequant(rq.w, rq.scale, rq.zero, DEQUANT_ITEMS)
        return out
    return reference(rq)


def linear(rq: RowQuant, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in]`` times the weights, the outputs of the fused products
    side by side: the kernel for a few rows, dequantize + matmul beyond."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= MAX_ROWS:
        out = gemv(rq, rows)
    else:
        out = F.linear(rows, dequantize(rq).to(x.dtype))
    return out.reshape(*x.shape[:-1], rq.out_features)
