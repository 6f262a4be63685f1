"""Group size -1 (channelwise) GPTQ regrouped into groups: the same weights.

The reference checkpoint's quantization (bench/gpu.py's recipe: group size -1,
act order, GPTQ v1 zero points, sym) at a tiny size, written here in a second.
It is loaded with GPTQModel's torch kernel on the CPU, every channelwise module
is regrouped (bot/engine/gptq_regroup.py) into the same kernel class with
groups of 32, and the dequantized weights must be bit-for-bit the original's.
On the GPU the loader regroups into Marlin modules (groups of 128) the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu_checkpoint import Shape, build_checkpoint
from bot.config import ModelConfig
from bot.engine.transformers import TransformersEngine
from tests.gptq_fixture import GPTQ_ENV

for _key, _value in GPTQ_ENV.items():
    os.environ.setdefault(_key, _value)

CHANNELWISE = Shape(2, 128, 256, 4, 2, 512, -1, 512, True, desc_act=True)


@pytest.fixture(autouse=True)
def _eager() -> Iterator[None]:
    """GPTQModel's torch kernel compiles its dequantize with inductor (minutes
    of C++ builds on 2 cores): run it eagerly, the same arithmetic."""
    import torch._dynamo.config

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def channelwise_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("channelwise") / "ckpt"
    build_checkpoint(path, CHANNELWISE)
    return path


def load(path: Path) -> Any:
    engine = TransformersEngine(
        ModelConfig(id=str(path), device_map="cpu", dtype="float32", gptq_backend="torch")
    )
    engine.load()
    return engine


def quant_modules(model: Any) -> dict[str, Any]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


def test_regrouped_weights_equal_the_channelwise_ones(channelwise_checkpoint: Path) -> None:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from bot.engine.gptq_regroup import regroup_model

    engine = load(channelwise_checkpoint)
    model = engine.model
    before = {n: m.dequantize_weight().clone() for n, m in quant_modules(model).items()}
    assert len(before) == 2 * 7
    assert all(m.group_size in (-1, m.in_features) for m in quant_modules(model).values())
    ids = torch.tensor([[1, 300, 301, 302, 303, 304]])
    with torch.no_grad():
        logits_before = model(ids).logits

    pairs = regroup_model(model, 32, TorchLinear)
    assert len(pairs) == 14

    after = quant_modules(model)
    assert set(after) == set(before)
    for name, module in after.items():
        assert module.group_size == 32 and not module.desc_act, name
        assert module.scales.shape[0] == module.in_features // 32, name
        assert torch.equal(module.dequantize_weight(), before[name]), name
    with torch.no_grad():
        logits_after = model(ids).logits
    assert torch.isfinite(logits_after).all()
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-5, atol=1e-5)
    # nothing left channelwise: a second pass has nothing to do
    assert regroup_model(model, 32, TorchLinear) == []


def test_regroup_refuses_a_real_act_order_module(channelwise_checkpoint: Path) -> None:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from bot.engine.gptq_regroup import regroup_module

    module = next(iter(quant_modules(load(channelwise_checkpoint).model).values()))
    module.g_idx[3] = 1  # a row in another group: act order that matters
    with pytest.raises(ValueError, match="g_idx"):
        regroup_module(module, 32, TorchLinear)
