"""The Discord adapter, end to end: the real discord.py client logs in to a fake
Discord on 127.0.0.1 (port 0), and the tests assert on what the bot sent to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.discord import (
    DiscordAdapter,
    DiscordSink,
    queued_text,
    readable_text,
    split_message,
    thread_name,
)
from adapters.strings import SORRY
from bot.app import Bot
from bot.config import parse_config
from bot.engine.fake import FakeEngine, Reply
from bot.errors import AdapterError
from bot.settings import SPECS
from bot.store import Store
from bot.types import ConversationKey, ReplyInfo
from tests.fakes.discord_server import MANAGE_CHANNELS, FakeDiscord, FakeMessage, Json, wait_for

DEFAULT_TEMPERATURE = 0.1
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- pure helpers


def fences(text: str) -> int:
    return sum(1 for line in text.split("\n") if line.lstrip().startswith("```"))


def test_split_short_text_is_one_message() -> None:
    assert split_message("hello\nworld") == ["hello\nworld"]
    assert split_message("") == []


def test_split_closes_and_reopens_code_fences() -> None:
    code = "\n".join(f"x = {i}  # a line of code number {i}" for i in range(200))
    text = f"Here you go:\n```python\n{code}\n```\nThat's all."
    chunks = split_message(text, limit=500)
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk) <= 500
        assert fences(chunk) % 2 == 0, chunk
    assert all(c.startswith("```python\n") for c in chunks[1:-1])
    body = [line for c in chunks for line in c.split("\n") if line.startswith("x = ")]
    assert body == code.split("\n")
    assert chunks[0].startswith("Here you go:") and chunks[-1].endswith("That's all.")


def test_split_cuts_an_overlong_line_without_losing_text() -> None:
    text = "word " * 1000
    chunks = split_message(text, limit=300)
    assert all(len(c) <= 300 for c in chunks)
    assert "".join(chunks) == text
    assert all(set(c.split()) == {"word"} for c in chunks)  # cut between words, not inside one


def test_split_closes_a_fence_the_model_left_open() -> None:
    chunks = split_message("```\nprint(1)")
    assert chunks == ["```\nprint(1)\n```"]


def test_readable_text() -> None:
    text = readable_text(
        "<@42> hi <@!7>, see <#9> and <@&5> <:blob:123> <t:0:R>",
        bot_id=42,
        users={7: "Aki"},
        roles={5: "mods"},
        channels={9: "random"},
    )
    assert text == "hi @Aki, see #random and @mods :blob: 1970-01-01 00:00 UTC"


def test_small_texts() -> None:
    assert queued_text(2) == "queued: 2 ahead"
    assert queued_text(0) == "queued: next in line"
    assert thread_name("\n  What is Xwin?\nmore") == "What is Xwin?"
    assert len(thread_name("x" * 500)) == 100
    assert thread_name("") == "Xwin chat"


class StubMessage:
    def __init__(self, channel: StubChannel, content: str) -> None:
        self.channel, self.content = channel, content

    async def edit(self, *, content: str, allowed_mentions: Any) -> StubMessage:
        await self.channel.gate.wait()
        self.channel.log.append(("edit", content))
        self.content = content
        return self

    async def delete(self) -> None:
        self.channel.log.append(("delete", self.content))


class StubChannel:
    """Just enough of a discord.py Messageable for DiscordSink; edits wait on ``gate``."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.sent: list[StubMessage] = []

    async def send(self, content: str, *, allowed_mentions: Any, reference: Any = None) -> StubMessage:
        assert allowed_mentions.to_dict()["parse"] == []
        self.log.append(("send", content))
        self.sent.append(StubMessage(self, content))
        return self.sent[-1]

    async def typing(self) -> None:
        self.log.append(("typing", ""))


async def test_sink_ignores_a_late_queue_position_and_never_blocks_on_edits() -> None:
    channel = StubChannel()
    sink = DiscordSink(channel, update_interval=0)  # type: ignore[arg-type]
    await sink.started()
    await sink.queued(3)  # Bot.handle may report the position after the worker started
    assert [c for kind, c in channel.log if kind != "typing"] == ["thinking…"]

    channel.gate.clear()  # Discord is slow (rate limited): edits hang
    await asyncio.wait_for(sink.update("Hel"), 1)
    await asyncio.wait_for(sink.update("Hello"), 1)
    channel.gate.set()
    await sink.finish("Hello, world")
    assert channel.sent[0].content == "Hello, world"
    assert len(channel.sent) == 1


async def test_sink_continues_long_text_in_new_messages_and_reports_failure() -> None:
    channel = StubChannel()
    sink = DiscordSink(channel, update_interval=0, limit=50)  # type: ignore[arg-type]
    await sink.queued(0)
    await sink.started()
    await sink.update("word " * 30)
    await sink.fail("Sorry, I could not finish that reply.")
    contents = [m.content for m in channel.sent]
    assert contents[0].startswith("word")  # the placeholder became the text
    assert all(len(c) <= 50 for c in contents)
    assert contents[-1] == "Sorry, I could not finish that reply."
    assert sum(c.count("word") for c in contents) == 30


# ---------------------------------------------------------------------------- the world


