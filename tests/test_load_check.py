"""Never serve garbage: the load check and non-finite logits while serving.

- A GPTQ checkpoint with a poisoned scale (infinity) is refused at start with
  one sentence naming the model, the kernel and what to set instead
  (bot/engine/fidelity.py), on the real GPTQ loading path on the CPU.
- The batched engine's own check refuses a model whose logits are not finite.
- While serving, a reply whose logits turn non-finite fails with a safe
  message and nothing sampled from them is sent; the event is logged.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import ModelConfig
from bot.engine.batched import MSG_NON_FINITE, BatchedEngine
from bot.engine.transformers import TransformersEngine
from bot.errors import ConfigError, GenerationError
from bot.types import Settings
from tests.test_gptq_cpu import tiny_gptq  # noqa: F401  (the session's tiny GPTQ checkpoint)

VOCAB = 600  # above the tests' Llama tokenizer's 573 ids (the load check's probe)


@pytest.fixture
def eager() -> Iterator[None]:
    """GPTQModel's torch kernel compiles its dequantize with inductor (slow
    C++ builds on 2 cores): eagerly here, the same arithmetic."""
    import torch._dynamo.config

    with torch._dynamo.config.patch(disable=True):
        yield


def test_poisoned_gptq_checkpoint_is_refused_at_start(
    tiny_gptq: Path, tmp_path: Path, eager: None  # noqa: F811
) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "poisoned"
    shutil.copytree(tiny_gptq / "gptq", path)
    weights = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.scales"
    weights[name][0, 5] = float("inf")  # one scale of one group
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})

    engine = TransformersEngine(ModelConfig(id=str(path), device_map="cpu", gptq_backend="torch"))
    with pytest.raises(ConfigError) as err:
        asyncio.run(engine.start())
    message = str(err.value)
    assert str(path) in message and "TorchLinear" in message and "non-finite" in message
    assert 'gptq_backend = "marlin" instead' in message
    assert "\n" not in message and "Traceback" not in message


def tiny_llama() -> Any:
    """bench/gpu.py's tiny random Llama (fresh: the tests poison it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_checkpoint import TINY, _llama_config

    torch.manual_seed(1)
    cfg = _llama_config(replace(TINY, vocab=VOCAB))
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()  # type: ignore[no-untyped-call]


def test_batched_engine_refuses_non_finite_logits(llama_tok: Any) -> None:
    model = tiny_llama()
    cfg = ModelConfig(id="tiny-poisoned", max_batch=2, context_length=128)
    engine = BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129)
    assert max(engine.verify()) < 1e-4  # healthy: the batched path matches the forward
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    with pytest.raises(ConfigError, match="model tiny-poisoned gives non-finite logits"):
        engine.verify()


def refused_then_started(llama_tok: Any, model: Any, cfg: ModelConfig, message: str, setting: str,
                         **kwargs: Any) -> BatchedEngine:
    """The load check refuses ``model`` under ``cfg`` with exactly
    ``message``; with ``[model] <setting> = false`` the same model starts.
    Returns that engine."""
    engine = BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129, **kwargs)
    with pytest.raises(ConfigError) as err:
        engine.verify()
    assert str(err.value) == message
    off = BatchedEngine.over(model, llama_tok, replace(cfg, **{setting: False}), eos_ids=(), max_len=129, **kwargs)
    assert off.core is not None and not getattr(off.core, setting)
    assert max(off.verify()) < 1e-4
    return off


