"""The real code path on the real embedded model (SmolLM2-135M, GGUF from PyPI)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.app import Bot
from bot.config import EMBEDDED_MODEL, GenerationConfig, ModelConfig, settings_from_generation
from bot.engine.transformers import TransformersEngine
from bot.prompt import PromptBuilder
from bot.store import Store
from bot.types import ConversationKey, Incoming, Settings, Turn
from tests.conftest import make_config
from tests.sinks import RecordingSink

pytestmark = pytest.mark.model

GREEDY = dataclasses.replace(settings_from_generation(GenerationConfig()), temperature=0.0, max_new_tokens=40)


@pytest.fixture(scope="module")
def engine() -> Iterator[TransformersEngine]:
    model = ModelConfig(id=EMBEDDED_MODEL, prompt_format="chat_template", device_map="cpu",
                        context_length=8192)
    eng = TransformersEngine(model)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


async def collect(engine: TransformersEngine, fmt: str, question: str, settings: Settings = GREEDY) -> list[str]:
    builder = PromptBuilder(engine.tokenizer, fmt=fmt, context_length=engine.context_length)
    ids = builder.build([Turn("user", question)], settings, is_dm=True).ids
    return [piece async for piece in engine.stream(ids, settings)]


async def test_japanese_streams_without_replacement_characters(engine: TransformersEngine) -> None:
    pieces = await collect(engine, "chat_template", "日本語で答えてください。りんごは英語で何ですか？")
    text = "".join(pieces)
    assert any(ord(c) > 0x3000 for c in text), f"no CJK text to test with: {text!r}"
    # Byte-level BPE splits these characters across tokens; no piece shows half of one.
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # it streamed


async def test_stop_strings_and_prompt_never_shown_through_the_worker(tmp_path: Path,
                                                                      engine: TransformersEngine) -> None:
    # In the Xwin format this model answers, then writes the user's next turn itself.
    raw = "".join(await collect(engine, "xwin", "What is the capital of France?"))
    assert "USER:" in raw, f"the model did not run on into a new turn this time: {raw!r}"
    engine.prompt_format = "xwin"
    try:
        config = make_config(tmp_path, generation={"temperature": 0.0, "max_new_tokens": 40})
        async with Store(config.database_path()) as store:
            bot = Bot(config, store, engine)
            bot.engine.start = _no_reload  # type: ignore[method-assign]  # loaded once for the module
            await bot.start()
            sink = RecordingSink()
            key = ConversationKey("console", "dm", "me", "")
            await bot.handle(Incoming(key, "m1", "me", "me", "What is the capital of France?", True,
                                      time.time()), sink)
            kind, text = await sink.wait(timeout=300)
            await bot.worker.stop()
    finally:
        engine.prompt_format = "chat_template"
    assert kind == "finish" and "Paris" in str(text)
    shown = [str(v) for k, v in sink.events if k in ("update", "finish")]
    for s in shown:
        assert "USER:" not in s and "<s>" not in s and "</s>" not in s and "ASSISTANT:" not in s
        assert "A chat between" not in s


async def _no_reload() -> None:
    return None


async def test_the_event_loop_stays_responsive_while_generating(engine: TransformersEngine) -> None:
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    pieces = await collect(engine, "chat_template", "Tell me about Paris.")
    stop.set()
    await tick
    assert pieces and len(lags) > 50
    lags.sort()
    p99, worst = lags[int(len(lags) * 0.99)], lags[-1]
    print(f"event loop lag while generating: p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    # Heartbeats (Discord: every ~41 s) and acks (Slack: 3 s) need far less than this.
    assert worst < 0.5 and p99 < 0.2