@dataclass
class World:
    fake: FakeDiscord
    guild: Json
    channel: Json
    other_channel: Json
    user: Json
    engine: FakeEngine
    bot: Bot
    adapter: DiscordAdapter

    async def say(
        self, text: str, *, channel: Json | None = None, mention: bool = True, author: Json | None = None
    ) -> str:
        """A user posts in a guild channel (mentioning the bot unless told not to)."""
        prefix = f"<@{self.fake.bot_user['id']}> " if mention else ""
        return await self.fake.user_message(
            (channel or self.channel)["id"],
            prefix + text,
            author or self.user,
            mentions=[self.fake.bot_user] if mention else [],
            guild_id=self.guild["id"],
        )

    async def say_in(self, channel_id: str, text: str, *, mention: bool = False) -> str:
        return await self.say(text, channel={"id": channel_id}, mention=mention)

    def thread_of(self, message_id: str) -> str:
        """The thread made from a message has the message's id."""
        assert self.fake.sent("POST", rf"/channels/{self.channel['id']}/messages/{message_id}/threads$")
        return message_id

    async def reply_in(self, channel_id: str, count: int = 1) -> list[FakeMessage]:
        """Wait until the bot's ``count``-th reply in a channel is finished."""
        await wait_for(lambda: len(self.engine.calls) >= count and self.bot.worker.running() == 0)
        await self.bot.drain()
        return self.fake.bot_messages(channel_id)

    async def command(self, sub: str, options: dict[str, Any] | None = None, **kw: Any) -> str:
        token = await self.fake.slash_command(
            sub,
            options,
            user=kw.pop("user", self.user),
            channel_id=self.channel["id"],
            guild_id=self.guild["id"],
            **kw,
        )
        return str(await wait_for(lambda: self.fake.interaction_text(token) or None))


@dataclass
class Place:
    """The fake Discord with one guild and two text channels."""

    fake: FakeDiscord
    guild: Json
    channel: Json
    other: Json


@contextlib.asynccontextmanager
async def discord_server(fake: FakeDiscord | None = None) -> AsyncIterator[Place]:
    async with fake or FakeDiscord() as server:
        guild = server.add_guild("test guild")
        yield Place(server, guild, server.add_channel(guild, "general"), server.add_channel(guild, "random"))


@contextlib.asynccontextmanager
async def bot_on(
    place: Place,
    tmp_path: Path,
    *,
    replies: list[Reply] | None = None,
    delay: float = 0.0,
    discord: dict[str, Any] | Callable[[Json, Json, Json], dict[str, Any]] | None = None,
    token: str | None = None,
    embedded: bool = False,
    sections: dict[str, dict[str, Any]] | None = None,
    generation: dict[str, Any] | None = None,
) -> AsyncIterator[World]:
    """The real core with a fake engine, and the adapter logged in to the fake.
    ``discord`` is the [discord] config, or a function of (guild, #general, #random)
    giving it, for allowlists that name the fake's ids."""
    server = place.fake
    extra = discord(place.guild, place.channel, place.other) if callable(discord) else discord or {}
    raw = {
        "discord": {
            "enabled": True,
            "api_base_url": server.api_base_url,
            "gateway_url": server.gateway_url,
            **extra,
        },
        "bot": {"database": str(tmp_path / "bot.sqlite3"), "stream_interval": 0.05},
        **(sections or {}),
        "generation": generation or {},
    }
    engine: Any
    if embedded:  # the real model on the real code path
        from bot.engine.transformers import TransformersEngine

        raw["generation"] = {"temperature": 0.0, "max_new_tokens": 24}
        config = parse_config(raw, model_override="embedded")
        engine = TransformersEngine(config.model)
    else:
        config = parse_config(raw)
        engine = FakeEngine(replies=replies or ["Hello from the fake engine."], delay=delay)
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, engine)
        await bot.start()
        adapter = DiscordAdapter(
            bot, config.discord, token or server.token, guild_ready_timeout=0.05, file_origins=(server.base_url,)
        )
        try:
            await adapter.start()
            user = server.user("aki")
            yield World(server, place.guild, place.channel, place.other, user, engine, bot, adapter)
        finally:
            # The worker first, so that its last words ("restarting...") still reach Discord.
            await bot.close(grace=0.1)
            await adapter.close()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, fake: FakeDiscord | None = None, **options: Any) -> AsyncIterator[World]:
    async with discord_server(fake) as place, bot_on(place, tmp_path, **options) as world:
        yield world


def content_bodies(fake: FakeDiscord) -> list[Json]:
    """Every request body in which the bot sent text."""
    bodies = []
    for r in fake.requests:
        body = r.json
        if "content" in body:
            bodies.append(body)
        elif "content" in body.get("data", {}):
            bodies.append(body["data"])
    return bodies


# ---------------------------------------------------------------------------- conversations


async def test_mention_starts_a_thread_and_streams_the_reply(tmp_path: Path) -> None:
    answer = "Xwin-LM is a family of chat models, fine-tuned from Llama 2. " * 6
    async with running(tmp_path, replies=[answer], delay=0.01) as w:
        asked = await w.say("What is  Xwin-LM?")
        thread = w.thread_of(await wait_for(lambda: w.fake.sent("POST", "/threads$") and asked))
        [reply] = await w.reply_in(thread)

        assert reply.content == answer.strip()
        # A placeholder first, then the streamed text by edits of that same message.
        assert reply.history[0].startswith("queued:")
        partial = [h for h in reply.history if h and answer.startswith(h)]
        assert partial, reply.history
        assert len(reply.history) >= 3
        # Typing while generating, in the thread.
        assert w.fake.sent("POST", rf"/channels/{thread}/typing$")
        # The prompt had the question without the bot's mention.
        prompt = w.engine.calls[0].prompt_text
        assert "What is Xwin-LM?" in prompt and "<@" not in prompt
        assert w.fake.sent("POST", "/threads$")[0].json["name"] == "What is Xwin-LM?"


async def test_follow_up_in_the_thread_continues_the_conversation(tmp_path: Path) -> None:
    async with running(
        tmp_path, replies=["The capital of France is Paris.", "About two million people."]
    ) as w:
        asked = await w.say("What is the capital of France?")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        thread = w.thread_of(asked)
        await w.reply_in(thread)

        await w.say_in(thread, "How many people live there?")
        replies = await w.reply_in(thread, count=2)

        assert [r.content for r in replies] == [
            "The capital of France is Paris.",
            "About two million people.",
        ]
        second = w.engine.calls[1].prompt_text
        for text in ("What is the capital of France?", "The capital of France is Paris.", "How many people"):
            assert text in second
        assert len(w.fake.sent("POST", "/threads$")) == 1


