"""Buttons under replies in the core (issue 11): Continue, Regenerate, feedback,
their refusals, a restart in between, and ``xwin-bot export feedback``."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bot.app import Bot
from bot.config import Config, settings_from_generation
from bot.engine.fake import FakeEngine, Reply
from bot.export import export_feedback
from bot.main import main
from bot.store import Store
from bot.types import ConversationKey, Incoming, ReplyAction, ReplyInfo, ReplySink
from tests.conftest import make_config
from tests.sinks import RecordingSink

THREAD = ConversationKey("discord", "g1", "c1", "t1")
CUT = "Part one ends here"  # as long as max_new_tokens: cut there


@dataclass
class ButtonSink(RecordingSink):
    infos: list[ReplyInfo] = field(default_factory=list)

    async def reply_stored(self, info: ReplyInfo) -> None:
        self.infos.append(info)


def ask(mid: str, text: str, author: str = "u1") -> Incoming:
    return Incoming(THREAD, mid, author, author.upper(), text, False, time.time())


def press(reply_id: int, user: str = "u1", *, admin: bool = False, key: ConversationKey = THREAD) -> ReplyAction:
    return ReplyAction(key, reply_id, user, is_admin=admin)


def sink_for(sinks: list[ButtonSink]) -> object:
    def make(shown: str) -> tuple[ReplySink, dict[str, str]]:
        sinks.append(ButtonSink())
        return sinks[-1], {"shown": str(len(shown))}

    return make


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, generation={"max_new_tokens": len(CUT)})


@pytest.fixture
async def bot(config: Config) -> AsyncIterator[Bot]:
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as b:
        yield b


async def answer(bot: Bot, mid: str, text: str, reply: Reply, author: str = "u1") -> ReplyInfo:
    assert isinstance(bot.engine, FakeEngine)
    bot.engine.replies = [reply]
    bot.engine.calls.clear()
    sink = ButtonSink()
    assert await bot.handle(ask(mid, text, author), sink) == "queued"
    await sink.wait()
    [info] = sink.infos
    return info


async def run_action(bot: Bot, reply: Reply, call: object) -> tuple[str, list[ButtonSink]]:
    """Press a Continue/Regenerate button; the engine answers ``reply``."""
    assert isinstance(bot.engine, FakeEngine)
    bot.engine.replies = [reply]
    bot.engine.calls.clear()
    sinks: list[ButtonSink] = []
    result = await call(sink_for(sinks))  # type: ignore[operator]
    for sink in sinks:
        await sink.wait()
    return result.text, sinks


async def test_continue_appends_to_the_same_stored_reply(bot: Bot) -> None:
    info = await answer(bot, "m1", "Tell me a long story.", CUT)
    assert info.can_continue
    text, [sink] = await run_action(
        bot, " and part two.", lambda make: bot.continue_reply(press(info.reply_id), make)
    )
    assert text == "Continuing…"
    assert isinstance(bot.engine, FakeEngine)
    prompt = bot.engine.calls[0].prompt_text
    # The prompt ends with the unfinished reply: no end of sequence after it.
    assert prompt.endswith(f"USER: U1: Tell me a long story. ASSISTANT: {CUT}")
    assert sink.final() == ("finish", f"{CUT} and part two.")
    assert sink.infos == [ReplyInfo(info.reply_id, False)]  # the same reply, now complete
    stored = await bot.store.reply(info.reply_id)
    assert stored is not None and stored.text == f"{CUT} and part two." and stored.finish_reason == "stop"
    assert await bot.store.message_count() == 2  # one question, one reply
    again = await bot.continue_reply(press(info.reply_id), sink_for([]))  # type: ignore[arg-type]
    assert not again.ok and "nothing to continue" in again.text


async def test_regenerate_replaces_the_reply_in_the_next_prompt(bot: Bot) -> None:
    first = await answer(bot, "m1", "Name a colour.", "Red.")
    assert not first.can_continue
    _, [sink] = await run_action(bot, "Blue.", lambda make: bot.regenerate(press(first.reply_id), make))
    assert sink.final() == ("finish", "Blue.")
    assert isinstance(bot.engine, FakeEngine)
    assert "Red." not in bot.engine.calls[0].prompt_text  # the question asked again, alone
    await answer(bot, "m2", "Another?", "Green.")
    prompt = bot.engine.calls[0].prompt_text
    assert "ASSISTANT: Blue.</s>" in prompt and "Red." not in prompt
    old = await bot.store.reply(first.reply_id)
    assert old is not None and old.replaced and old.text == "Red."  # kept in the store


async def test_refusals_are_one_clear_sentence(bot: Bot) -> None:
    none_yet = await bot.continue_last(THREAD, "u1", False, sink_for([]))  # type: ignore[arg-type]
    assert not none_yet.ok and none_yet.text == "There is no reply here to continue yet."
    first = await answer(bot, "m1", "Question one?", "Short.")
    refused = await bot.regenerate(press(first.reply_id, "u2"), sink_for([]))  # type: ignore[arg-type]
    assert not refused.ok and refused.text.startswith("Only the person who asked")
    elsewhere = press(first.reply_id, key=ConversationKey("discord", "g1", "c1", "other"))
    gone = await bot.regenerate(elsewhere, sink_for([]))  # type: ignore[arg-type]
    assert not gone.ok and "can't find" in gone.text
    await answer(bot, "m2", "Question two?", "Also short.")
    old = await bot.regenerate(press(first.reply_id, "u2", admin=True), sink_for([]))  # type: ignore[arg-type]
    assert not old.ok and "last reply" in old.text
    assert isinstance(bot.engine, FakeEngine)
    assert bot.engine.calls[-1].prompt_text.endswith("Question two? ASSISTANT:")  # nothing more was run


async def test_too_old_replies_are_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, bot={"reply_buttons_max_age_hours": 0.0001})
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as bot:
        info = await answer(bot, "m1", "Hi", "Hello.")
        await store.db.execute("UPDATE messages SET created_at = created_at - 3600")
        refused = await bot.regenerate(press(info.reply_id), sink_for([]))  # type: ignore[arg-type]
        assert not refused.ok and "too old" in refused.text


async def test_feedback_counts_once_per_user_and_can_change(bot: Bot) -> None:
    info = await answer(bot, "m1", "Hi", "Hello.")
    assert (await bot.feedback(press(info.reply_id), "up")).text == "Thanks for the feedback."
    assert "already" in (await bot.feedback(press(info.reply_id), "up")).text
    assert await bot.store.feedback_rows() == [(info.reply_id, "u1", 1, pytest.approx(time.time(), abs=60))]
    assert "changed" in (await bot.feedback(press(info.reply_id), "down")).text
    await bot.feedback(press(info.reply_id, "u2"), "up")
    votes = {(user, value) for _, user, value, _ in await bot.store.feedback_rows()}
    assert votes == {("u1", -1), ("u2", 1)}


async def test_buttons_work_after_a_restart_and_export_has_the_turns(config: Config, tmp_path: Path) -> None:
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as bot:
        info = await answer(bot, "m1", "Tell me a long story.", CUT)
    # A new process: nothing in memory, the same SQLite file.
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as bot:
        _, [sink] = await run_action(
            bot, ", the end.", lambda make: bot.continue_reply(press(info.reply_id), make)
        )
        assert sink.final() == ("finish", f"{CUT}, the end.")
        await bot.feedback(press(info.reply_id, "u2"), "down")
        out = io.StringIO()
        assert await export_feedback(store, settings_from_generation(config.generation), out) == 1
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["user"] == "u2" and record["value"] == "down"
    assert [t["text"] for t in record["turns"]] == ["Tell me a long story.", f"{CUT}, the end."]
    assert record["settings"]["max_new_tokens"] == len(CUT)
    assert record["conversation"]["thread"] == "t1"
    # The CLI writes the same file.
    toml = tmp_path / "config.toml"
    toml.write_text(f'[bot]\ndatabase = "{config.database_path()}"\n')
    target = tmp_path / "votes.jsonl"
    assert await asyncio.to_thread(main, ["export", "feedback", "--config", str(toml), "--out", str(target)]) == 0
    assert json.loads(target.read_text())["reply_id"] == info.reply_id


async def test_buttons_respect_the_askers_quota(tmp_path: Path) -> None:
    """Quotas are checked before any work on the button path too: a Regenerate
    or Continue by someone over today's tokens gets the quota sentence, no job."""
    config = make_config(tmp_path, generation={"max_new_tokens": len(CUT)}, limits={"tokens_per_day": 3})
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine()) as bot:
        info = await answer(bot, "m1", "Tell me a long story.", CUT)  # 4 pieces: over the 3 allowed
        assert isinstance(bot.engine, FakeEngine)
        bot.engine.calls.clear()
        for call in (bot.regenerate, bot.continue_reply):
            refused = await call(press(info.reply_id), sink_for([]))  # type: ignore[operator]
            assert not refused.ok and "today's 3 tokens" in refused.text
        assert bot.engine.calls == [] and await store.count_pending() == 0


