"""A decoder layer's quantized products, fused, each with the kernel for its case.

For the reference checkpoint (channelwise 4-bit GPTQ, bot/engine/rowquant.py)
the loader builds, per layer, four products instead of the model's seven
modules: q/k/v and gate/up share their input and are fused into one matrix
each (one launch instead of three or two: Marlin at one row takes 58 µs for
q, k and v apart and 19 µs fused, bench/gpu_rowquant.py). Each product holds
two packings of the same weights and picks by the shape of its input:

- ``row`` (:class:`~bot.engine.rowquant.RowQuant`): decode steps of
  :data:`ROW_MAX_ROWS` row (the row kernel: 10.3 ms for 80 layers' products
  against Marlin's 12.7 fused, 16.3 apart) and prompts of
  :data:`PROMPT_MIN_TOKENS` tokens or more (dequantize + cuBLAS: 1.7x
  Marlin's speed at 1,000 tokens);
- the batch path, for decode steps of more rows and shorter prompts: a Marlin
  module over the fused weights (``batch``, regrouped from the same codes: a
  second copy of the weights), or without it (``[model] batch_kernel``) the
  row packing's tensor-core kernel (``rowquant.mma``, up to 32 rows; H200,
  80 layers' products at 2 / 8 / 16 / 32 rows: 13.1 / 13.2 / 17.4 / 21.7 ms
  against fused Marlin's 12.8 / 12.9 / 14.7 / 18.3).

Spare GPU memory may keep some products' weights dequantized
(:func:`set_dense`): prompts then skip unpacking them (the same half matrix,
so the same numbers).

The model's own modules become views of the row packing
(:class:`RowQuantLinear`: the same memory), so transformers' forward, the
one-at-a-time engine and the load check's reference run on it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bot.engine import rowquant
from bot.engine.rowquant import RowQuant

log = logging.getLogger(__name__)

# Decode steps of this many rows or fewer use the row kernel. H200, 80
# layers' products, ms at 1 / 2 / 4 rows: row kernel 10.3 / 14.2 / 21.6,
# Marlin fused 12.7 / 12.7 / 12.8 (bench/gpu_rowquant.py, docs/benchmarks.md).
ROW_MAX_ROWS = 1
# Prompts this long or longer are multiplied through dequantize + cuBLAS,
# shorter ones through ``batch``. H200, 8 layers, ms dequantize + cuBLAS /
# fused Marlin: 128 tokens 10.6 / 6.9, 256: 12.0 / 12.0, 512: 17.1 / 22.5,
# 1,000: 28.4 / 44.4 (bench/gpu_fidelity.py).
PROMPT_MIN_TOKENS = 256
# (product, the modules it fuses) for a Llama-style layer
LAYOUT = (
    ("qkv", "self_attn", ("q_proj", "k_proj", "v_proj")),
    ("o", "self_attn", ("o_proj",)),
    ("gate_up", "mlp", ("gate_proj", "up_proj")),
    ("down", "mlp", ("down_proj",)),
)


class RowQuantLinear(torch.nn.Module):
    """A model's own linear module over a slice of a row packing (shared memory)."""

    def __init__(self, rq: RowQuant) -> None:
        super().__init__()
        self.rq = rq
        self.in_features = rq.in_features
        self.out_features = rq.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowquant.linear(self.rq, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, channelwise"


@dataclass
class Product:
    """One fused product: ``x -> (out_1, ..., out_k)`` for its fused modules."""

    row: RowQuant
    batch: Callable[[torch.Tensor], torch.Tensor] | None  # None: the row packing for everything

    def __call__(self, x: torch.Tensor, use_row: bool) -> tuple[torch.Tensor, ...]:
        """The outputs through the row packing's kernel for its case (``use_row``:
        the row kernel or dequantize + cuBLAS) or the batch path: the batch
        module, or without one the row packing's tensor-core kernel up to
        :data:`~bot.engine.rowquant.MMA_MAX_ROWS` rows (dequantize + cuBLAS
        beyond). The caller picks by shape (:data:`ROW_MAX_ROWS`,
        :data:`PROMPT_MIN_TOKENS`)."""
        rows = x.numel() // x.shape[-1]
        if use_row:
            out = rowquant.linear(self.row, x)
        elif self.batch is not None:
            out = self.batch(x)
        elif rowquant.mma_fits(self.row, rows):
            out = rowquant.mma(self.row, x.reshape(rows, x.shape[-1])).reshape(*x.shape[:-1], -1)
        else:
            out = rowquant.linear(self.row, x)
        return torch.split(out, list(self.row.splits), dim=-1)


@dataclass
class LayerProducts:
    qkv: Product
    o: Product
    gate_up: Product
    down: Product

    def each(self) -> tuple[Product, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)


def set_dense(layer_products: Sequence[LayerProducts], budget: int) -> tuple[int, int]:
    """Keep the products' weights dequantized (``RowQuant.dense``), layer by
    layer from the first, each that still fits in ``budget`` bytes; drop the
    copies of the rest. Prompts multiplied through the row packing then use
    the kept matrix instead of unpacking the codes each time (one H200, 1,000
    tokens: the unpacking is ~19 % of the products' time, docs/gpu-notes.md
    item 42). Returns the products kept and their bytes."""
    kept = nbytes = 0
    for layer in layer_products:
        for product in layer.each():
            rq = product.row
            size = rq.dense_nbytes()
            if nbytes + size > budget:
                rq.dense = None
                continue
            if rq.dense is None:
                rq.dense = rowquant.dequantize(rq)
            kept, nbytes = kept + 1, nbytes + size
    return kept, nbytes


def dense_kept(layer_products: Sequence[LayerProducts]) -> int:
    """Bytes of the dense copies kept now (:func:`set_dense`)."""
    return sum(p.row.dense_nbytes() for layer in layer_products for p in layer.each() if p.row.dense is not None)


def can_fuse(model: Any) -> bool:
    """Every layer has the seven channelwise 4-bit modules, without bias, in half
    precision (the CUDA kernels' type)."""
    if getattr(model, "dtype", None) != torch.float16:
        return False
    try:
        for module in modules(model):
            if getattr(module, "bias", None) is not None or getattr(module, "bits", 0) != 4:
                return False
            if module.qzeros.shape[0] != 1 or module.in_features % 32 or module.out_features % 8:
                return False
    except AttributeError:
        return False
    return True


def modules(model: Any) -> list[Any]:
    """Every module the products fuse, layer by layer (see :data:`LAYOUT`)."""
    return [getattr(getattr(layer, parent), attr)
            for layer in model.model.layers for _, parent, attrs in LAYOUT for attr in attrs]


def build(model: Any, batch_module: Callable[[Sequence[Any]], Any] | None) -> list[LayerProducts]:
    """Fuse every layer's channelwise modules (see :func:`can_fuse`) into
    :class:`LayerProducts`, and replace the model's modules by views of the
    row packing; the original modules are released layer by layer.
    ``batch_module`` builds the ``batch`` module of a product from the
    modules it fuses (Marlin, regrouped: ``gptq_regroup.fused_marlin``)."""
    out = []
    for layer in model.model.layers:
        made: dict[str, Product] = {}
        for name, parent_name, attrs in LAYOUT:
            parent = getattr(layer, parent_name)
            modules = [getattr(parent, a) for a in attrs]
            row = rowquant.pack(modules)
            batch = batch_module(modules) if batch_module is not None else None
            start = 0
            for attr, module in zip(attrs, modules, strict=True):
                view = RowQuant(
                    w=row.w[start : start + module.out_features],
                    scale=row.scale[start : start + module.out_features],
                    zero=row.zero[start : start + module.out_features],
                    splits=(module.out_features,),
                )
                setattr(parent, attr, RowQuantLinear(view))
                start += module.out_features
            made[name] = Product(row, batch)
            del modules
        out.append(LayerProducts(**made))
    log.info("fused %d layers' products (row packing%s)", len(out),
             " + a batch module" if batch_module is not None else " alone: its tensor-core kernel for batches")
    return out