async def test_message_in_someone_elses_thread_without_mention_is_ignored(tmp_path: Path) -> None:
    async with running(tmp_path) as w:
        await w.say_in(w.other_channel["id"], "chatting among humans")  # no mention, not a bot thread
        asked = await w.say("hello")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        await w.reply_in(w.thread_of(asked))
        assert len(w.engine.calls) == 1
        assert w.fake.bot_messages(w.other_channel["id"]) == []


async def test_dm_is_answered_and_continues(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["Hi there!", "Still here."]) as w:
        dm = w.fake.snowflake()
        await w.fake.user_message(dm, "hello bot", w.user)
        [reply] = await w.reply_in(dm)
        assert reply.content == "Hi there!"
        await w.fake.user_message(dm, "are you there?", w.user)
        replies = await w.reply_in(dm, count=2)
        assert [r.content for r in replies] == ["Hi there!", "Still here."]
        assert "hello bot" in w.engine.calls[1].prompt_text
        assert not w.fake.sent("POST", "/threads$")


async def test_empty_mention_gets_one_line_help_in_place(tmp_path: Path) -> None:
    async with running(tmp_path) as w:
        asked = await w.say("")
        [help_] = await wait_for(lambda: w.fake.bot_messages(w.channel["id"]))
        assert "\n" not in help_.content and "/xwin" in help_.content
        post = w.fake.sent("POST", rf"/channels/{w.channel['id']}/messages$")[0]
        assert str(post.json["message_reference"]["message_id"]) == asked
        assert not w.fake.sent("POST", "/threads$") and not w.engine.calls


async def test_reply_mode_answers_in_place(tmp_path: Path) -> None:
    async with running(tmp_path, discord={"reply_in": "reply"}, replies=["In place."]) as w:
        asked = await w.say("answer here please")
        [reply] = await w.reply_in(w.channel["id"])
        assert reply.content == "In place."
        first = w.fake.sent("POST", rf"/channels/{w.channel['id']}/messages$")[0]
        assert str(first.json["message_reference"]["message_id"]) == asked
        assert not w.fake.sent("POST", "/threads$")


async def test_mentions_of_others_become_readable_names(tmp_path: Path) -> None:
    async with running(tmp_path) as w:
        mika = w.fake.user("mika")
        text = f"<@{w.fake.bot_user['id']}> ask <@{mika['id']}> about <#{w.other_channel['id']}>"
        await w.fake.user_message(
            w.channel["id"], text, w.user, mentions=[w.fake.bot_user, mika], guild_id=w.guild["id"]
        )
        await wait_for(lambda: w.engine.calls)
        assert "ask @mika about #random" in w.engine.calls[0].prompt_text


async def test_other_bots_and_own_messages_are_ignored(tmp_path: Path) -> None:
    async with running(tmp_path) as w:
        other_bot = w.fake.user("otherbot", bot=True)
        await w.say("from a bot", author=other_bot)
        await w.say("from myself", author=w.fake.bot_user)
        asked = await w.say("from a person")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        await w.reply_in(w.thread_of(asked))
        assert len(w.engine.calls) == 1 and "from a person" in w.engine.calls[0].prompt_text
        assert len(w.fake.sent("POST", "/threads$")) == 1


# ---------------------------------------------------------------------------- allowlists


async def test_message_outside_the_channel_allowlist_gets_nothing(tmp_path: Path) -> None:
    only_general = lambda guild, general, random: {"channels": [general["id"]]}  # noqa: E731
    async with running(tmp_path, discord=only_general) as w:
        await w.say("anyone here?", channel=w.other_channel)
        token = await w.fake.slash_command(
            "status", user=w.user, channel_id=w.other_channel["id"], guild_id=w.guild["id"]
        )
        refusal = await wait_for(lambda: w.fake.interaction_text(token))
        # A later message that is allowed gets its answer: the ignored one was seen before it.
        asked = await w.say("and here?")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        await w.reply_in(w.thread_of(asked))

        assert len(w.engine.calls) == 1 and "and here?" in w.engine.calls[0].prompt_text
        assert not w.fake.sent(path_regex=rf"/channels/{w.other_channel['id']}/")
        assert "not enabled here" in refusal
        # A thread of an allowed channel is allowed too.
        await w.say_in(w.thread_of(asked), "a follow-up")
        await w.reply_in(w.thread_of(asked), count=2)
        assert "a follow-up" in w.engine.calls[1].prompt_text


async def test_message_outside_the_guild_allowlist_gets_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, discord={"guilds": ["1234"]}) as w:
        await w.say("anyone?")
        dm = w.fake.snowflake()
        await w.fake.user_message(dm, "a DM still works", w.user)
        await w.reply_in(dm)
        assert len(w.engine.calls) == 1 and "a DM still works" in w.engine.calls[0].prompt_text
        assert not w.fake.sent(path_regex=rf"/channels/{w.channel['id']}/")


async def test_dms_can_be_turned_off(tmp_path: Path) -> None:
    async with running(tmp_path, discord={"allow_dms": False}) as w:
        dm = w.fake.snowflake()
        await w.fake.user_message(dm, "hello?", w.user)
        asked = await w.say("in the channel")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        await w.reply_in(w.thread_of(asked))
        assert len(w.engine.calls) == 1
        assert not w.fake.sent(path_regex=rf"/channels/{dm}/")


# ---------------------------------------------------------------------------- slash commands