async def test_a_continuation_not_delivered_is_taken_back(bot: Bot) -> None:
    """What the user did not see is not history: the reply is as it was, and can be continued."""
    info = await answer(bot, "m1", "Tell me a long story.", CUT)

    class Unshowable(ButtonSink):
        async def finish(self, text: str) -> None:
            self.done.set()
            raise RuntimeError("the platform refused every edit")

    assert isinstance(bot.engine, FakeEngine)
    bot.engine.replies = [" and part two."]
    sink = Unshowable()
    result = await bot.continue_reply(press(info.reply_id), lambda shown: (sink, {}))
    assert result.ok
    await sink.wait()
    await bot.drain()
    stored = await bot.store.reply(info.reply_id)
    assert stored is not None and (stored.text, stored.finish_reason) == (CUT, "length")
    job = await bot.store.job(2)
    assert job is not None and job.state == "failed"
    _, [again] = await run_action(bot, " and part three.", lambda make: bot.continue_reply(press(info.reply_id), make))
    assert again.final() == ("finish", f"{CUT} and part three.")


async def test_a_button_jobs_messages_are_kept_for_a_restart(bot: Bot) -> None:
    """Like a message's reply (issue 9), a regenerated reply's messages are kept with its job,
    so that after a restart the sink resumes into them instead of leaving them stale."""
    first = await answer(bot, "m1", "Name a colour.", "Red.")
    sinks: list[ButtonSink] = []

    def make(shown: str) -> tuple[ReplySink, dict[str, str]]:
        sinks.append(PlacingSink())
        return sinks[-1], {}

    assert isinstance(bot.engine, FakeEngine)
    bot.engine.replies = ["Blue."]
    assert (await bot.regenerate(press(first.reply_id), make)).ok
    [sink] = sinks
    await sink.wait()
    await sink.place(["m-101", "m-102"])
    regenerated = (await bot.store.jobs_in(THREAD, states=("done",)))[-1]
    assert regenerated.kind == "regenerate" and regenerated.reply_ref["messages"] == "m-101,m-102"



@dataclass
class PlacingSink(ButtonSink):
    """A sink that shows its reply in platform messages and says which (``on_placed``)."""

    on_placed: Callable[[list[str]], Awaitable[None]] | None = None

    async def place(self, ids: list[str]) -> None:
        assert self.on_placed is not None, "the core did not ask where the reply is shown"
        await self.on_placed(ids)
