"""Operations (issue 12): metrics and health over HTTP against a running bot
with the fake engine, and per-user quotas that survive a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bot.app import Bot
from bot.config import Secrets
from bot.engine.fake import FakeEngine
from bot.errors import GenerationError
from bot.main import _health_server, _run
from bot.store import Store
from bot.types import ConversationKey, Incoming
from tests.conftest import make_config
from tests.fakes.discord_server import FakeDiscord, wait_for
from tests.sinks import RecordingSink

DM = ConversationKey("discord", "dm", "d1", "")


def msg(mid: str, text: str = "hello", author: str = "u1") -> Incoming:
    return Incoming(DM, mid, author, author.upper(), text, True, time.time())


class SlowStartEngine(FakeEngine):
    """A fake engine whose model "loads" until the test lets it."""

    def __init__(self, reply: str) -> None:
        super().__init__(replies=[reply])
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()
        await super().start()


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


async def scrape(port: int) -> dict[str, float]:
    """Every sample on /metrics, as ``name{label="v",...}`` -> value."""
    status, text = await get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def test_metrics_and_health_over_http(tmp_path: Path) -> None:
    config = make_config(tmp_path, metrics={"enabled": True, "port": 0}, generation={"max_new_tokens": 7})
    engine = SlowStartEngine("Hello from the fake engine.")  # 27 characters: 7 pieces of 4
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, engine)
        async with _health_server(bot) as server:
            assert server is not None and server.host == "127.0.0.1"
            port = server.port
            loading = asyncio.create_task(bot.start())
            assert await get(port, "/readyz") == (503, "bot: the model is loading\n")
            assert await get(port, "/healthz") == (200, "ok\n")
            before = await scrape(port)
            engine.loaded.set()
            await loading
            assert await get(port, "/readyz") == (200, "ok\n")

            sink = RecordingSink()
            assert await bot.handle(msg("m1"), sink) == "queued"
            assert await sink.wait() == ("finish", "Hello from the fake engine.")
            await bot.drain()
            after = await scrape(port)

            await bot.close()
            assert await get(port, "/readyz") == (503, "bot: shutting down\n")
        await store.close()
    assert before["xwin_model_loaded"] == 0 and after["xwin_model_loaded"] == 1
    assert before["xwin_ready"] == 0 and after["xwin_ready"] == 1
    assert "xwin_jobs_total" not in str(before)
    assert after['xwin_messages_total{result="queued"}'] == 1
    assert after['xwin_jobs_total{outcome="done"}'] == 1
    assert after["xwin_generated_tokens_total"] == 7
    assert after["xwin_replies_cut_at_max_new_tokens_total"] == 1  # 7 pieces = max_new_tokens
    assert after["xwin_time_to_first_token_seconds_count"] == 1
    assert after["xwin_tokens_per_second_count"] == 1
    assert after["xwin_queue_wait_seconds_count"] == 1
    assert after["xwin_queue_depth"] == 0 and after["xwin_engine_batch_occupancy"] == 0
    assert after["xwin_engine_max_batch"] == 1


async def test_healthz_fails_when_the_store_takes_no_writes(tmp_path: Path) -> None:
    config = make_config(tmp_path, metrics={"enabled": True, "port": 0})
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, FakeEngine())
        async with _health_server(bot) as server:
            assert server is not None
            assert (await get(server.port, "/healthz"))[0] == 200
            await store.close()
            status, text = await get(server.port, "/healthz")
    assert status == 503 and text == "check failed (StoreError)\n"


async def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with Store(config.database_path()) as store, _health_server(Bot(config, store, FakeEngine())) as server:
        assert server is None


async def ask(bot: Bot, mid: str, author: str = "u1") -> tuple[str, str | None]:
    """The handle result, and what the author was told if it was refused."""
    sink = RecordingSink()
    result = await bot.handle(msg(mid, f"question {mid}", author), sink)
    kind, said = await sink.wait()
    return result, str(said) if kind == "fail" else None


async def test_messages_per_minute_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"messages_per_minute": 2})
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as bot:
        assert [(await ask(bot, m))[0] for m in ("m1", "m2")] == ["queued", "queued"]
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as bot:
        result, refusal = await ask(bot, "m3")
        assert result == "limited"
        assert refusal is not None and "limit of 2 messages a minute" in refusal and "resets in" in refusal
        assert await bot.store.message_count() == 5  # two exchanges, and the refused message kept
        assert (await bot.handle(msg("m3", "question m3"), RecordingSink())) == "duplicate"
        assert (await ask(bot, "m4"))[0] == "limited"
        assert (await ask(bot, "m5", author="u2"))[0] == "queued"  # another user has their own quota
        bot.quotas.clock = lambda: time.time() + 61  # a minute later
        assert (await ask(bot, "m6"))[0] == "queued"
        assert isinstance(bot.engine, FakeEngine)
        assert len(bot.engine.calls) == 2  # m5 and m6: this engine began after the restart


async def test_tokens_per_day_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, limits={"tokens_per_day": 10})
    reply = "Hello from the fake engine."  # 7 pieces
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine([reply])) as bot:
        assert (await ask(bot, "m1"))[0] == "queued"
        assert (await ask(bot, "m2"))[0] == "queued"  # 7 < 10: answered, and now 14 used
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine([reply])) as bot:
        result, refusal = await ask(bot, "m3")
        assert result == "limited"
        assert refusal is not None and "10 tokens" in refusal and "00:00 UTC" in refusal
        assert await store.usage_since("discord", "u1", "tokens", 0) == 14
        bot.quotas.clock = lambda: time.time() + 86400  # tomorrow
        assert (await ask(bot, "m4"))[0] == "queued"


async def test_run_reports_adapter_readiness_and_reconnects(tmp_path: Path) -> None:
    async with FakeDiscord() as server:
        server.add_channel(server.add_guild("guild"))
        config = make_config(tmp_path, metrics={"enabled": True, "port": 0}, discord={
            "enabled": True, "api_base_url": server.api_base_url, "gateway_url": server.gateway_url})
        async with Store(config.database_path()) as store:
            bot = Bot(config, store, FakeEngine())
            async with _health_server(bot) as health:
                assert health is not None
                await bot.start()
                stop = asyncio.Event()
                run = asyncio.create_task(_run(bot, config, Secrets(discord_token=server.token), stop, health))
                await wait_for(lambda: server.identified())
                await until_status(health.port, "/readyz", 200)
                await server.ask_to_reconnect()
                await wait_for(lambda: any(f.get("op") == 6 for f in server.gateway_received))
                await until_status(health.port, "/readyz", 200)
                reconnects = (await scrape(health.port)).get('xwin_adapter_reconnects_total{platform="discord"}')
                stop.set()
                assert await run == 0
                status, text = await get(health.port, "/readyz")
    assert reconnects == 1
    assert status == 503 and text == "bot: shutting down\ndiscord: closed\n"


async def until_status(port: int, path: str, status: int) -> None:
    deadline = time.monotonic() + 10
    while (await get(port, path))[0] != status:
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        await asyncio.sleep(0.02)


async def test_failures_and_retries_are_counted(tmp_path: Path) -> None:
    config = make_config(tmp_path, bot={"retries": 1, "retry_delay": 0.0})
    flaky = GenerationError("the model server answered 503", retryable=True)
    engine = FakeEngine(replies=[flaky, flaky, "fine"])
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        _, said = await ask(bot, "m1")
        assert said == "Sorry, I could not finish that reply: the model server answered 503. Try again in a moment."
        assert (await ask(bot, "m2"))[1] is None
        value = bot.metrics.registry.get_sample_value
        assert value("xwin_jobs_total", {"outcome": "failed"}) == 1
        assert value("xwin_jobs_total", {"outcome": "done"}) == 1
        assert value("xwin_errors_total", {"kind": "retry"}) == 1
        assert value("xwin_errors_total", {"kind": "generation"}) == 1
        assert value("xwin_time_to_first_token_seconds_count") == 1  # the answered one
