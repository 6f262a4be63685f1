"""The core with a fake engine: queue, worker, limits, cancel, restart."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import Bot
from bot.config import Config
from bot.engine.fake import Call, FakeEngine
from bot.store import Store
from bot.types import CommandContext, ConversationKey, Incoming
from tests.conftest import make_config
from tests.sinks import RecordingSink

DM = ConversationKey("console", "dm", "u1", "")
THREAD = ConversationKey("discord", "g1", "c1", "t1")


def msg(mid: str, text: str = "hello", key: ConversationKey = DM, author: str = "u1") -> Incoming:
    return Incoming(key, mid, author, author.upper(), text, key.workspace == "dm", time.time())


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def bot(config: Config) -> AsyncIterator[Bot]:
    engine = FakeEngine(replies=["Paris is the capital. USER: and Italy?"], delay=0.001)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as b:
        yield b


def fake(bot: Bot) -> FakeEngine:
    assert isinstance(bot.engine, FakeEngine)
    return bot.engine


async def test_a_message_is_answered_and_stored(bot: Bot) -> None:
    sink = RecordingSink()
    assert await bot.handle(msg("m1", "What is the capital of France?"), sink) == "queued"
    assert await sink.wait() == ("finish", "Paris is the capital.")  # the stop string is cut
    assert sink.kinds()[:2] == ["queued", "started"]
    assert all("USER" not in str(v) for _, v in sink.events)
    prompt = fake(bot).calls[0].prompt_text
    assert prompt.startswith("<s>A chat between") and prompt.endswith(
        "USER: What is the capital of France? ASSISTANT:"
    )
    job = await bot.store.job(1)
    assert job is not None and job.state == "done"
    assert [t.role for t in await bot.store.history(job)] == ["user"]
    assert await bot.store.message_count() == 2


async def test_the_second_prompt_holds_the_first_exchange(bot: Bot) -> None:
    fake(bot).replies = ["First answer.", "Second answer."]
    for mid in ("m1", "m2"):
        sink = RecordingSink()
        await bot.handle(msg(mid, f"question {mid}", key=THREAD), sink)
        await sink.wait()
    second = fake(bot).calls[1].prompt_text
    assert "USER: U1: question m1 ASSISTANT: First answer.</s>USER: U1: question m2 ASSISTANT:" in second


async def test_duplicates_and_empty_messages(bot: Bot) -> None:
    sink = RecordingSink()
    await bot.handle(msg("m1"), sink)
    await sink.wait()
    again = RecordingSink()
    assert await bot.handle(msg("m1"), again) == "duplicate"
    assert again.events == []
    empty = RecordingSink()
    assert await bot.handle(msg("m2", "   "), empty) == "empty"
    assert empty.final()[0] == "fail" and "Ask me" in str(empty.final()[1])
    assert len(fake(bot).calls) == 1


async def test_answers_in_one_conversation_come_in_order_even_when_batched(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    engine = FakeEngine(
        replies=[lambda c: f"echo {c.prompt_text.rsplit('USER: ', 1)[1]}"], delay=0.01, max_batch=4
    )
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        sinks = [RecordingSink() for _ in range(6)]
        for i, sink in enumerate(sinks):
            key = THREAD if i % 2 == 0 else dataclasses.replace(THREAD, thread="t2")
            await bot.handle(msg(f"m{i}", f"q{i}", key=key, author=f"u{i}"), sink)
        await asyncio.gather(*(s.wait() for s in sinks))
        t1 = [c.prompt_text for c in engine.calls if "q0" in c.prompt_text]
        assert [p.rsplit("USER: ", 1)[1] for p in t1] == [f"U{i}: q{i} ASSISTANT:" for i in (0, 2, 4)]
        # Each prompt holds every earlier answer of its thread, in order: it waited for them.
        assert (
            t1[2].endswith(
                "USER: U0: q0 ASSISTANT: echo U0: q0 ASSISTANT:</s>"
                "USER: U2: q2 ASSISTANT: echo U0: q0 ASSISTANT: echo U2: q2 ASSISTANT:</s>"
                "USER: U4: q4 ASSISTANT:"
            )
            or "echo U2" in t1[2]
        )
        assert max(len(engine.calls), 0) == 6


def gated_engine(engine: FakeEngine, gate: asyncio.Event) -> FakeEngine:
    """``engine`` whose replies wait for ``gate``: jobs pile up in the queue meanwhile."""
    original = engine.stream

    async def gated(prompt_ids: list[int], settings: Any, **kwargs: Any) -> AsyncIterator[str]:
        await gate.wait()
        async for piece in original(prompt_ids, settings, **kwargs):
            yield piece

    engine.stream = gated  # type: ignore[method-assign]
    return engine


async def test_busy_limits_give_a_clear_reply_and_keep_the_message(tmp_path: Path) -> None:
    config = make_config(tmp_path, bot={"max_queue": 3, "max_pending_per_user": 2})
    gate = asyncio.Event()

    def slow(call: Call) -> str:
        return "done"

    engine = gated_engine(FakeEngine(replies=[slow], delay=0.0), gate)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        results = [await bot.handle(msg(f"a{i}", author="alice"), RecordingSink()) for i in range(3)]
        assert results == ["queued", "queued", "busy"]
        bob = [await bot.handle(msg(f"b{i}", author="bob", key=THREAD), RecordingSink()) for i in range(2)]
        assert bob == ["queued", "busy"]
        sink = RecordingSink()
        await bot.handle(msg("c1", author="carol", key=THREAD), sink)
        assert sink.final()[0] == "fail" and "busy" in str(sink.final()[1]).lower()
        assert await store.message_count() == 6  # nothing lost
        gate.set()
        await bot.drain()


async def test_busy_limits_hold_under_concurrent_messages(tmp_path: Path) -> None:
    """Issue 9: 200 messages from 50 people at once against max_queue 64, 3 each."""
    config = make_config(tmp_path, bot={"max_queue": 64, "max_pending_per_user": 3})
    gate = asyncio.Event()
    engine = gated_engine(FakeEngine(replies=["done"], delay=0.0), gate)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        people = [f"p{i // 4}" for i in range(200)]  # four messages each
        results = await asyncio.gather(*(
            bot.handle(msg(f"m{i}", author=who, key=dataclasses.replace(DM, channel=who)), RecordingSink())
            for i, who in enumerate(people)
        ))
        assert results.count("queued") == 64 and results.count("busy") == 136
        assert await store.count_pending() == 64
        assert max([await store.count_pending(f"p{i}") for i in range(50)]) == 3
        assert await store.message_count() == 200  # the refused ones are kept too
        gate.set()
        await bot.drain()


async def test_queue_positions_are_reported_and_move_up(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    engine = FakeEngine(replies=["ok"], delay=0.02)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        sinks = [RecordingSink() for _ in range(3)]
        for i, sink in enumerate(sinks):
            await bot.handle(msg(f"m{i}", author=f"u{i}", key=dataclasses.replace(DM, channel=f"d{i}")), sink)
        await asyncio.gather(*(s.wait() for s in sinks))
        # "n ahead" counts the reply being generated too.
        assert sinks[2].kinds()[:3] == ["queued", "queued", "started"]
        assert [v for k, v in sinks[2].events if k == "queued"] == [2, 1]


async def test_a_crash_mid_reply_fails_cleanly_and_the_next_job_runs(bot: Bot) -> None:
    fake(bot).replies = [RuntimeError("CUDA error: out of memory"), "fine again"]
    sink = RecordingSink()
    await bot.handle(msg("m1"), sink)
    kind, text = await sink.wait()
    assert kind == "fail" and "could not finish" in str(text) and "Traceback" not in str(text)
    job = await bot.store.job(1)
    assert job is not None and job.state == "failed"
    sink2 = RecordingSink()
    await bot.handle(msg("m2"), sink2)
    assert await sink2.wait() == ("finish", "fine again")


async def test_a_passing_fault_is_retried_and_the_reply_starts_over(tmp_path: Path) -> None:
    from bot.errors import GenerationError

    config = make_config(tmp_path, bot={"retries": 2, "retry_delay": 0.01})
    down = GenerationError("the model server cannot be reached", retryable=True)
    engine = FakeEngine(replies=[down, down, "Back: Paris."])
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        sink = RecordingSink()
        await bot.handle(msg("m1"), sink)
        assert await sink.wait() == ("finish", "Back: Paris.")
        assert len(engine.calls) == 3
        job = await store.job(1)
        assert job is not None and job.state == "done"
        # Out of retries: one clear sentence, and the question is still stored.
        engine.replies = [down]
        sink2 = RecordingSink()
        await bot.handle(msg("m2"), sink2)
        kind, text = await sink2.wait()
        assert kind == "fail" and "cannot be reached" in str(text) and len(engine.calls) == 6
        # A fault that is not passing is not retried.
        engine.replies = [GenerationError("your message is too long for the model")]
        calls = len(engine.calls)
        await bot.handle(msg("m3"), sink3 := RecordingSink())
        assert (await sink3.wait())[0] == "fail" and len(engine.calls) == calls + 1


async def test_stop_cancels_a_running_reply(bot: Bot) -> None:
    fake(bot).replies = ["word " * 400]
    fake(bot).delay = 0.01
    sink = RecordingSink()
    await bot.handle(msg("m1"), sink)
    await until(lambda: len(sink.events) > 3)
    ctx = CommandContext(key=DM, author_id="u1", is_dm=True, is_admin=False)
    assert (await bot.command(ctx, "stop")).text == "Stopped."
    kind, text = await sink.wait()
    assert kind == "finish" and str(text).endswith("(stopped)")
    job = await bot.store.job(1)
    assert job is not None and job.state == "cancelled"


async def test_deleting_the_asking_message_cancels_a_queued_job(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    engine = FakeEngine(replies=["word " * 200], delay=0.01)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        first, second = RecordingSink(), RecordingSink()
        await bot.handle(msg("m1", key=THREAD), first)
        await bot.handle(msg("m2", key=THREAD, author="u2"), second)
        assert await bot.cancel_message(THREAD, "m2")
        assert await second.wait() == ("fail", "Stopped.")
        await first.wait()
        assert len(engine.calls) == 1
        assert not await bot.cancel_message(THREAD, "m2")


async def test_updates_are_throttled_to_the_sinks_interval(bot: Bot) -> None:
    fake(bot).replies = ["x" * 400]
    fake(bot).piece_chars = 1
    fake(bot).delay = 0.002
    sink = RecordingSink(update_interval=0.2)
    await bot.handle(msg("m1"), sink)
    await sink.wait()
    updates = [k for k in sink.kinds() if k == "update"]
    assert 1 <= len(updates) <= 8  # ~400 pieces over ~1 s, at most one per 0.2 s


async def test_a_restart_answers_jobs_left_pending(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with Store(config.database_path()) as store:
        # The process died after storing the job: it is still queued.
        stored = await store.add_user_message(msg("m1", "are you there?"), settings_scope="x", with_job=True)
        assert stored is not None
        await store.set_job_state(stored[1] or 0, "running")
    sinks: list[RecordingSink] = []

    def factory(key: ConversationKey, ref: dict[str, str]) -> RecordingSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    engine = FakeEngine(replies=["yes, back again"])
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        bot.register_platform("console", factory)
        assert await bot.resume_pending() == 1
        assert await sinks[0].wait() == ("finish", "yes, back again")
        assert await store.message_count() == 2


async def test_shutdown_mid_reply_leaves_the_job_queued(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    engine = FakeEngine(replies=["word " * 1000], delay=0.01)
    store = Store(config.database_path())
    await store.open()
    bot = Bot(config, store, engine)
    await bot.start()
    sink = RecordingSink()
    await bot.handle(msg("m1"), sink)
    await until(lambda: "update" in sink.kinds())
    await bot.close(grace=0.05)
    assert sink.final()[0] == "fail" and "restarting" in str(sink.final()[1])
    job = await store.job(1)
    assert job is not None and job.state == "queued"
    await store.close()


async def test_settings_commands(bot: Bot) -> None:
    admin = CommandContext(key=THREAD, author_id="boss", is_dm=False, is_admin=True)
    member = CommandContext(key=THREAD, author_id="u1", is_dm=False, is_admin=False)
    assert "temperature is now 0.3" in (await bot.command(admin, "set temperature 0.3")).text
    refused = await bot.command(member, "set temperature 0.9")
    assert not refused.ok and "manage this channel" in refused.text
    bad = await bot.command(admin, "set top_p 2")
    assert not bad.ok and "top_p must be a number in (0, 1], got 2" in bad.text
    assert "unknown setting" in (await bot.command(admin, "set warmth 1")).text
    assert "an integer ≥ 0" in (await bot.command(admin, "set top_k -1")).text
    assert "[1, 4095]" in (await bot.command(admin, "set max_new_tokens 99999")).text
    sp = await bot.command(admin, "set system_prompt You are a pirate. Answer like one.")
    assert sp.ok
    shown = (await bot.command(member, "settings")).text
    assert "temperature = 0.3 (set here)" in shown and "pirate" in shown
    sink = RecordingSink()
    await bot.handle(msg("m1", key=THREAD), sink)
    await sink.wait()
    call = fake(bot).calls[-1]
    assert call.settings.temperature == 0.3 and call.prompt_text.startswith("<s>You are a pirate.")
    assert (await bot.command(admin, "reset temperature")).ok
    assert "temperature = 0.1\n" in (await bot.command(member, "settings")).text
    assert "Commands:" in (await bot.command(member, "")).text
    assert not (await bot.command(member, "frobnicate")).ok


async def test_dm_settings_are_the_users_own(bot: Bot) -> None:
    mine = CommandContext(key=DM, author_id="u1", is_dm=True, is_admin=False)
    other = CommandContext(
        key=dataclasses.replace(DM, channel="d2"), author_id="u2", is_dm=True, is_admin=False
    )
    assert (await bot.command(mine, "set temperature 1.5")).ok
    assert "temperature = 1.5" in (await bot.command(mine, "settings")).text
    assert "temperature = 0.1" in (await bot.command(other, "settings")).text


async def test_forget_starts_over(bot: Bot) -> None:
    sink = RecordingSink()
    await bot.handle(msg("m1", "my name is Aki"), sink)
    await sink.wait()
    ctx = CommandContext(key=DM, author_id="u1", is_dm=True, is_admin=False)
    assert (await bot.command(ctx, "forget")).ok
    sink2 = RecordingSink()
    await bot.handle(msg("m2", "what is my name?"), sink2)
    await sink2.wait()
    assert "Aki" not in fake(bot).calls[-1].prompt_text


async def test_status_shows_model_and_queue(bot: Bot) -> None:
    sink = RecordingSink()
    await bot.handle(msg("m1"), sink)
    await sink.wait()
    ctx = CommandContext(key=DM, author_id="u1", is_dm=True, is_admin=False)
    text = (await bot.command(ctx, "status")).text
    assert "engine: fake" in text and "queued: 0" in text and "tokens/s" in text


async def test_a_huge_message_is_stored_whole_and_the_reply_says_it_was_cut(tmp_path: Path) -> None:
    config = make_config(tmp_path, bot={"max_message_chars": 1000})
    engine = FakeEngine(replies=["Summary."])
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        huge = "lorem ipsum " * 50_000  # 600 kB
        sink = RecordingSink()
        await bot.handle(msg("m1", huge), sink)
        kind, text = await sink.wait()
        assert kind == "finish" and str(text).startswith("(Your message was too long") and "Summary." in str(text)
        assert len(engine.calls[0].prompt_ids) < 1200
        job = await store.job(1)
        assert job is not None and (await store.history(job))[0].text == huge


async def test_a_store_failure_mid_reply_is_told_and_the_state_is_right_after_a_restart(tmp_path: Path) -> None:
    """Issue 9: writing the reply fails, and so does writing the job's failure."""
    config = make_config(tmp_path)
    engine = FakeEngine(replies=["an answer the store refuses"])
    refuse = """
        CREATE TRIGGER no_reply BEFORE INSERT ON messages WHEN NEW.role = 'assistant'
            BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END;
        CREATE TRIGGER no_end BEFORE UPDATE OF state ON jobs WHEN NEW.state NOT IN ('queued', 'running')
            BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END;
    """
    async with Store(config.database_path()) as store:
        async with Bot(config, store, engine) as bot:
            await store.db.executescript(refuse)
            sink = RecordingSink()
            await bot.handle(msg("m1"), sink)
            kind, text = await sink.wait()
            assert kind == "fail" and "went wrong" in str(text) and "disk" not in str(text)
            job = await store.job(1)
            assert job is not None and job.state == "running"  # the store said no
            await store.db.executescript("DROP TRIGGER no_reply; DROP TRIGGER no_end;")
    async with Store(config.database_path()) as store:  # the next start
        job = await store.job(1)
        assert job is not None and job.state == "failed"
        assert await store.pending_jobs() == [] and await store.message_count() == 1


