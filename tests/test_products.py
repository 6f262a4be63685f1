"""Fused products in the row layout (bot/engine/products.py, rowquant.py) on the CPU.

The reference quantization (group size -1, act order, v1 zero points) at a
tiny size, loaded with GPTQModel's torch kernel: the row packing must hold
the same weights, the model's modules replaced by views of it must give the
same logits, and the batched engine decoding through the fused products
(the row path for one row and for long prompts, a regrouped batch module
for several rows) must pick the same greedy tokens as ``generate()`` on the
original modules. The CUDA kernels themselves run only on a GPU: the load
check compares them against transformers' forward there (bench/gpu_rowquant.py
and bench/gpu_fidelity.py measure them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import ModelConfig
from bot.engine import products, rowquant
from bot.engine.batched import BatchedEngine
from bot.engine.gptq_regroup import fused_source, regroup_module
from bot.engine.transformers import _fused_kernels
from bot.errors import ConfigError
from bot.types import Settings
from tests.test_gptq_regroup import _eager, channelwise_checkpoint, load, quant_modules  # noqa: F401

GREEDY = Settings(0.0, 1.0, 0, 1.0, 6, "")


def torch_batch_module(modules: Sequence[Any]) -> Any:
    """A batch module as the loader builds Marlin's, in the CPU's kernel class."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return regroup_module(fused_source(modules), 32, TorchLinear)


def test_row_packing_holds_each_modules_weights(channelwise_checkpoint: Path) -> None:  # noqa: F811
    model = load(channelwise_checkpoint).model
    attn = model.model.layers[1].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    rq = rowquant.pack(mods, chunk_rows=48)  # several chunks per module
    assert rq.splits == (128, 64, 64) and rq.w.shape == (256, 128 // 8)
    expected = torch.cat([m.dequantize_weight().t() for m in mods])
    assert torch.equal(rowquant.reference(rq, expected.dtype), expected)
    x = torch.randn(3, 128)
    torch.testing.assert_close(rowquant.linear(rq, x), x @ expected.float().t())
    # a real act-order module (g_idx not all zero) is refused
    attn.o_proj.g_idx[3] = 1
    with pytest.raises(ValueError, match="g_idx"):
        rowquant.pack([attn.o_proj])


def test_nibble_order_pairs_neighbouring_inputs() -> None:
    """Slot p of a word holds input ORDER[p]: slots j and j+4 are inputs 2j
    and 2j+1, the pair the kernel multiplies with one half2 of x."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)[None, :16]  # inputs 0..15 hold codes 0..15
    word = int(rowquant._pack_rows(codes)[0, 0]) & 0xFFFFFFFF
    slots = [(word >> (4 * p)) & 15 for p in range(8)]
    assert slots == [0, 2, 4, 6, 1, 3, 5, 7]
    for j in range(4):
        assert (slots[j], slots[j + 4]) == (2 * j, 2 * j + 1)


def fused(path: Path) -> tuple[Any, Any, list[products.LayerProducts]]:
    engine = load(path)
    model = engine.model
    built = products.build(model, torch_batch_module)
    assert not quant_modules(model)  # every module is a view of the row packing now
    return engine, model, built


def test_fused_products_decode_like_generate(channelwise_checkpoint: Path) -> None:  # noqa: F811
    loader = load(channelwise_checkpoint)
    model = loader.model
    prompts = [[1, 300, 301, 302, 303], [1, 410, 411, 412, 413, 414, 415, 416, 417, 418, 419]]
    ids = torch.tensor([[1, 300, 301, 302, 303, 304]])
    with torch.no_grad():
        logits_before = model(ids).logits
        want = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
                for p in prompts]

    built = products.build(model, torch_batch_module)
    assert len(built) == 2
    for layer in model.model.layers:  # the model's own modules are views of the row packing
        assert isinstance(layer.self_attn.k_proj, products.RowQuantLinear)
        assert isinstance(layer.mlp.down_proj, products.RowQuantLinear)
    assert built[0].qkv.row.w.untyped_storage().data_ptr() == (
        model.model.layers[0].self_attn.q_proj.rq.w.untyped_storage().data_ptr())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_before, rtol=1e-4, atol=1e-4)

    cfg = ModelConfig(id="channelwise", max_batch=4, context_length=256)
    engine = BatchedEngine.over(model, loader.tokenizer, cfg, eos_ids=(), max_len=257)
    core = engine.core
    assert core is not None
    core.set_products(built)
    core.prompt_min_tokens = 8  # the second prompt goes through the dequantizing path
    used: list[str] = []
    for name in ("qkv", "o", "gate_up", "down"):  # record which packing each call used
        product = getattr(built[0], name)
        batch = product.batch

        def spy(x: torch.Tensor, batch: Any = batch) -> torch.Tensor:
            used.append("batch")
            return batch(x)  # type: ignore[no-any-return]

        product.batch = spy

    async def run(group: list[list[int]]) -> list[list[int]]:
        await engine.start()

        async def one(p: list[int]) -> list[int]:
            got: list[int] = []
            async for chunk in engine.stream_ids(p, GREEDY):
                got.extend(chunk)
            return got

        try:
            return list(await asyncio.gather(*(one(p) for p in group)))
        finally:
            await engine.close()

    assert asyncio.run(run(prompts)) == want  # two rows: the batch modules
    assert "batch" in used
    used.clear()
    assert asyncio.run(run(prompts[:1])) == want[:1]  # one row: the row path only
    assert used == ["batch"] * 4  # its 5-token prompt, shorter than 8: the batch modules; decode: rows
    assert max(engine.verify()) < 1e-4  # the load check, with its two-row step


def test_the_load_check_catches_a_wrong_batch_kernel(channelwise_checkpoint: Path) -> None:  # noqa: F811
    loader, model, built = fused(channelwise_checkpoint)
    cfg = ModelConfig(id="channelwise", max_batch=2, context_length=64)
    engine = BatchedEngine.over(model, loader.tokenizer, cfg, eos_ids=(), max_len=65)
    core = engine.core
    assert core is not None
    core.set_products(built)
    # a cache shorter than the dequantizing path's prompts (a small GPU): the
    # check cannot prefill one there, so it does not try ("does not fit")
    assert core.prompt_min_tokens >= core.scratch
    assert max(engine.verify()) < 1e-4
    # every prompt through the row packing: only the check's two-row step
    # reaches the batch modules, and one of them is wrong
    core.prompt_min_tokens = 1
    assert max(engine.verify()) < 1e-4
    good = built[0].o.batch
    assert good is not None
    built[0].o.batch = lambda x: -good(x)
    kernels = _fused_kernels(built)  # what the loader describes a fused model with
    assert kernels.startswith("row kernel") and "TorchLinear fused" in kernels
    engine._description = {"gptq kernel": kernels}
    with pytest.raises(ConfigError, match="decodes wrongly on the batched path") as err:
        engine.verify()
    assert "set [model] row_kernel = false (Marlin alone)" in str(err.value)  # the nearer fallback

