"""The embedded model's converted copy (issue 12): made once from the GGUF,
loaded from the cache after that, made again when the GGUF changes."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import EMBEDDED_MODEL, ModelConfig
from bot.engine import embedded
from bot.engine.transformers import TransformersEngine
from tests.tiny_gguf import write_tiny_gguf

IDS = torch.tensor([[1, 75, 104, 111, 35, 104]])


def gguf_logits(gguf: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.inference_mode():
        return model(IDS).logits


def copy_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model(IDS).logits


def test_the_copy_is_made_once_and_again_when_the_gguf_changes(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    root = tmp_path / "cache"
    shown = io.StringIO()
    first = embedded.prepare(gguf, root, progress=shown)
    assert first.converted and first.path.parent == root
    assert "Converting tiny.gguf once" in shown.getvalue() and "3/3 done" in shown.getvalue()
    assert {"config.json", "model.safetensors", "tokenizer.json", embedded.MARK} <= {
        p.name for p in first.path.iterdir()}
    assert [p.name for p in root.iterdir()] == [first.path.name]  # no temporary folder left

    second = embedded.prepare(gguf, root, progress=shown)
    assert not second.converted and second.path == first.path
    old = gguf_logits(gguf)
    assert torch.equal(copy_logits(second.path), old)

    write_tiny_gguf(gguf, seed=1)  # the package was upgraded: another file at the same path
    third = embedded.prepare(gguf, root, progress=None)
    assert third.converted and third.path != first.path
    assert not first.path.exists()  # the outdated copy is gone
    new = copy_logits(third.path)
    assert torch.equal(new, gguf_logits(gguf)) and not torch.equal(new, old)


def test_a_damaged_copy_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    monkeypatch.setattr(embedded, "embedded_model_file", lambda: gguf)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    made = embedded.prepare(progress=None)
    assert made.path.parent == tmp_path / "xdg" / "xwin-bot"
    (made.path / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        model = embedded.load_model(dtype=torch.float32)
    assert "does not load" in caplog.text
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, gguf_logits(gguf))
    assert (made.path / "model.safetensors").is_file()


@pytest.mark.model
async def test_a_later_start_loads_the_copy_and_answers_like_the_gguf(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gguf = embedded.embedded_model_file()
    # The first start: read the GGUF (the real, slow path) and write the copy.
    from_gguf, gguf_tokenizer = embedded.convert(gguf, embedded.copy_path(gguf, embedded.default_cache_root()),
                                                 progress=None)

    def no_gguf(*args: Any) -> Any:
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(embedded, "_load_gguf", no_gguf)
    engine = TransformersEngine(ModelConfig(id=EMBEDDED_MODEL, prompt_format="chat_template", device_map="cpu"))
    await engine.start()  # the later start: from the copy only
    try:
        text = "日本語 and <|im_start|> and </s> What is the capital of France?"
        assert engine.tokenizer.hf.encode(text) == gguf_tokenizer.encode(text)
        ids = torch.tensor([engine.tokenizer.hf.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
            return_dict=False)])
        with torch.inference_mode():
            assert torch.equal(engine.model(ids).logits, from_gguf(ids).logits)
            greedy = {"max_new_tokens": 12, "do_sample": False, "temperature": None, "top_p": None,
                      "top_k": None, "pad_token_id": 2}
            assert torch.equal(engine.model.generate(ids, **greedy), from_gguf.generate(ids, **greedy))
    finally:
        await asyncio.wait_for(engine.close(), 60)
        shutil.rmtree(tmp_path / "xwin-bot")  # 517 MB; pytest keeps its last temporary folders


def test_without_a_writable_cache_the_gguf_is_loaded_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    monkeypatch.setattr(embedded, "embedded_model_file", lambda: gguf)
    (tmp_path / "not-a-folder").write_text("", encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    with caplog.at_level(logging.WARNING):
        model = embedded.load_model(dtype=torch.float32)
        tokenizer = embedded.load_tokenizer()
    assert "cannot keep a converted copy" in caplog.text
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, gguf_logits(gguf))
    ids = tokenizer.encode("hi")  # <s>, "▁" (3 bytes), then the bytes of "h" and "i" (3 + 0x68, 3 + 0x69)
    assert ids[0] == 1 and ids[-2:] == [107, 108]
