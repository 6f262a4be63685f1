"""A GPTQ 4-bit checkpoint loads and generates on the CPU, through the engine.

The checkpoint is made by the test setup (tests/gptq_fixture.py: a random
2-layer Llama quantized with optimum + GPTQModel; about 20-40 s on 2 cores the
first time, then cached by recipe and library versions). Nothing is
downloaded. gptqmodel must be installed (scripts/install-gptq): these tests
fail, never skip, without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bot.config import ModelConfig
from bot.engine.transformers import TransformersEngine
from bot.types import Settings
from tests.gptq_fixture import GPTQ_ENV, GROUP_SIZE, tiny_gptq_checkpoint

for _key, _value in GPTQ_ENV.items():
    os.environ.setdefault(_key, _value)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_gptq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import gptqmodel  # noqa: F401
        import optimum.gptq  # noqa: F401
    except ImportError as exc:  # a failure, not a skip: CI must have GPTQ
        pytest.fail(f"GPTQ libraries missing ({exc}); run scripts/install-gptq", pytrace=False)
    # $XWIN_TEST_CACHE, else pytest's cache folder (.pytest_cache), else this
    # session's tmp folder (with -p no:cacheprovider).
    env_cache = os.environ.get("XWIN_TEST_CACHE")
    if env_cache:
        cache = Path(env_cache)
    elif getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("xwin-gptq"))
    else:
        cache = tmp_path_factory.mktemp("xwin-gptq")
    return tiny_gptq_checkpoint(cache)


def quantized_projections(model: Any) -> dict[str, Any]:
    return {name: module for name, module in model.named_modules() if name.endswith(PROJECTIONS)}


def assert_really_quantized(model: Any) -> set[str]:
    """Every projection is a GPTQModel quantized module holding packed int4
    weights, not a float Linear (a silent dequantize-on-load would pass a
    "does it generate" test)."""
    import torch
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    projections = quantized_projections(model)
    assert len(projections) == 2 * len(PROJECTIONS)
    kinds = set()
    for name, module in projections.items():
        assert isinstance(module, BaseQuantLinear), f"{name} is {type(module).__name__}"
        assert not isinstance(module, torch.nn.Linear), name
        assert module.bits == 4 and module.group_size == GROUP_SIZE, name
        floats = [p for p in module.parameters() if p.is_floating_point() and p.numel() >= 128 * 64]
        assert not floats, f"{name} holds a float weight matrix"
        assert module.qweight.dtype in (torch.int32, torch.uint8, torch.int8), name
        # 4 bits a weight: the packed tensor is an eighth of the float matrix's bytes (or less)
        assert module.qweight.numel() * module.qweight.element_size() * 2 <= (
            module.in_features * module.out_features
        ), name
        kinds.add(type(module).__name__)
    return kinds


def test_checkpoint_is_gptq_v1(tiny_gptq: Path) -> None:
    """Like the real checkpoints (TheBloke's): 4-bit GPTQ, v1 layout, in both
    config.json and quantize_config.json."""
    config = json.loads((tiny_gptq / "gptq" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["bits"] == 4
    assert quant["group_size"] == GROUP_SIZE
    assert quant.get("format", "gptq") == "gptq"
    side = json.loads((tiny_gptq / "gptq" / "quantize_config.json").read_text())
    assert side.get("format", "gptq") == "gptq"
    from safetensors import safe_open

    with safe_open(str(tiny_gptq / "gptq" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_transformers_loads_gptq_and_matches_float_model(tiny_gptq: Path, dtype: str) -> None:
    """``AutoModelForCausalLM.from_pretrained(path, device_map="cpu")`` gives
    quantized modules whose output follows the unquantized model's (a wrong
    zero-point layout, v1 read as v2, gives a cosine near 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gptq / "gptq", device_map="cpu", dtype=getattr(torch, dtype))
    assert_really_quantized(model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gptq / "float", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gptq / "gptq")
    ids = tokenizer("USER: What is the capital of France? ASSISTANT:", return_tensors="pt").input_ids
    with torch.inference_mode():
        got = model(ids).logits.float()
        want = reference(ids).logits.float()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cosine > 0.95, cosine
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


async def test_engine_streams_from_gptq_checkpoint(tiny_gptq: Path) -> None:
    """The project's engine, given a local GPTQ checkpoint as ``[model] id``,
    loads it with real GPTQ modules and streams a reply."""
    engine = TransformersEngine(
        ModelConfig(id=str(tiny_gptq / "gptq"), device_map="cpu", dtype="bfloat16", context_length=512)
    )
    await engine.start()
    try:
        kinds = assert_really_quantized(engine.model)
        assert kinds, "no GPTQ modules"
        tok = engine.tokenizer
        prompt = [tok.bos_id, *tok.encode_text("USER: Hi! ASSISTANT:")]
        settings = Settings(
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            repetition_penalty=1.0,
            max_new_tokens=12,
            system_prompt="",
        )
        pieces = [piece async for piece in engine.stream(prompt, settings)]
        stats = engine.last_stats
        assert stats is not None and stats.new_tokens >= 1
        assert stats.new_tokens <= 12
        # A random model may end with EOS at once; anything it says reaches us as text.
        if stats.new_tokens > 1:
            assert "".join(pieces)
    finally:
        await engine.close()


async def test_engine_describes_gptq_kernel(tiny_gptq: Path) -> None:
    """``/xwin status`` names the GPTQ kernel in use (e.g. ``TorchAtenLinear``
    on a CPU without AVX512-BF16, ``TorchCpuAvx512Linear`` with it,
    ``MarlinLinear`` on a GPU)."""
    engine = TransformersEngine(
        ModelConfig(id=str(tiny_gptq / "gptq"), device_map="cpu", dtype="bfloat16", context_length=512)
    )
    await engine.start()
    try:
        kinds = assert_really_quantized(engine.model)
        assert engine.describe().get("gptq kernel") in kinds
    finally:
        await engine.close()
