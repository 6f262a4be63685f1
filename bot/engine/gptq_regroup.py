"""Channelwise GPTQ (group size -1) served by a grouped kernel.

The reference checkpoint (``TheBloke/Xwin-LM-70B-V0.1-GPTQ``, branch ``main``)
is 4-bit GPTQ with group size -1 and act order: one scale and one zero point
per output column. GPTQModel's Marlin kernel gives NaN logits on such
checkpoints (docs/gpu-notes.md), while it is fast and correct on groups of 128.

With one group per column, act order changes nothing (``g_idx`` is all zero:
every input row belongs to group 0), and repeating each column's scale and
zero point into ``in_features / group`` groups gives exactly the same
dequantized weights, for about 3 % more bytes. :func:`regroup_model` does
that, module by module, after loading: it reads a loaded channelwise module's
packed weights (GPTQ layout, zero points already in GPTQModel's internal v2
form), builds a grouped module of the target kernel class from them and runs
its ``post_init`` (for Marlin: the repack into Marlin's layout).

The source modules must keep GPTQ's plain layout after ``post_init``
(GPTQModel's ``TorchLinear`` does: the loader loads with ``backend="torch"``
and converts).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger(__name__)

REGROUP_SIZE = 128


def is_channelwise(quant: dict[str, Any]) -> bool:
    """A GPTQ quantization config with one group per column (group size -1)."""
    group = quant.get("group_size", -1)
    return group is None or int(group) <= 0


def module_is_channelwise(module: Any) -> bool:
    group = int(getattr(module, "requested_group_size", getattr(module, "group_size", -1)))
    return group in (-1, module.in_features)


def regroup_module(module: Any, group: int, target: type) -> Any:
    """A ``target`` module with groups of ``group`` inputs holding the same
    weights as the channelwise ``module`` (whose tensors it takes over)."""
    fin, fout = module.in_features, module.out_features
    if fin % group:
        raise ValueError(f"in_features {fin} is not a multiple of {group}")
    if bool((module.g_idx != 0).any()):
        raise ValueError("g_idx is not all zero: not a channelwise module")
    n_groups = fin // group
    dev = module.qweight.device
    with torch.device(dev):
        new = target(
            bits=module.bits,
            group_size=group,
            desc_act=False,
            sym=module.sym,
            in_features=fin,
            out_features=fout,
            bias=module.bias is not None,
            dtype=module.scales.dtype,
        )
    tensors = {
        "qweight": module.qweight.data,
        "scales": module.scales.data.expand(n_groups, fout).contiguous(),
        "qzeros": module.qzeros.data.expand(n_groups, module.qzeros.shape[1]).contiguous(),
        "g_idx": (torch.arange(fin, device=dev, dtype=torch.int32) // group),
    }
    for name, value in tensors.items():
        getattr(new, name).data = value
    if module.bias is not None:
        new.bias.data = module.bias.data
    new.name = getattr(module, "name", new.name)
    new.post_init()
    new.eval()
    return new


def regroup_model(model: Any, group: int, target: type) -> list[tuple[Any, Any]]:
    """Replace every channelwise GPTQ module of ``model`` by a ``target``
    module with groups of ``group``; the (new, old) pairs (the old modules
    live on only while the caller keeps them). The loader's fallback where
    the fused row-layout products cannot be built (bot/engine/products.py)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BaseQuantLinear) and module_is_channelwise(module)
    ]
    pairs = []
    for name, module in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = regroup_module(module, group, target)
        setattr(parent, attr, new)
        pairs.append((new, module))
    log.info("regrouped %d channelwise GPTQ modules into groups of %d (%s)",
             len(swaps), group, target.__name__)
    return pairs


def fused_source(modules: Sequence[Any]) -> Any:
    """Channelwise modules sharing their input, as one module-like source for
    :func:`regroup_module`: their outputs side by side (GPTQ packs along the
    input, so the columns of ``qweight``, ``scales`` and ``qzeros`` just join)."""
    first = modules[0]
    if any(m.out_features % 8 or m.in_features != first.in_features for m in modules):
        raise ValueError("fused modules need the same input and outputs in multiples of 8")
    return SimpleNamespace(
        in_features=first.in_features,
        out_features=sum(m.out_features for m in modules),
        bits=first.bits,
        sym=first.sym,
        bias=None,
        name="+".join(str(getattr(m, "name", "?")) for m in modules),
        qweight=torch.nn.Parameter(torch.cat([m.qweight.data for m in modules], 1), requires_grad=False),
        scales=torch.nn.Parameter(torch.cat([m.scales.data for m in modules], 1), requires_grad=False),
        qzeros=torch.nn.Parameter(torch.cat([m.qzeros.data for m in modules], 1), requires_grad=False),
        g_idx=first.g_idx,
    )


def fused_marlin(modules: Sequence[Any]) -> Any:
    """One Marlin module (groups of :data:`REGROUP_SIZE`) for channelwise
    modules that share their input."""
    return regroup_module(fused_source(modules), REGROUP_SIZE, marlin_class())


def marlin_copy_bytes(modules: Sequence[Any]) -> int:
    """About what :func:`fused_marlin` modules for these channelwise modules
    take: the same 4-bit codes, and a scale for every group of
    :data:`REGROUP_SIZE` inputs (3 % more for 4,096 inputs and up)."""
    total = 0
    for m in modules:
        codes = m.qweight.numel() * m.qweight.element_size()
        scales = -(-m.in_features // REGROUP_SIZE) * m.out_features * m.scales.element_size()
        total += codes + scales
    return total


def marlin_class() -> type:
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    cls: type = MarlinLinear
    return cls