async def test_shutdown_is_bounded_when_the_platform_stalls(tmp_path: Path) -> None:
    """Issue 9: the platform answers nothing; close() still ends, the job stays queued."""

    class StalledSink(RecordingSink):
        async def fail(self, user_message: str) -> None:
            self.events.append(("fail", user_message))
            await asyncio.Event().wait()  # the platform API never answers

    config = make_config(tmp_path)
    engine = FakeEngine(replies=["word " * 1000], delay=0.01)
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, engine)
        await bot.start()
        bot.worker.last_words = 0.2
        sink = StalledSink()
        await bot.handle(msg("m1"), sink)
        await until(lambda: "update" in sink.kinds())
        started = time.monotonic()
        await asyncio.wait_for(bot.close(grace=0.05), timeout=5)
        assert time.monotonic() - started < 1.5
        assert sink.final()[0] == "fail"  # it tried to say goodbye
        job = await store.job(1)
        assert job is not None and job.state == "queued"


async def test_settings_must_be_finite_as_text_and_as_values(bot: Bot) -> None:
    """Issue 9: nan and inf are refused by /xwin set and by typed options alike."""
    admin = CommandContext(key=THREAD, author_id="boss", is_dm=False, is_admin=True)
    for raw in ("nan", "inf", "-inf"):
        reply = await bot.command(admin, f"set temperature {raw}")
        assert not reply.ok and "Not changed" in reply.text
        typed = await bot.set_settings(admin, {"temperature": float(raw), "top_k": 7})
        assert not typed.ok and "temperature not changed" in typed.text and "top_k is now 7" in typed.text
    settings, overridden = await bot.commands.effective("channel:discord:g1:c1")
    assert overridden == {"top_k"} and settings.temperature == 0.1