def test_wrong_decode_attention_kernels_are_named_and_can_be_turned_off(
    llama_tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load check with the decode attention kernels on: healthy kernels
    pass; kernels that give wrong attention are refused with one sentence
    that names them and the setting that turns them off, and with that
    setting the same engine starts (torch's attention). Off the GPU their
    torch form stands in for them, corrupted here."""
    from bot.engine import attention

    monkeypatch.setattr(attention, "supports", lambda *args: True)
    model = tiny_llama()
    cfg = ModelConfig(id="tiny-attention", max_batch=2, context_length=128)
    engine = BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129)
    assert engine.core is not None and engine.core.attention_kernel
    assert max(engine.verify()) < 1e-4
    decode = attention.decode
    monkeypatch.setattr(attention, "decode", lambda q, *args: decode(q, *args) + 0.5)
    off = refused_then_started(
        llama_tok, model, cfg,
        "model tiny-attention decodes wrongly with the decode attention kernels (bot/engine/attention.cu) "
        "and correctly without them: set [model] attention_kernel = false instead", "attention_kernel",
    )
    # a batched path wrong with the kernels and without them is not blamed on them
    from bot.engine.fidelity import forward_logits, probe_ids

    wrong = -forward_logits(model, probe_ids(llama_tok))
    monkeypatch.setattr(attention, "decode", decode)
    for e in (BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129), off):
        with pytest.raises(ConfigError, match="model tiny-attention decodes wrongly on the batched path") as err:
            e.verify(wrong)
        assert "attention_kernel" not in str(err.value)


def test_a_wrong_residual_norm_kernel_is_named_alone_and_can_be_turned_off(
    llama_tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With both step kernels on (off the GPU their torch forms stand in) and
    only the residual add + RMSNorm one wrong, the load check names that one
    and its setting, not the attention kernels; with that setting the same
    model starts, the attention kernels still on."""
    from bot.engine import attention, norm

    monkeypatch.setattr(attention, "supports", lambda *args: True)
    monkeypatch.setattr(norm, "supports", lambda *args: True)
    model = tiny_llama()
    cfg = ModelConfig(id="tiny-norm", max_batch=2, context_length=128)
    engine = BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129, compile_glue=True)
    assert engine.core is not None and engine.core.norm_kernel and engine.core.attention_kernel
    assert max(engine.verify()) < 1e-4
    add_rms_norm = norm.add_rms_norm

    def wrong(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s, h = add_rms_norm(*args)
        return s, 2 * h

    monkeypatch.setattr(norm, "add_rms_norm", wrong)
    off = refused_then_started(
        llama_tok, model, cfg,
        "model tiny-norm decodes wrongly with the residual add + RMSNorm kernel (bot/engine/norm.cu) "
        "and correctly without it: set [model] norm_kernel = false instead", "norm_kernel", compile_glue=True,
    )
    assert off.core is not None and off.core.attention_kernel


def test_steps_wrong_only_under_dependent_launches_name_that_setting(
    llama_tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step that goes wrong only while the kernels are launched as
    dependent launches (a race: a kernel reading what the one before it has
    not finished writing), with the attention kernels on too, is named as
    the dependent launches' fault and their setting; with that setting off
    the same model starts."""
    from bot.engine import attention, cuda_ext
    from bot.engine.batched import DecodeCore

    monkeypatch.setattr(attention, "supports", lambda *args: True)
    monkeypatch.setattr(cuda_ext, "dependent_launch_supported", lambda device: True)
    monkeypatch.setattr(cuda_ext, "_dependent", False)
    body = DecodeCore._decode_body

    def racy(self: Any, *args: Any) -> torch.Tensor:
        out = body(self, *args)
        return out + 0.5 if cuda_ext._dependent else out

    monkeypatch.setattr(DecodeCore, "_decode_body", racy)
    cfg = ModelConfig(id="tiny-launch", max_batch=2, context_length=128)
    off = refused_then_started(
        llama_tok, tiny_llama(), cfg,
        "model tiny-launch decodes wrongly with the dependent launches of the project's kernels "
        "(bot/engine/dependent_launch.cuh) and correctly without them: set [model] dependent_launch = false instead",
        "dependent_launch",
    )
    assert off.core is not None and off.core.attention_kernel


async def test_non_finite_logits_while_serving_fail_only_that_reply(
    llama_tok: Any, caplog: pytest.LogCaptureFixture, lookahead: bool
) -> None:
    model = tiny_llama()
    greedy = Settings(0.0, 1.0, 0, 1.0, 6, "")
    prompt = [1, 40, 41, 42, 43]
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    assert first not in prompt
    # The token this reply writes first now embeds to NaN: the prompt's
    # prefill is fine, the decode step that reads that token is not.
    with torch.no_grad():
        model.model.embed_tokens.weight[first] = float("nan")
    cfg = ModelConfig(id="tiny", max_batch=4, context_length=128)
    engine = BatchedEngine.over(model, llama_tok, cfg, eos_ids=(), max_len=129, lookahead=lookahead)
    await engine.start()
    try:
        async def run(ids: list[int]) -> tuple[list[int], BaseException | None]:
            got: list[int] = []
            try:
                async for chunk in engine.stream_ids(ids, greedy):
                    got.extend(chunk)
            except GenerationError as exc:
                return got, exc
            return got, None

        caplog.set_level(logging.ERROR, logger="bot.engine.batched")
        (decoded, err_decode), (prefilled, err_prefill) = await asyncio.wait_for(
            asyncio.gather(run(prompt), run([1, 50, first, 51])), timeout=60
        )
        # the first token came from finite logits; nothing after it was sent
        assert decoded == [first]
        assert isinstance(err_decode, GenerationError) and str(err_decode) == MSG_NON_FINITE
        # a prompt holding the poisoned token fails at its prefill, with no token sent
        assert prefilled == []
        assert isinstance(err_prefill, GenerationError) and str(err_prefill) == MSG_NON_FINITE
        assert sum("non-finite logits" in r.getMessage() for r in caplog.records) == 2
        # the engine keeps serving: a clean prompt still gets its whole reply
        with torch.no_grad():
            model.model.embed_tokens.weight[first] = 0.01
        clean, err_clean = await asyncio.wait_for(run([1, 60, 61]), timeout=60)
        assert err_clean is None and len(clean) == 6
    finally:
        await engine.close()


def test_kernels_measured_wrong_are_refused_before_loading() -> None:
    from bot.engine.transformers import gptq_load_backend

    def backend(name: str, group: int, desc_act: bool) -> str:
        cfg = ModelConfig(id="TheBloke/x", device_map="cpu", gptq_backend=name)  # type: ignore[arg-type]
        return gptq_load_backend(cfg, {"group_size": group, "desc_act": desc_act}, True)

    for group, desc_act in ((-1, True), (-1, False), (128, True)):
        with pytest.raises(ConfigError, match=r'exllama_v2 kernel .*set \[model\] gptq_backend = "marlin"'):
            backend("exllama_v2", group, desc_act)
    assert backend("exllama_v2", 128, False) == "exllama_v2"
    assert backend("torch", -1, True) == "torch"
    # regrouping into Marlin needs the GPU; on the CPU the choice is left as it is
    assert backend("marlin", -1, True) == "marlin"