async def test_commands_are_registered_with_ranges_and_choices(tmp_path: Path) -> None:
    async with running(tmp_path) as w:
        [put] = w.fake.sent("PUT", r"/applications/\d+/commands$")
        [xwin] = put.body
        subs = {o["name"]: o for o in xwin["options"]}
        assert set(subs) == {"settings", "set", "reset", "forget", "delete", "stop", "continue", "status"}
        [confirm] = subs["delete"]["options"]
        assert confirm["name"] == "confirm" and confirm["type"] == 5 and not confirm.get("required")
        options = {o["name"]: o for o in subs["set"]["options"]}
        assert options["temperature"]["min_value"] == 0 and options["temperature"]["max_value"] == 2
        assert options["repetition_penalty"]["min_value"] == 1
        assert options["top_k"]["type"] == 4 and options["top_k"]["min_value"] == 0
        assert not any(o.get("required") for o in options.values())
        choices = [c["value"] for c in subs["reset"]["options"][0]["choices"]]
        assert choices == list(SPECS)


async def test_set_temperature_changes_the_next_reply(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["one", "two"]) as w:
        await w.say("first")
        await wait_for(lambda: w.engine.calls)
        assert w.engine.calls[-1].settings.temperature == DEFAULT_TEMPERATURE

        text = await w.command("set", {"temperature": 0.3}, permissions=MANAGE_CHANNELS)
        assert "temperature" in text and "0.3" in text

        await w.say("second")
        await wait_for(lambda: len(w.engine.calls) == 2)
        assert w.engine.calls[-1].settings.temperature == 0.3
        # Deferred first, ephemerally.
        [callback] = w.fake.sent("POST", r"/interactions/\d+/[^/]+/callback$")
        assert callback.json["type"] == 5 and callback.json["data"]["flags"] & 64


async def test_a_newline_in_an_option_is_a_value_not_a_second_command(tmp_path: Path) -> None:
    """Issue 9: options are passed as values, never re-read as command text."""
    async with running(tmp_path, replies=["ok"]) as w:
        prompt = "Be nice.\nset temperature 1.7"
        text = await w.command("set", {"system_prompt": prompt}, permissions=MANAGE_CHANNELS)
        assert "system_prompt is now" in text and "temperature is now" not in text
        await w.say("hello")
        await wait_for(lambda: w.engine.calls)
        settings = w.engine.calls[-1].settings
        assert settings.temperature == DEFAULT_TEMPERATURE and settings.system_prompt == prompt
        text = await w.command("set", {"top_k": 5, "max_new_tokens": 10**6}, permissions=MANAGE_CHANNELS)
        assert "top_k is now 5" in text and "max_new_tokens not changed" in text


async def test_non_admin_cannot_change_settings(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["ok"]) as w:
        text = await w.command("set", {"temperature": 1.5})
        assert "manage" in text.lower()
        await w.say("hello")
        await wait_for(lambda: w.engine.calls)
        assert w.engine.calls[-1].settings.temperature == DEFAULT_TEMPERATURE
        # Reading the settings is for everyone.
        shown = await w.command("settings")
        assert f"temperature = {DEFAULT_TEMPERATURE}" in shown


async def test_in_a_dm_everyone_sets_their_own_settings(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["ok"]) as w:
        dm = w.fake.snowflake()
        token = await w.fake.slash_command("set", {"max_new_tokens": 64}, user=w.user, channel_id=dm)
        assert "max_new_tokens" in await wait_for(lambda: w.fake.interaction_text(token))
        await w.fake.user_message(dm, "hello", w.user)
        await w.reply_in(dm)
        assert w.engine.calls[-1].settings.max_new_tokens == 64
        # The channel's settings are untouched.
        assert "max_new_tokens = 512" in await w.command("settings")


async def test_admin_role_may_change_settings(tmp_path: Path) -> None:
    async with running(tmp_path, discord={"admin_roles": ["bot-admins"]}) as w:
        role = w.fake.add_role(w.guild, "bot-admins")
        # The guild was sent at login; tell the client about the new role.
        await w.fake.dispatch("GUILD_ROLE_CREATE", {"guild_id": w.guild["id"], "role": role})
        text = await w.command("set", {"top_k": 40}, roles=[role["id"]])
        assert "manage" not in text.lower()
        shown = await w.command("settings")
        assert "top_k = 40" in shown


# ---------------------------------------------------------------------------- replies


async def test_long_reply_with_code_arrives_as_several_valid_messages(tmp_path: Path) -> None:
    code = "\n".join(f"print({i})  # printing the number {i} for the long example" for i in range(120))
    answer = f"Here is the program:\n```python\n{code}\n```\nRun it with python3."
    assert len(answer) > 5000
    async with running(tmp_path, replies=[answer]) as w:
        asked = await w.say("write a long program")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        messages = await w.reply_in(w.thread_of(asked))

        assert len(messages) >= 3
        for m in messages:
            assert 0 < len(m.content) <= 2000
            assert fences(m.content) % 2 == 0, m.content
        lines = [line for m in messages for line in m.content.split("\n") if line.startswith("print(")]
        assert lines == code.split("\n")
        assert messages[0].content.startswith("Here is the program:")
        assert messages[-1].content.endswith("Run it with python3.")
        assert not [r for r in w.fake.requests if r.status == 400]


async def test_model_text_never_pings_anyone(tmp_path: Path) -> None:
    answer = "@everyone @here <@123456789012345678> <@&123456789012345678> look!"
    async with running(tmp_path, replies=[answer]) as w:
        client_default = w.adapter.client.allowed_mentions
        asked = await w.say("ping everybody")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        [reply] = await w.reply_in(w.thread_of(asked))
        assert reply.content == answer
        await w.command("status")

        bodies = content_bodies(w.fake)
        assert len(bodies) >= 4  # placeholder, edits, command reply
        for body in bodies:
            mentions = body.get("allowed_mentions")
            assert mentions is not None, body
            assert mentions["parse"] == [] and not mentions.get("users") and not mentions.get("roles")
            assert not mentions.get("replied_user")
        assert client_default is not None and client_default.to_dict()["parse"] == []


