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
import fnmatch
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import ModelConfig
from bot.engine import products, rowquant
from bot.engine.batched import BatchedEngine, DecodeCore
from bot.engine.batched.engine import DENSE_SPARE, dense_budget
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


def decode_all(engine: BatchedEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy ids for every prompt, decoded together (the engine started and closed)."""

    async def run() -> list[list[int]]:
        await engine.start()

        async def one(p: list[int]) -> list[int]:
            got: list[int] = []
            async for chunk in engine.stream_ids(p, GREEDY):
                got.extend(chunk)
            return got

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await engine.close()

    return asyncio.run(run())


def fused(path: Path) -> tuple[Any, Any, list[products.LayerProducts]]:
    engine = load(path)
    model = engine.model
    built = products.build(model, torch_batch_module)
    assert not quant_modules(model)  # every module is a view of the row packing now
    return engine, model, built


def fused_engine(path: Path) -> tuple[Any, list[products.LayerProducts], BatchedEngine, DecodeCore]:
    """:func:`fused`'s model in a batched engine of two rows of 64 tokens, over its products."""
    loader, model, built = fused(path)
    cfg = ModelConfig(id="channelwise", max_batch=2, context_length=64)
    engine = BatchedEngine.over(model, loader.tokenizer, cfg, eos_ids=(), max_len=65)
    assert engine.core is not None
    engine.core.set_products(built)
    return model, built, engine, engine.core


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

    assert decode_all(engine, prompts) == want  # two rows: the batch modules
    assert "batch" in used
    used.clear()
    assert decode_all(engine, prompts[:1]) == want[:1]  # one row: the row path only
    assert used == ["batch"] * 4  # its 5-token prompt, shorter than 8: the batch modules; decode: rows
    assert max(engine.verify()) < 1e-4  # the load check, with its two-row step


def test_the_load_check_catches_a_wrong_batch_kernel(channelwise_checkpoint: Path) -> None:  # noqa: F811
    _, built, engine, core = fused_engine(channelwise_checkpoint)
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



def test_dense_weights_kept_give_the_same_numbers_within_their_budget(
    channelwise_checkpoint: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """``[model] dense_weights``: products kept dequantized (``set_dense``)
    spare prompts the unpacking and give the same logits and cache, bit for
    bit; the budget decides how many are kept, the engine's free memory the
    budget (after a prompt's working memory), and a budget of 0 drops them."""
    model, built, engine, core = fused_engine(channelwise_checkpoint)
    core.prompt_min_tokens = 8  # the prompt below goes through the row packing's dequantize
    unpacked: list[int] = []
    real = rowquant.reference
    monkeypatch.setattr(rowquant, "reference", lambda rq, *a: unpacked.append(1) or real(rq, *a))
    ids = [1, *range(300, 311)]

    def prefill() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        core.clear(0)
        logits = core.prefill(0, ids)
        return logits, core.k_cache[:, 0, :, : len(ids)].clone(), core.v_cache[:, 0, :, : len(ids)].clone()

    want = prefill()
    assert unpacked  # each product unpacked its codes
    sizes = [p.row.dense_nbytes() for layer in built for p in layer.each()]
    qkv = built[0].qkv.row
    assert sizes[0] == qkv.out_features * qkv.in_features * qkv.scale.element_size()
    assert products.set_dense(built, sum(sizes[:3]) + 1) == (3, sum(sizes[:3]))
    assert products.dense_kept(built) == sum(sizes[:3])
    assert products.set_dense(built, sum(sizes)) == (len(sizes), sum(sizes))
    unpacked.clear()
    got = prefill()
    assert unpacked == []  # every product's matrix kept: nothing unpacked
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert products.set_dense(built, 0) == (0, 0) and all(p.row.dense is None for layer in built for p in layer.each())

    # the engine's budget: free memory less a forward of the whole context's
    # working memory, the largest product unpacked and DENSE_SPARE
    elt = model.model.embed_tokens.weight.element_size()
    work = core.scratch * (8 * model.config.hidden_size + 3 * model.config.intermediate_size) * elt
    spare = work + max(sizes) + DENSE_SPARE
    assert dense_budget(model, built, spare + sum(sizes[:5]), core.scratch) == sum(sizes[:5])
    assert dense_budget(model, built, spare - 1, core.scratch) == 0
    assert engine.keep_dense(free=spare + sum(sizes[:5]) + 7) == sum(sizes[:5])
    assert engine.describe()["dense weights"].startswith(f"5 of {len(sizes)} products")
    assert engine.keep_dense(free=0) == 0 and products.dense_kept(built) == 0
    assert engine.keep_dense() == 0  # on a CPU: nothing kept, whatever is free


def test_the_tensor_core_paths_arithmetic() -> None:
    """``rowquant.mma`` (its CPU path here; the kernel's on a GPU, checked by
    the load check) computes ``(q - z)`` exactly, sums in float and scales
    each output once: the dequantized weights' product to float rounding."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 64), generator=gen, dtype=torch.uint8)
    zero = torch.randint(0, 16, (24,), generator=gen).float()
    scale = torch.rand(24, generator=gen) / 10
    rq = rowquant.RowQuant(w=rowquant._pack_rows(codes), scale=scale, zero=zero + 1024, splits=(24,))
    x = torch.randn(5, 64, generator=gen)
    weights = (codes.double() - zero.double()[:, None]) * scale.double()[:, None]
    torch.testing.assert_close(rowquant.mma(rq, x).double(), x.double() @ weights.t(), rtol=1e-5, atol=1e-6)
    assert rowquant.mma_fits(rq, 1) and rowquant.mma_fits(rq, rowquant.MMA_MAX_ROWS)
    assert not rowquant.mma_fits(rq, rowquant.MMA_MAX_ROWS + 1) and not rowquant.mma_fits(rq, 0)


def test_without_a_batch_module_batches_use_the_tensor_core_path(
    channelwise_checkpoint: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """``batch_kernel = "mma"`` (or "auto" on a GPU too small for Marlin's
    copy): no batch module; decode steps of several rows and short prompts go
    through ``rowquant.mma`` on the row packing, and still decode like
    ``generate()``; a wrong one fails the load check, which says what to set."""
    loader = load(channelwise_checkpoint)
    model = loader.model
    prompts = [[1, 300, 301, 302, 303], [1, 410, 411, 412, 413, 414, 415, 416, 417, 418, 419]]
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    built = products.build(model, None)
    kernels = _fused_kernels(built)
    assert "tensor-core kernel (batches)" in kernels
    rows: list[int] = []
    real = rowquant.mma

    def spy(rq: rowquant.RowQuant, x: torch.Tensor, *args: Any) -> torch.Tensor:
        rows.append(x.shape[0])
        return real(rq, x, *args)

    monkeypatch.setattr(rowquant, "mma", spy)
    cfg = ModelConfig(id="channelwise", max_batch=4, context_length=256)
    engine = BatchedEngine.over(model, loader.tokenizer, cfg, eos_ids=(), max_len=257)
    assert engine.core is not None
    engine.core.set_products(built)

    assert decode_all(engine, prompts) == want
    # both prompts, in one forward (5 + 11 rows: [model] mixed_prefill packs
    # prompts arriving together) or the second with the first's decode step
    # (11 + 1), and steps of two rows
    assert (5 + 11 in rows or {5, 11 + 1} <= set(rows)) and 2 in rows
    assert max(engine.verify()) < 1e-4
    monkeypatch.setattr(rowquant, "mma", lambda rq, x, *args: -real(rq, x, *args))
    engine._description = {"gptq kernel": kernels}
    with pytest.raises(ConfigError, match="decodes wrongly on the batched path") as err:
        engine.verify()
    assert 'set [model] batch_kernel = "marlin"' in str(err.value)


def test_batch_kernel_auto_keeps_marlins_copy_only_where_it_fits(
    channelwise_checkpoint: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """"auto" builds fused Marlin (a second copy of the weights) only when the
    GPU's free memory holds it and the KV cache the engine reserves."""
    from bot.engine.batched.engine import kv_token_bytes
    from bot.engine.gptq_regroup import REGROUP_SIZE, marlin_copy_bytes
    from bot.engine.transformers import TransformersEngine

    model = load(channelwise_checkpoint).model
    mods = products.modules(model)
    assert len(mods) == 7 * len(model.model.layers)
    copy = marlin_copy_bytes(mods)
    codes = sum(m.qweight.numel() * 4 for m in mods)
    assert copy == codes + sum(-(-m.in_features // REGROUP_SIZE) * m.out_features * 2 for m in mods)

    def decide(kind: str, free: int, reserve: int) -> bool:
        loader = TransformersEngine(ModelConfig(id="channelwise", batch_kernel=kind))  # type: ignore[arg-type]
        loader.kv_reserve = lambda model: reserve
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
        return loader._marlin_copy(model)

    assert decide("auto", copy + 1000, 1000)
    assert not decide("auto", copy + 999, 1000)
    assert decide("marlin", 0, 10**12) and not decide("mma", 10**12, 0)
    # what the engine reserves: every layer's keys and values per position and row
    cfg = ModelConfig(id="channelwise", max_batch=3, context_length=40)
    engine = BatchedEngine.over(model, None, cfg, eos_ids=(), max_len=41)  # type: ignore[arg-type]
    assert engine.core is not None
    cache = engine.core.k_cache.nbytes + engine.core.v_cache.nbytes
    assert kv_token_bytes(model) * 3 * 41 == cache


def test_the_kernel_stamp_and_the_package_cover_every_local_include() -> None:
    """A changed header rebuilds the kernels (each extension's stamp hashes
    every source file it includes) and an installed package carries them
    (package data)."""
    from bot.engine import attention, norm

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    packaged = pyproject["tool"]["setuptools"]["package-data"]["bot.engine"]
    for module in (rowquant, attention, norm):
        names = {path.name for path in module._SOURCES}
        for path in module._SOURCES:
            assert path.exists(), path
            includes = set(re.findall(r'^#include "([^"]+)"', path.read_text(), flags=re.M))
            assert includes <= names, f"{path.name} includes {includes - names}, which the stamp does not hash"
            assert any(fnmatch.fnmatch(path.name, pattern) for pattern in packaged), f"{path.name} not packaged"
