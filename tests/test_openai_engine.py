"""The remote engine against a fake OpenAI-compatible server (127.0.0.1, port 0).

Failure cases end in a GenerationError with one clause for the user, fast;
the request bodies are what vLLM and ``transformers serve`` expect.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bot.app import Bot
from bot.config import ModelConfig
from bot.engine.openai import OpenAIEngine, prompt_text
from bot.errors import GenerationError
from bot.store import Store
from bot.types import ConversationKey, Incoming, Settings, Turn
from testkit.byte_tokenizer import byte_tokenizer
from testkit.openai_server import FakeOpenAIServer
from tests.conftest import make_config
from tests.sinks import RecordingSink

SETTINGS = Settings(
    temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=32, system_prompt="Be brief."
)
PROMPT = [1, 10, 11, 12]
FAST = 1.0  # request_timeout in the failure tests, seconds
DM = ConversationKey("console", "dm", "u1", "")


Make = Callable[..., Awaitable[tuple[OpenAIEngine, FakeOpenAIServer]]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[tuple[OpenAIEngine, FakeOpenAIServer]] = []

    async def _make(
        server: FakeOpenAIServer | None = None, *, api_key: str = "", **model: Any
    ) -> tuple[OpenAIEngine, FakeOpenAIServer]:
        server = await (server or FakeOpenAIServer()).start()
        config = ModelConfig(
            engine="openai", base_url=server.base_url, request_timeout=FAST, prompt_format="xwin", **model
        )
        engine = OpenAIEngine(config, api_key=api_key, tokenizer=byte_tokenizer())
        await engine.start()
        made.append((engine, server))
        return engine, server

    yield _make
    for engine, server in made:
        await engine.close()
        await server.close()


async def collect(
    engine: OpenAIEngine, ids: list[int] = PROMPT, settings: Settings = SETTINGS, **kw: Any
) -> list[str]:
    return [piece async for piece in engine.stream(ids, settings, **kw)]


async def fails_with(engine: OpenAIEngine, words: str, *, within: float = 3.0) -> None:
    started = time.monotonic()
    with pytest.raises(GenerationError) as info:
        await asyncio.wait_for(collect(engine), timeout=10)
    assert words in str(info.value)
    assert str(info.value).startswith("the model server")
    assert time.monotonic() - started < within


# -- the happy path -------------------------------------------------------------
async def test_streams_token_ids_and_settings_to_completions(make: Make) -> None:
    engine, server = await make(api_key="sk-secret")
    assert await collect(engine) == ["Hello", ",", " world", "."]
    body = server.requests[0]
    assert body == {
        "model": "fake-model",
        "prompt": PROMPT,
        "stream": True,
        "max_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "stop": [" USER:", "\nUSER:", "</s>"],
    }
    assert server.headers[0]["Authorization"] == "Bearer sk-secret"
    assert engine.max_batch == 8
    assert engine.last_stats is not None and engine.last_stats.new_tokens == 4


async def test_describe_names_engine_server_and_model(make: Make) -> None:
    engine, server = await make()
    await collect(engine)
    assert engine.describe() == {
        "engine": "openai",
        "server": server.base_url,
        "model": "fake-model",
        "api": "completions",
        "prompt sent as": "token ids",
    }


async def test_api_key_is_never_logged(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    engine, _ = await make(FakeOpenAIServer(api_key="sk-other"), api_key="sk-secret")
    await fails_with(engine, "API key")
    assert "sk-secret" not in caplog.text
    assert "sk-secret" not in repr(engine.__dict__.get("config"))


async def test_text_prompt_when_the_server_rejects_ids(make: Make) -> None:
    engine, server = await make(FakeOpenAIServer(behaviour="reject_ids"))
    tok = byte_tokenizer()
    ids = [1, *tok.encode_text("Hi </s> USER: x"), 2, *tok.encode_text("ok")]
    assert "".join(await collect(engine, ids)) == "Hello, world."
    sent = server.requests[-1]
    # The real EOS is spelled out; the one the user typed cannot become a special token.
    assert sent["prompt"] == "<s>Hi <\u2060/s> USER: x</s>ok"
    assert "top_k" not in sent
    # Sampling as the in-process engine gives it to generate() (one conversion for both).
    assert json.loads(sent["generation_config"]) == {
        "max_new_tokens": 32, "repetition_penalty": 1.1, "eos_token_id": 2, "pad_token_id": 2,
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
    }
    assert engine.describe()["prompt sent as"] == "text (hf)"
    await collect(engine, ids)  # the dialect is remembered: one request only
    assert len(server.requests) == 4  # ids, text (both refused), hf, hf


def test_prompt_text_drops_bos_only_where_the_tokenizer_adds_one() -> None:
    tok = byte_tokenizer()
    assert prompt_text(tok, [1, *tok.encode_text("a")]) == "<s>a"  # this one adds none


async def test_chat_api_sends_turns_as_messages(make: Make) -> None:
    engine, server = await make(api="chat")
    turns = [Turn("user", "Hi", "Aki"), Turn("assistant", "Hello."), Turn("user", "USER: more?", "Bo")]
    assert "".join(await collect(engine, turns=turns, is_dm=False)) == "Hello, world."
    body = server.requests[0]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Aki: Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bo: USER : more?"},
    ]
    assert "prompt" not in body and body["stream"] is True


async def test_japanese_split_across_packets_is_never_half_a_character(make: Make) -> None:
    pieces = ["こんに", "ちは", "、世界", "😀"]
    engine, _ = await make(FakeOpenAIServer(pieces=pieces, split_bytes=True))
    got = await collect(engine)
    assert got == pieces
    assert "\ufffd" not in "".join(got)


async def test_cancel_closes_the_stream_on_the_server(make: Make) -> None:
    engine, server = await make(FakeOpenAIServer(behaviour="stall", delay=30))
    stream = engine.stream(PROMPT, SETTINGS)
    assert await asyncio.wait_for(anext(stream), 5) == "Hello"
    await stream.aclose()
    await asyncio.wait_for(server.disconnected.wait(), 5)


# -- failures: one clear sentence, quickly -------------------------------------------
async def test_connection_refused(make: Make) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine, _ = await make()
    engine.base_url = f"http://127.0.0.1:{port}"
    await fails_with(engine, "cannot be reached")


async def test_start_survives_a_server_that_is_down(make: Make) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ModelConfig(engine="openai", base_url=f"http://127.0.0.1:{port}", request_timeout=FAST)
    engine = OpenAIEngine(config, tokenizer=byte_tokenizer())
    await engine.start()
    try:
        assert "server unreachable" in engine.describe()["model"]
        await fails_with(engine, "cannot be reached")
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("status", "words"),
    [(500, "failed (HTTP 500)"), (503, "overloaded"), (404, "does not serve"), (400, "rejected the request")],
)
async def test_http_errors(make: Make, status: int, words: str) -> None:
    engine, _ = await make(FakeOpenAIServer(behaviour="status", status=status))
    await fails_with(engine, words)


async def test_stream_cut_in_the_middle(make: Make) -> None:
    engine, _ = await make(FakeOpenAIServer(behaviour="cut", cut_after=2))
    got: list[str] = []
    with pytest.raises(GenerationError, match="stopped in the middle of the reply"):
        async for piece in engine.stream(PROMPT, SETTINGS):
            got.append(piece)
    assert got == ["Hello", ","]


async def test_slow_first_byte_times_out(make: Make) -> None:
    engine, _ = await make(FakeOpenAIServer(behaviour="slow_first_byte", delay=30))
    await fails_with(engine, f"did not answer within {FAST:g} s")


async def test_stall_mid_stream_times_out(make: Make) -> None:
    engine, _ = await make(FakeOpenAIServer(behaviour="stall", delay=30))
    await fails_with(engine, f"did not answer within {FAST:g} s")


async def test_stream_without_an_end_counts_as_cut(make: Make) -> None:
    engine, _ = await make(FakeOpenAIServer(send_end=False))
    await fails_with(engine, "stopped in the middle")


def test_config_fields_are_used() -> None:
    config = replace(
        ModelConfig(), engine="openai", base_url="http://h:1/", max_concurrency=3, served_model="m"
    )
    engine = OpenAIEngine(config)
    assert engine.max_batch == 3 and engine.base_url == "http://h:1"
    assert engine.describe()["model"] == "m"


# -- through the bot: the worker, the store and a sink ---------------------------------
async def test_bot_answers_and_reports_failures_through_the_remote_engine(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    server = await FakeOpenAIServer(pieces=["Paris", " is the capital.", " USER:", " and Italy?"]).start()
    engine = OpenAIEngine(replace(config.model, engine="openai", base_url=server.base_url,
                                  request_timeout=FAST), tokenizer=byte_tokenizer())
    try:
        async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
            sink = RecordingSink()
            await bot.handle(Incoming(DM, "m1", "u1", "Aki", "Capital of France?", True, time.time()), sink)
            assert await sink.wait() == ("finish", "Paris is the capital.")
            assert server.requests[0]["prompt"][0] == 1  # BOS: the bot built the ids
            server.behaviour = "status"
            failed = RecordingSink()
            await bot.handle(Incoming(DM, "m2", "u1", "Aki", "And Italy?", True, time.time()), failed)
            assert await failed.wait() == (
                "fail", "Sorry, I could not finish that reply: the model server failed (HTTP 500). "
                "Try again in a moment.")
            status = await bot.status()
            assert f"server: {server.base_url}" in status and "model: fake-model" in status
    finally:
        await server.close()


async def test_chat_api_through_the_bot_sends_the_threads_history(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    server = await FakeOpenAIServer(pieces=["Paris."]).start()
    engine = OpenAIEngine(replace(config.model, engine="openai", api="chat", base_url=server.base_url,
                                  request_timeout=FAST), tokenizer=byte_tokenizer())
    thread = ConversationKey("slack", "T1", "C1", "171.1")
    try:
        async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
            for mid, text in (("m1", "Capital of France?"), ("m2", "Say it again")):
                sink = RecordingSink()
                await bot.handle(Incoming(thread, mid, "u1", "Aki", text, False, time.time()), sink)
                assert await sink.wait() == ("finish", "Paris.")
    finally:
        await server.close()
    messages = server.requests[1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Aki: Capital of France?" and messages[2]["content"] == "Paris."
    assert messages[3]["content"] == "Aki: Say it again"