async def test_a_429_is_retried_not_fatal(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["after the rate limit"]) as w:
        w.fake.rate_limit("POST", r"^/channels/\d+/messages$", count=1, retry_after=0.05)
        asked = await w.say("hello")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        [reply] = await w.reply_in(w.thread_of(asked))

        [limited] = [r for r in w.fake.requests if r.status == 429]
        # The same request (same nonce) was sent again after retry_after, and went through.
        [retried] = [
            r for r in w.fake.sent("POST", r"/messages$") if r.json["nonce"] == limited.json["nonce"]
        ]
        assert retried.json["content"] == limited.json["content"] == "queued: next in line"
        assert reply.history[0] == "queued: next in line"
        assert reply.content == "after the rate limit"
        assert w.adapter.client.is_ready() and not w.adapter.client.is_closed()


async def test_deleting_the_question_cancels_its_reply(tmp_path: Path) -> None:
    answer = "a very long and slow answer " * 100
    async with running(tmp_path, replies=[answer, "next"], delay=0.02) as w:
        asked = await w.say("take your time")
        await wait_for(lambda: w.engine.streaming.is_set())
        await w.fake.delete_message(w.channel["id"], asked, guild_id=w.guild["id"])
        await wait_for(lambda: w.bot.worker.running() == 0)
        await w.bot.drain()

        replies = w.fake.bot_messages(w.thread_of(asked))
        shown = "\n".join(r.content for r in replies)
        assert "stopped" in shown.lower()
        assert len(shown) < len(answer) / 2
        key = ConversationKey("discord", w.guild["id"], w.channel["id"], asked)
        job = await w.bot.store.job_for_message(key, asked)
        assert job is not None and job.state == "cancelled"


async def test_stop_command_in_the_thread_cancels_its_reply(tmp_path: Path) -> None:
    answer = "a slow answer that will be stopped " * 100
    async with running(tmp_path, replies=[answer], delay=0.02) as w:
        asked = await w.say("go slowly")
        await wait_for(lambda: w.engine.streaming.is_set())
        thread = w.thread_of(asked)
        token = await w.fake.slash_command("stop", user=w.user, channel_id=thread, guild_id=w.guild["id"])
        await wait_for(lambda: w.fake.interaction_text(token))
        await w.bot.drain()
        shown = "\n".join(m.content for m in w.fake.bot_messages(thread))
        assert "stopped" in shown.lower() and len(shown) < len(answer) / 2
        key = ConversationKey("discord", w.guild["id"], w.channel["id"], thread)
        job = await w.bot.store.job_for_message(key, asked)
        assert job is not None and job.state == "cancelled"


async def test_delete_in_a_thread_is_for_admins_and_erases_it(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["noted"]) as w:
        asked = await w.say("remember my secret: 42")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        thread = w.thread_of(asked)
        await w.reply_in(thread)

        async def delete(**kw: Any) -> str:
            token = await w.fake.slash_command("delete", {"confirm": True}, user=w.user, channel_id=thread,
                                               guild_id=w.guild["id"], **kw)
            return str(await wait_for(lambda: w.fake.interaction_text(token)))

        assert "Only admins" in await delete()
        assert await w.bot.store.message_count() == 2
        assert await delete(permissions=MANAGE_CHANNELS) == "Deleted for good: 2 stored messages of this thread."
        assert await w.bot.store.message_count() == 0
        # The thread goes on, from nothing: a follow-up without a mention is still answered.
        await w.say_in(thread, "what is my secret?")
        await w.reply_in(thread, count=2)
        assert "42" not in w.engine.calls[-1].prompt_text


async def test_a_reply_cut_by_a_restart_is_sent_after_it(tmp_path: Path) -> None:
    async with discord_server() as place:
        async with bot_on(place, tmp_path, replies=["never finished " * 200], delay=0.05) as first:
            asked = await first.say("a question before the restart")
            await wait_for(lambda: first.engine.streaming.is_set())
        thread = asked
        before = [m.content for m in place.fake.bot_messages(thread)]
        assert any("restarting" in c for c in before), before
        first_ids = [m.id for m in place.fake.bot_messages(thread)]

        async with bot_on(place, tmp_path, replies=["Answered after the restart."]) as second:
            assert await second.bot.resume_pending() == 1
            await second.bot.drain()
            assert "a question before the restart" in second.engine.calls[0].prompt_text
            after = [m.content for m in place.fake.bot_messages(thread)]
            assert after[-1] == "Answered after the restart."
            assert not place.fake.bot_messages(place.channel["id"])
            # Issue 9: resumed into the old messages; no stale "restarting" or partial text left.
            assert after == ["Answered after the restart."]
            assert place.fake.bot_messages(thread)[0].id == first_ids[0]


async def test_without_the_content_intent_threads_need_a_mention(tmp_path: Path) -> None:
    async with running(tmp_path, discord={"message_content_intent": False}, replies=["one", "two"]) as w:
        [identify] = [f for f in w.fake.gateway_received if f.get("op") == 2]
        assert not identify["d"]["intents"] & (1 << 15)
        asked = await w.say("first")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        thread = w.thread_of(asked)
        await w.reply_in(thread)
        await w.say_in(thread, "no mention")
        await w.say_in(thread, "with a mention", mention=True)
        await w.reply_in(thread, count=2)
        assert len(w.engine.calls) == 2 and "no mention" not in w.engine.calls[1].prompt_text


async def test_resume_pending_leaves_jobs_of_this_process_alone(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["first answer " * 20, "second answer"], delay=0.01) as w:
        first = await w.say("first")
        await wait_for(lambda: w.engine.streaming.is_set())
        second = await w.say("second")  # queued behind the first (max_batch = 1)
        await wait_for(lambda: [m for m in w.fake.bot_messages(second) if m.content == "queued: 1 ahead"])
        await w.bot.resume_pending()  # what `xwin-bot run` calls once the adapters are up
        await wait_for(lambda: len(w.engine.calls) == 2)
        await w.bot.drain()
        assert [m.content for m in w.fake.bot_messages(first)] == [("first answer " * 20).strip()]
        assert [m.content for m in w.fake.bot_messages(second)] == ["second answer"]


async def test_a_failing_message_tells_one_safe_sentence_and_logs_the_detail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path) as w:
        await w.bot.store.close()  # the database is gone: handling the mention fails
        asked = await w.say("hello")
        await wait_for(lambda: [m for m in w.fake.bot_messages(w.channel["id"]) if m.content == SORRY])
        assert all("store" not in str(body.get("content", "")) for body in content_bodies(w.fake))
    assert f"Discord: message {asked} in channel {w.channel['id']} failed" in caplog.text
    assert "StoreError: the store is not open" in caplog.text  # the detail, with its traceback


# ---------------------------------------------------------------------------- start-up


async def test_missing_permissions_are_one_clear_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path, replies=["a reply that cannot be posted " * 20], delay=0.005) as w:
        w.fake.forbid("POST", r"/threads$")  # no Create Public Threads: answer in place
        w.fake.forbid("POST", r"^/channels/\d+/messages$")  # and no Send Messages either
        await w.say("hello")
        await w.reply_in(w.channel["id"])
        await w.bot.drain()
        assert len(w.engine.calls) == 1  # the job ran to its end regardless
    lines = [r.getMessage() for r in caplog.records if r.name == "adapters.discord"]
    assert len([m for m in lines if "Create Public Threads" in m]) == 1
    assert len([m for m in lines if "Send Messages" in m and "not allowed" in m]) == 1
    assert not [r for r in caplog.records if r.name == "adapters.discord" and r.exc_info]


async def test_commands_sync_to_configured_guilds(tmp_path: Path) -> None:
    async with running(
        tmp_path, discord=lambda guild, general, random: {"command_guilds": [guild["id"]]}
    ) as w:
        [put] = w.fake.sent("PUT", r"/applications/\d+/guilds/\d+/commands$")
        assert put.path.split("/")[4] == w.guild["id"] and put.body[0]["name"] == "xwin"
        assert not w.fake.sent("PUT", r"/applications/\d+/commands$")
        text = await w.command("settings")
        assert "temperature" in text


async def test_identify_heartbeats_and_intents(tmp_path: Path) -> None:
    async with running(tmp_path, fake=FakeDiscord(heartbeat_interval_ms=50)) as w:
        await wait_for(lambda: [f for f in w.fake.gateway_received if f.get("op") == 1])
        [identify] = [f for f in w.fake.gateway_received if f.get("op") == 2]
        assert identify["d"]["token"] == w.fake.token
        assert identify["d"]["intents"] & (1 << 15)  # message content
        assert w.fake.sent("GET", "/users/@me$")


async def test_wrong_token_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"rejected the bot token.*DISCORD_TOKEN"):
        async with running(tmp_path, token="a-wrong-token"):
            pass


async def test_refused_intent_is_one_clear_error(tmp_path: Path) -> None:
    fake = FakeDiscord(refuse_message_content=True)
    with pytest.raises(AdapterError, match="Message Content intent"):
        async with running(tmp_path, fake=fake):
            pass


# ---------------------------------------------------------------------------- `xwin-bot run`


async def run_cli(tmp_path: Path, fake: FakeDiscord, token: str) -> tuple[asyncio.subprocess.Process, Path]:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""[model]
engine = "fake"

[bot]
database = "bot.sqlite3"

[discord]
enabled = true
api_base_url = "{fake.api_base_url}"
gateway_url = "{fake.gateway_url}"
""",
        encoding="utf-8",
    )
    log = tmp_path / "stderr.log"
    env = {**os.environ, "DISCORD_TOKEN": token}
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.main", "run", "--config", str(config),
            cwd=ROOT, env=env, stdout=err, stderr=err,
        )  # fmt: skip
    return process, log


def answered(fake: FakeDiscord, text: str) -> list[FakeMessage]:
    """The bot's messages with ``text`` in the threads it opened."""
    threads = [r.path.split("/")[4] for r in fake.sent("POST", "/threads$")]
    return [m for t in threads for m in fake.bot_messages(t) if m.content == text]


async def mention_and_wait(place: Place) -> list[FakeMessage]:
    """Mention the bot; return the bot's messages in the thread once it has answered."""
    fake = place.fake
    text = f"<@{fake.bot_user['id']}> hi"
    user = fake.user("aki")
    asked = await fake.user_message(
        place.channel["id"], text, user, mentions=[fake.bot_user], guild_id=place.guild["id"]
    )
    await wait_for(lambda: answered(fake, "Hello from the fake engine."), within=30)
    return fake.bot_messages(asked)


async def test_xwin_bot_run_serves_discord_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with discord_server() as place:
        process, log = await run_cli(tmp_path, place.fake, place.fake.token)
        try:
            await wait_for(lambda: "running; Ctrl-C" in log.read_text(), within=60)
            [reply] = await mention_and_wait(place)
            assert reply.history[0] == "queued: next in line"  # the placeholder became the reply
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()


async def test_xwin_bot_run_with_a_wrong_token_says_so_in_one_line(tmp_path: Path) -> None:
    async with discord_server() as place:
        process, log = await run_cli(tmp_path, place.fake, "a-wrong-token")
        code = await asyncio.wait_for(process.wait(), 60)
        text = log.read_text()
        assert code == 1, text
        assert "Traceback" not in text
        errors = [line for line in text.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "DISCORD_TOKEN" in errors[0], text
        assert "a-wrong-token" not in text


# ---------------------------------------------------------------------------- the embedded model


@pytest.mark.model
async def test_embedded_model_answers_a_mention_in_its_thread(tmp_path: Path) -> None:
    async with running(tmp_path, embedded=True) as w:
        asked = await w.say("What is the capital of France?")
        thread = w.thread_of(await wait_for(lambda: w.fake.sent("POST", "/threads$") and asked, within=60))
        answer = await stored_reply(w.bot, within=300)
        # The last edit reaches Discord: the thread's one bot message is the stored reply.
        await wait_for(lambda: [m.content for m in w.fake.bot_messages(thread)] == [answer], within=30)
    assert answer.strip()
    for leak in ("<s>", "</s>", "USER:", "ASSISTANT:", "\ufffd", "<|im_start|>", "<|im_end|>"):
        assert leak not in answer
    assert all(body.get("allowed_mentions", {}).get("parse") == [] for body in content_bodies(w.fake))


async def stored_reply(bot: Bot, *, within: float) -> str:
    """The assistant turn the worker stored, once there is one."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        async with bot.store.db.execute("SELECT text FROM messages WHERE role = 'assistant'") as cur:
            row = await cur.fetchone()
        if row is not None:
            return str(row[0])
        await asyncio.sleep(0.2)
    raise AssertionError("the model's reply was never stored")


async def test_the_final_reply_arrives_through_a_429_storm_on_edits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9: every edit of the reply is rate limited; the final text is posted anew."""
    from adapters.discord import DiscordSink

    monkeypatch.setattr(DiscordSink, "final_retry_delays", (0.01, 0.01))
    async with running(tmp_path, replies=["the answer that must arrive"]) as w:
        w.fake.rate_limit("PATCH", r"^/channels/\d+/messages/\d+$", count=10_000, retry_after=0.001)
        asked = await w.say("hello")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        replies = await w.reply_in(w.thread_of(asked))
        assert [m.content for m in replies] == ["the answer that must arrive"]  # placeholder gone
        assert not w.fake.sent("PATCH", r"/messages/\d+$")  # no edit went through
        job = await w.bot.store.job(1)
        assert job is not None and job.state == "done"


async def test_a_final_reply_that_cannot_be_shown_leaves_the_job_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.discord import DiscordSink

    monkeypatch.setattr(DiscordSink, "final_retry_delays", (0.01,))
    async with running(tmp_path, replies=["an answer no one will see"], delay=0.05) as w:
        asked = await w.say("hello")
        await wait_for(lambda: w.engine.streaming.is_set())  # the placeholder is up
        thread = w.thread_of(asked)
        w.fake.rate_limit("PATCH", r"^/channels/\d+/messages/\d+$", count=10_000, retry_after=0.001)
        w.fake.rate_limit("POST", r"^/channels/\d+/messages$", count=10_000, retry_after=0.001)
        await w.reply_in(thread)
        job = await w.bot.store.job(1)
        assert job is not None and job.state == "failed" and "not delivered" in str(
            await _job_error(w, 1)
        )
        assert await w.bot.store.message_count() == 1  # the undelivered reply is not history


async def _job_error(w: World, job_id: int) -> str | None:
    async with w.bot.store.db.execute("SELECT error FROM jobs WHERE id = ?", (job_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


async def test_shutdown_is_bounded_when_discord_stalls(tmp_path: Path) -> None:
    """Issue 9: Discord answers nothing while the bot stops; it stops anyway, the job stays queued."""
    async with discord_server() as place:
        async with bot_on(place, tmp_path, replies=["never finished " * 200], delay=0.02) as w:
            asked = await w.say("a question before the stop")
            await wait_for(lambda: w.engine.streaming.is_set())
            w.fake.stall("PATCH", r"^/channels/\d+/messages/\d+$")
            w.fake.stall("POST", r"^/channels/\d+/messages$")
            w.bot.worker.last_words = 0.2
            started = time.monotonic()
            await asyncio.wait_for(w.bot.close(grace=0.05), timeout=10)
            assert time.monotonic() - started < 2.0
            key = ConversationKey("discord", w.guild["id"], w.channel["id"], w.thread_of(asked))
            job = await w.bot.store.job_for_message(key, asked)
            assert job is not None and job.state == "queued"


# ---------------------------------------------------------------------------- buttons (issue 11)

CUT = "The first part of a long answer"  # as long as max_new_tokens: cut there


async def test_continue_button_extends_the_cut_reply_in_place(tmp_path: Path) -> None:
    cut = {"max_new_tokens": len(CUT)}
    async with running(tmp_path, replies=[CUT, ", and its end."], generation=cut) as w:
        asked = await w.say("Tell me everything.")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        thread = w.thread_of(asked)
        [reply] = await w.reply_in(thread)
        ids = reply.custom_ids()
        assert [i.split(":")[1] for i in ids] == ["continue", "regenerate", "up", "down"]

        token = await w.fake.click(reply.id, ids[0], user=w.user, guild_id=w.guild["id"])
        assert await wait_for(lambda: w.fake.interaction_text(token)) == "Continuing…"
        assert w.fake.interaction_replies(token)[0].json["type"] == 5  # deferred at once
        await wait_for(lambda: len(w.engine.calls) == 2 and w.bot.worker.running() == 0)
        await w.bot.drain()
        [same] = await wait_for(lambda: [m for m in w.fake.bot_messages(thread) if m.custom_ids()])
        assert same.id == reply.id and same.content == f"{CUT}, and its end."
        assert [i.split(":")[1] for i in same.custom_ids()] == ["regenerate", "up", "down"]
        assert w.engine.calls[1].prompt_text.endswith(f"Tell me everything. ASSISTANT: {CUT}")
        reply_id = int(ids[0].rsplit(":", 1)[1])
        row = await w.bot.store.reply(reply_id)
        assert row is not None and row.text == f"{CUT}, and its end."
        assert await w.bot.store.message_count() == 2  # one question, one reply


async def test_xwin_continue_in_the_thread_extends_the_cut_reply_in_place_then_refuses(tmp_path: Path) -> None:
    cut = {"max_new_tokens": len(CUT)}
    async with running(tmp_path, replies=[CUT, ", and its end."], generation=cut) as w:
        asked = await w.say("Tell me everything.")
        await wait_for(lambda: w.fake.sent("POST", "/threads$"))
        thread = w.thread_of(asked)
        [reply] = await w.reply_in(thread)

        async def xwin_continue() -> str:
            token = await w.fake.slash_command("continue", user=w.user, channel_id=thread,
                                               guild_id=w.guild["id"])
            text = str(await wait_for(lambda: w.fake.interaction_text(token) or None))
            assert w.fake.interaction_replies(token)[0].json["type"] == 5  # deferred at once
            return text

        assert await xwin_continue() == "Continuing…"
        await wait_for(lambda: len(w.engine.calls) == 2 and w.bot.worker.running() == 0)
        await w.bot.drain()
        [same] = w.fake.bot_messages(thread)
        assert same.id == reply.id and same.content == f"{CUT}, and its end."
        assert [i.split(":")[1] for i in same.custom_ids()] == ["regenerate", "up", "down"]
        assert w.engine.calls[1].prompt_text.endswith(f"Tell me everything. ASSISTANT: {CUT}")
        key = ConversationKey("discord", w.guild["id"], w.channel["id"], thread)
        reply_id = await w.bot.store.last_reply_id(key)
        row = None if reply_id is None else await w.bot.store.reply(reply_id)
        assert row is not None and row.text == f"{CUT}, and its end."
        assert await w.bot.store.message_count() == 2  # one question, one reply

        assert await xwin_continue() == "That reply is complete: there is nothing to continue."
        assert len(w.engine.calls) == 2


async def test_xwin_continue_in_a_dm_whose_reply_message_is_gone_continues_in_a_new_one(tmp_path: Path) -> None:
    cut = {"max_new_tokens": len(CUT)}
    async with running(tmp_path, replies=[CUT, ", and its end."], generation=cut) as w:
        dm = w.fake.snowflake()
        await w.fake.user_message(dm, "Tell me everything.", w.user)
        [reply] = await w.reply_in(dm)
        await w.fake.delete_message(dm, reply.id)
        token = await w.fake.slash_command("continue", user=w.user, channel_id=dm)
        assert await wait_for(lambda: w.fake.interaction_text(token) or None) == "Continuing…"
        [new] = await w.reply_in(dm, count=2)
        assert new.id != reply.id and new.content == f"{CUT}, and its end."
        assert [i.split(":")[1] for i in new.custom_ids()] == ["regenerate", "up", "down"]


async def test_buttons_work_after_a_restart_and_refuse_a_stranger(tmp_path: Path) -> None:
    async with discord_server() as place:
        async with bot_on(place, tmp_path, replies=["Red."]) as w:
            asker = w.user
            asked = await w.say("Name a colour.")
            await wait_for(lambda: w.fake.sent("POST", "/threads$"))
            thread = w.thread_of(asked)
            [reply] = await w.reply_in(thread)
            regenerate, up = reply.custom_ids()[0], reply.custom_ids()[1]
        # A new process on the same SQLite file: nothing in memory.
        async with bot_on(place, tmp_path, replies=["Blue.", "Green."]) as w:
            stranger = w.fake.user("mika")
            token = await w.fake.click(reply.id, regenerate, user=stranger, guild_id=w.guild["id"])
            assert "Only the person who asked" in await wait_for(lambda: w.fake.interaction_text(token))

            votes = [await w.fake.click(reply.id, up, user=asker, guild_id=w.guild["id"]) for _ in range(2)]
            texts = [await wait_for(lambda t=t: w.fake.interaction_text(t)) for t in votes]
            assert texts == ["Thanks for the feedback.", "Your feedback was already recorded."]
            assert len(await w.bot.store.feedback_rows()) == 1

            token = await w.fake.click(reply.id, regenerate, user=asker, guild_id=w.guild["id"])
            await wait_for(lambda: w.fake.interaction_text(token))
            messages = await w.reply_in(thread)
            assert [m.content for m in messages] == ["Red.", "Blue."]
            assert "Red." not in w.engine.calls[0].prompt_text

            await w.say_in(thread, "Another one?")
            await w.reply_in(thread, count=2)
            prompt = w.engine.calls[1].prompt_text
            assert "ASSISTANT: Blue.</s>" in prompt and "Red." not in prompt


async def test_feedback_in_a_dm_is_stored_and_can_change(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["Hi there!"]) as w:
        dm = w.fake.snowflake()
        await w.fake.user_message(dm, "hello bot", w.user)
        [reply] = await w.reply_in(dm)
        down, up = reply.custom_ids()[-1], reply.custom_ids()[-2]
        texts = []
        for button in (down, up):
            token = await w.fake.click(reply.id, button, user=w.user)
            texts.append(await wait_for(lambda t=token: w.fake.interaction_text(t)))
        assert texts == ["Thanks for the feedback.", "Your feedback was changed."]
        assert [(u, v) for _, u, v, _ in await w.bot.store.feedback_rows()] == [(w.user["id"], 1)]


async def test_a_continue_resumed_after_a_restart_edits_the_same_message(tmp_path: Path) -> None:
    async with running(tmp_path, replies=["Short."]) as w:
        dm = w.fake.snowflake()
        await w.fake.user_message(dm, "hello bot", w.user)
        [reply] = await w.reply_in(dm)
        key = ConversationKey("discord", "dm", dm, "")
        edits_before = len(reply.history)
        # What the job row keeps for a Continue; the sink factory re-creates its sink from it.
        sink = w.adapter.sink_for(key, {"channel_id": dm, "edit_message_id": reply.id, "skip": "0"})
        await sink.queued(0)  # no placeholder over the reply's text
        await sink.started()
        assert isinstance(sink, DiscordSink)
        await sink.reply_stored(ReplyInfo(7, False))
        await sink.finish("Short. And now longer.")
        [same] = w.fake.bot_messages(dm)
        assert same.id == reply.id and same.content == "Short. And now longer."
        assert same.custom_ids() == ["xwin:regenerate:7", "xwin:up:7", "xwin:down:7"]
        assert same.history[edits_before:] == ["Short."]  # one edit: no placeholder over the text
