"""The Slack adapter end to end: the real slack-bolt app against a fake Slack.

Every test asserts on what the bot sent to the fake (Web API calls, Socket
Mode acks, response_url posts) and on what the fake engine was asked.
Nothing sleeps for a fixed time: waits poll with a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.slack import DM_SCOPE, MESSAGE_LIMIT, OPTIONAL_SCOPES, REQUIRED_SCOPES, SlackAdapter, panel_command
from adapters.slack_format import escape
from adapters.strings import SORRY
from bot.app import Bot
from bot.config import BotConfig, Config, GenerationConfig, Secrets, SlackConfig
from bot.engine.fake import FakeEngine
from bot.errors import AdapterError
from bot.store import Store
from bot.types import ConversationKey
from tests.fakes.slack_server import (
    FakeSlack,
    block_action,
    command_body,
    command_form,
    event_body,
    form_body,
    poll,
    signed_headers,
)

SECRET = "test-signing-secret"
ROOT = Path(__file__).resolve().parent.parent
JSON = dict[str, Any]


@dataclass
class Env:
    fake: FakeSlack
    engine: FakeEngine
    bot: Bot
    adapter: SlackAdapter

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.adapter.http_port}/slack/events"

    def thread_texts(self, channel: str, thread_ts: str | None) -> list[str]:
        """Latest text of each message the bot posted there, in posting order."""
        latest = self.fake.message_texts()
        return [
            latest[p["_ts"]]
            for p in self.fake.posted()
            if p.get("channel") == channel and p.get("thread_ts") == thread_ts and p.get("_ts") in latest
        ]


Starter = Callable[..., Awaitable[Env]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = FakeSlack()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def start_env(tmp_path: Path, fake: FakeSlack) -> AsyncIterator[Starter]:
    """Builds store, bot and adapter (HTTP or Socket Mode) against the fake."""
    started: list[tuple[SlackAdapter, Bot, Store]] = []

    async def start(
        engine: FakeEngine | None = None,
        *,
        mode: str = "http",
        stream_interval: float = 0.2,
        bot_token: str = "",
        app_token: str = "",
        generation: GenerationConfig | None = None,
        **slack: Any,
    ) -> Env:
        engine = engine or FakeEngine()
        slack_cfg = SlackConfig(
            enabled=True,
            mode=mode,
            http_port=0,  # type: ignore[arg-type]
            api_base_url=fake.api_base_url,
            admin_users=("UADMIN",),
            **slack,
        )
        bot_cfg = BotConfig(database=str(tmp_path / "bot.sqlite3"), stream_interval=stream_interval)
        config = Config(bot=bot_cfg, slack=slack_cfg, generation=generation or GenerationConfig())
        store = Store(config.database_path())
        await store.open()
        bot = Bot(config, store, engine)
        await bot.start()
        secrets = Secrets(
            slack_bot_token=bot_token or fake.bot_token,
            slack_app_token=app_token or fake.app_token,
            slack_signing_secret=SECRET,
        )
        adapter = SlackAdapter(bot, slack_cfg, secrets, file_origins=(fake.base,))
        started.append((adapter, bot, store))
        await adapter.start()
        return Env(fake, engine, bot, adapter)

    yield start
    for adapter, bot, store in reversed(started):
        await adapter.close()
        await bot.close()
        await store.close()


def mention(
    text: str,
    *,
    ts: str,
    thread_ts: str | None = None,
    channel: str = "C1",
    user: str = "U1",
    team: str = "T1",
) -> JSON:
    event: JSON = {
        "type": "app_mention",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "team": team,
        "event_ts": ts,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def message(
    text: str,
    *,
    ts: str,
    channel: str,
    user: str = "U1",
    thread_ts: str | None = None,
    channel_type: str = "channel",
    **extra: Any,
) -> JSON:
    event: JSON = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "channel_type": channel_type,
        "team": "T1",
        "event_ts": ts,
        **extra,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


async def post_signed(
    env: Env,
    body: bytes,
    *,
    content_type: str = "application/json",
    secret: str = SECRET,
    timestamp: int | None = None,
    extra: dict[str, str] | None = None,
    send: bytes | None = None,
) -> int:
    """POST ``send`` (default ``body``) signed over ``body``; returns the status."""
    headers = {
        "Content-Type": content_type,
        **signed_headers(secret, body, timestamp=timestamp),
        **(extra or {}),
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(env.url, data=send if send is not None else body, headers=headers) as resp,
    ):
        return resp.status


async def post_event(
    env: Env, event: JSON, *, event_id: str | None = None, extra: dict[str, str] | None = None
) -> int:
    body = json.dumps(event_body(event, event_id=event_id)).encode()
    return await post_signed(env, body, extra=extra)


async def post_command(env: Env, text: str, *, user: str = "UADMIN", channel: str = "C1") -> JSON:
    """Sends ``/xwin <text>``; returns what the bot posted to the response_url."""
    url = env.fake.response_url()
    body = command_body(text=text, user_id=user, channel_id=channel, response_url=url)
    status = await post_signed(env, body, content_type="application/x-www-form-urlencoded")
    assert status == 200
    rid = url.rsplit("/", 1)[1]
    await poll(lambda: any(r["_rid"] == rid for r in env.fake.responses), what="/xwin response")
    return next(r for r in env.fake.responses if r["_rid"] == rid)


async def wait_reply(env: Env, channel: str, thread_ts: str | None, final: str) -> list[str]:
    """Waits until the bot's messages there end with ``final``; returns their texts."""
    await poll(
        lambda: "".join(env.thread_texts(channel, thread_ts)).endswith(final),
        what=f"reply ending {final!r} in {channel}/{thread_ts}",
    )
    return env.thread_texts(channel, thread_ts)


def all_sent_text(fake: FakeSlack) -> str:
    sent = [str(c.params.get("text", "")) for c in fake.calls if c.method.startswith("chat.")]
    return "\n".join(sent + [str(r.get("text", "")) for r in fake.responses])


# ---------------------------------------------------------------- HTTP mode


async def test_http_mention_answered_in_thread_and_escaped(start_env: Starter) -> None:
    engine = FakeEngine(
        replies=["Hi **Aki**! <!channel> <!here> <!everyone> <@U2> @here & [docs](https://x.y)"]
    )
    env = await start_env(engine)
    status = await post_event(env, mention("<@UBOT> hello <#C2|random>, ask <@U2>", ts="100.000001"))
    assert status == 200
    texts = await wait_reply(env, "C1", "100.000001", "<https://x.y|docs>")
    assert texts == [
        "Hi *Aki*! &lt;!channel&gt; &lt;!here&gt; &lt;!everyone&gt; &lt;@U2&gt; @here &amp; "
        "<https://x.y|docs>"
    ]
    sent = all_sent_text(env.fake)
    for live in ("<!channel>", "<!here>", "<!everyone>", "<@U2>"):
        assert live not in sent
    assert not any(c.params.get("link_names") in (True, 1, "1", "true") for c in env.fake.calls)
    # The model saw readable text: no bot mention, names instead of ids.
    assert "aki: hello #random, ask @ben" in engine.calls[0].prompt_text
    assert "UBOT" not in engine.calls[0].prompt_text


async def test_http_mention_inside_a_thread_answers_in_that_thread(start_env: Starter) -> None:
    env = await start_env(FakeEngine(replies=["threaded"]))
    assert await post_event(env, mention("<@UBOT> hi", ts="210.000002", thread_ts="200.000001")) == 200
    await wait_reply(env, "C1", "200.000001", "threaded")
    assert env.thread_texts("C1", "210.000002") == []


async def test_http_dm_answered_in_the_dm(start_env: Starter) -> None:
    engine = FakeEngine(replies=["dm answer"])
    env = await start_env(engine)
    assert (
        await post_event(env, message("hello in private", ts="300.000001", channel="D1", channel_type="im"))
        == 200
    )
    await wait_reply(env, "D1", None, "dm answer")
    assert "USER: hello in private" in engine.calls[0].prompt_text  # no name prefix in a DM


async def test_http_dm_follow_up_continues_the_dm(start_env: Starter) -> None:
    engine = FakeEngine(replies=["first answer", "second answer"])
    env = await start_env(engine)
    await post_event(env, message("first question", ts="310.000001", channel="D1", channel_type="im"))
    await wait_reply(env, "D1", None, "first answer")
    await post_event(env, message("second question", ts="311.000001", channel="D1", channel_type="im"))
    await wait_reply(env, "D1", None, "second answer")
    prompt = engine.calls[1].prompt_text
    assert prompt.index("first question") < prompt.index("first answer") < prompt.index("second question")


@pytest.mark.parametrize("case", ["wrong secret", "tampered body", "stale timestamp", "unsigned"])
async def test_http_bad_signatures_get_401_and_no_work(start_env: Starter, case: str) -> None:
    engine = FakeEngine(replies=["answer"])
    env = await start_env(engine)
    body = json.dumps(event_body(mention("<@UBOT> evil", ts="400.000001"))).encode()
    if case == "wrong secret":
        status = await post_signed(env, body, secret="not-the-secret")
    elif case == "tampered body":
        status = await post_signed(env, body, send=body.replace(b"evil", b"EVIL"))
    elif case == "stale timestamp":
        status = await post_signed(env, body, timestamp=int(time.time()) - 600)
    else:
        async with aiohttp.ClientSession() as session, session.post(env.url, data=body) as resp:
            status = resp.status
    assert status == 401
    # A good request afterwards is answered; the bad one never was.
    assert await post_event(env, mention("<@UBOT> fine", ts="401.000001")) == 200
    await wait_reply(env, "C1", "401.000001", "answer")
    assert len(engine.calls) == 1
    assert "fine" in engine.calls[0].prompt_text and "evil" not in engine.calls[0].prompt_text.lower()
    assert env.thread_texts("C1", "400.000001") == []


async def test_http_url_verification_is_answered(start_env: Starter) -> None:
    env = await start_env()
    body = json.dumps({"token": "t", "challenge": "c-123", "type": "url_verification"}).encode()
    headers = {"Content-Type": "application/json", **signed_headers(SECRET, body)}
    async with aiohttp.ClientSession() as session, session.post(env.url, data=body, headers=headers) as resp:
        assert resp.status == 200
        assert "c-123" in await resp.text()


async def test_http_retried_event_is_answered_once(start_env: Starter) -> None:
    engine = FakeEngine(replies=["only once"])
    env = await start_env(engine)
    event = mention("<@UBOT> retry me", ts="500.000001")
    assert await post_event(env, event, event_id="EvRETRY1") == 200
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    assert await post_event(env, event, event_id="EvRETRY1", extra=retry) == 200
    await wait_reply(env, "C1", "500.000001", "only once")
    # Re-delivered under another event id (as after a restart): the store knows the message.
    assert await post_event(env, event, event_id="EvRETRY2", extra=retry) == 200
    # A later message is answered, and the retry still was not.
    assert await post_event(env, mention("<@UBOT> next", ts="501.000001")) == 200
    await wait_reply(env, "C1", "501.000001", "only once")
    assert len(engine.calls) == 2
    assert len(env.thread_texts("C1", "500.000001")) == 1


async def test_http_edits_are_throttled(start_env: Starter) -> None:
    words = " ".join(f"w{i}" for i in range(120))
    engine = FakeEngine(replies=[words], piece_chars=4, delay=0.02)  # about 2 s of streaming
    env = await start_env(engine, stream_interval=0.5)
    await post_event(env, mention("<@UBOT> talk", ts="600.000001"))
    await wait_reply(env, "C1", "600.000001", words)
    edits = [c for c in env.fake.calls_to("chat.update") if not str(c.params["text"]).startswith("_")]
    assert 2 <= len(edits) <= 8, [c.params["text"][-10:] for c in edits]
    streamed = edits[:-1]  # the last edit is finish(), which may come at any time
    gaps = [b.at - a.at for a, b in itertools.pairwise(streamed)]
    assert all(gap >= 0.4 for gap in gaps), gaps


async def test_http_command_set_top_p_out_of_range_names_the_range(start_env: Starter) -> None:
    env = await start_env()
    reply = await post_command(env, "set top_p 2")
    assert reply["response_type"] == "ephemeral"
    assert "top_p" in reply["text"] and "(0, 1]" in reply["text"]
    settings = await post_command(env, "settings")
    assert "top_p = 0.95" in settings["text"]


async def test_http_command_only_admins_change_channel_settings(start_env: Starter) -> None:
    env = await start_env()
    await post_command(env, "set temperature 0.7", user="U1")
    assert "temperature = 0.7" not in (await post_command(env, "settings", user="U1"))["text"]
    await post_command(env, "set temperature 0.7", user="UADMIN")
    assert "temperature = 0.7" in (await post_command(env, "settings", user="U1"))["text"]


async def test_http_command_in_a_dm_changes_the_users_own_settings(start_env: Starter) -> None:
    env = await start_env()
    await post_command(env, "set top_k 5", user="U1", channel="D1")
    assert "top_k = 5" in (await post_command(env, "settings", user="U1", channel="D1"))["text"]
    assert "top_k = 5" not in (await post_command(env, "settings", user="U2", channel="D2"))["text"]


async def test_http_ignores_bots_edits_own_messages_and_other_channels(start_env: Starter) -> None:
    engine = FakeEngine(replies=["answer"])
    env = await start_env(engine, channels=("C1",))
    ignored = [
        mention("<@UBOT> from elsewhere", ts="700.000001", channel="C2"),
        message("bot talk", ts="700.000002", channel="D1", channel_type="im", bot_id="B9"),
        message("mine", ts="700.000003", channel="D1", channel_type="im", user="UBOT"),
        message("edited", ts="700.000004", channel="D1", channel_type="im", subtype="message_changed"),
        message("no thread, no mention", ts="700.000005", channel="C1"),
    ]
    for event in ignored:
        assert await post_event(env, event) == 200
    await post_event(env, mention("<@UBOT> allowed", ts="701.000001"))
    await wait_reply(env, "C1", "701.000001", "answer")
    assert len(engine.calls) == 1
    assert "allowed" in engine.calls[0].prompt_text
    assert {p["channel"] for p in env.fake.posted()} == {"C1"}


async def test_http_empty_mention_gets_one_line_help(start_env: Starter) -> None:
    engine = FakeEngine()
    env = await start_env(engine)
    await post_event(env, mention("<@UBOT>   ", ts="800.000001"))
    await poll(lambda: bool(env.thread_texts("C1", "800.000001")), what="help")
    [help_text] = env.thread_texts("C1", "800.000001")
    assert "/xwin" in help_text and "\n" not in help_text
    assert engine.calls == []


async def test_http_deleting_the_question_cancels_its_reply(start_env: Starter) -> None:
    long_reply = "word " * 400
    engine = FakeEngine(replies=[long_reply], piece_chars=1, delay=0.01)  # ~20 s if not stopped
    env = await start_env(engine)
    await post_event(env, mention("<@UBOT> long please", ts="900.000001"))
    await poll(lambda: engine.streaming.is_set(), what="streaming")
    deleted = message(
        "",
        ts="900.000002",
        channel="C1",
        subtype="message_deleted",
        previous_message={"type": "message", "user": "U1", "ts": "900.000001", "text": "<@UBOT> long please"},
    )
    deleted.pop("user")
    assert await post_event(env, deleted) == 200
    await poll(
        lambda: "stopped" in "".join(env.thread_texts("C1", "900.000001")).lower(),
        within=10,
        what="the stopped reply",
    )
    assert long_reply.strip() not in "".join(env.thread_texts("C1", "900.000001"))


async def test_http_engine_error_text_never_reaches_the_channel(
    start_env: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    leaky = RuntimeError("CUDA error at /home/ops/xwin/.env token=xoxb-1234-SECRET-5678")
    env = await start_env(FakeEngine(replies=[leaky]))
    assert await post_event(env, mention("<@UBOT> hi", ts="950.000001")) == 200
    texts = await wait_reply(env, "C1", "950.000001", "Try again in a moment.")
    assert "the model failed while writing the reply" in texts[-1]
    sent = all_sent_text(env.fake)
    assert "SECRET" not in sent and "/home/ops" not in sent and "RuntimeError" not in sent
    assert "xoxb-1234-SECRET-5678" in caplog.text


async def test_http_a_failing_event_tells_one_safe_sentence_and_logs_the_detail(
    start_env: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    env = await start_env()
    await env.bot.store.close()  # the database is gone: handling the mention fails
    assert await post_event(env, mention("<@UBOT> hi", ts="960.000001")) == 200
    texts = await wait_reply(env, "C1", "960.000001", SORRY)
    assert texts == [SORRY] and "store" not in all_sent_text(env.fake)
    await poll(lambda: "slack: message 960.000001 in C1 failed" in caplog.text, what="the log line")
    assert "StoreError: the store is not open" in caplog.text  # the detail, with its traceback


# ---------------------------------------------------------------- Socket Mode


def socket_event(event: JSON, event_id: str | None = None) -> JSON:
    return event_body(event, event_id=event_id)


async def test_socket_mode_acks_replies_retries_and_thread_follow_up(start_env: Starter) -> None:
    engine = FakeEngine(replies=["Paris is the capital.", "About 2.1 million people."])
    env = await start_env(engine, mode="socket")
    fake = env.fake
    assert fake.calls_to("apps.connections.open")[0].token == fake.app_token
    await fake.wait_connected()

    first = socket_event(mention("<@UBOT> capital of France?", ts="1000.000001"), event_id="EvS1")
    env1 = await fake.send_envelope(first)
    await poll(lambda: fake.acked(env1), what="ack of the mention")
    await wait_reply(env, "C1", "1000.000001", "Paris is the capital.")

    retry = await fake.send_envelope(first, retry_attempt=1)  # same event_id
    await poll(lambda: fake.acked(retry), what="ack of the retry")

    follow = socket_event(
        message(
            "how many people live there?", ts="1000.000005", channel="C1", thread_ts="1000.000001", user="U2"
        )
    )
    env2 = await fake.send_envelope(follow)
    await poll(lambda: fake.acked(env2), what="ack of the follow-up")
    texts = await wait_reply(env, "C1", "1000.000001", "About 2.1 million people.")

    assert texts == ["Paris is the capital.", "About 2.1 million people."]  # retry not answered
    assert len(engine.calls) == 2
    prompt = engine.calls[1].prompt_text
    assert prompt.index("aki: capital of France?") < prompt.index("Paris is the capital.")
    assert prompt.index("Paris is the capital.") < prompt.index("ben: how many people live there?")


async def test_socket_mode_long_reply_arrives_as_several_messages(start_env: Starter) -> None:
    para = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 30
    code = "```python\n" + "\n".join(f"print({i} < {i + 1})" for i in range(150)) + "\n```"
    reply = "\n\n".join([para, code, para, para])
    engine = FakeEngine(replies=[reply], piece_chars=400)
    env = await start_env(engine, mode="socket")
    await env.fake.send_envelope(socket_event(mention("<@UBOT> essay", ts="1100.000001")))
    texts = await wait_reply(env, "C1", "1100.000001", para.strip())
    assert len(texts) >= 3
    assert all(len(t) <= MESSAGE_LIMIT for t in texts)
    assert all(t.count("```") % 2 == 0 for t in texts)  # every code block closed where cut
    joined = "\n".join(texts)
    for i in (0, 75, 149):
        assert f"print({i} &lt; {i + 1})" in joined


async def test_socket_mode_slash_command_is_acked_and_answered(start_env: Starter) -> None:
    env = await start_env(mode="socket")
    url = env.fake.response_url()
    form = command_form("set top_p 2", user_id="UADMIN", channel_id="C1", response_url=url)
    envelope = await env.fake.send_envelope(form, kind="slash_commands")
    await poll(lambda: env.fake.acked(envelope), what="ack of /xwin")
    await poll(lambda: bool(env.fake.responses), what="/xwin response")
    assert "(0, 1]" in env.fake.responses[0]["text"]
    assert env.fake.responses[0]["response_type"] == "ephemeral"


# ---------------------------------------------------------------- the assistant panel


def panel_started(thread_ts: str, *, channel: str = "D1", user: str = "U1") -> JSON:
    """``assistant_thread_started``: the user opened a new chat in the panel."""
    thread = {
        "user_id": user,
        "context": {"channel_id": "C1", "team_id": "T1", "enterprise_id": None},
        "channel_id": channel,
        "thread_ts": thread_ts,
    }
    return {"type": "assistant_thread_started", "assistant_thread": thread, "event_ts": thread_ts}


def panel_message(text: str, *, ts: str, thread_ts: str, channel: str = "D1", user: str = "U1") -> JSON:
    return message(text, ts=ts, channel=channel, thread_ts=thread_ts, channel_type="im", user=user,
                   parent_user_id="UBOT")


def thread_calls(fake: FakeSlack, method: str, thread_ts: str) -> list[JSON]:
    return [c.params for c in fake.calls_to(method) if c.params.get("thread_ts") == thread_ts]


async def wait_panel_reply(env: Env, thread_ts: str, final: str, channel: str = "D1") -> list[str]:
    """Waits until the bot's messages there end with ``final`` and no stream is open."""
    await poll(lambda: "".join(env.fake.thread(channel, thread_ts)).endswith(final),
               what=f"panel reply ending {final!r} in {thread_ts}")
    await poll(lambda: not any(m["streaming"] for m in env.fake.messages.values()), what="streams stopped")
    return env.fake.thread(channel, thread_ts)


async def test_panel_thread_is_greeted_with_prompts_once_and_its_context_only_recorded(
    start_env: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="adapters.slack")
    env = await start_env(
        assistant_greeting="Hello! Ask **anything**.",
        suggested_prompts=("Explain | Explain TLS simply.", "Write a haiku about tea."),
    )
    started = panel_started("2000.000001")
    assert await post_event(env, started, event_id="EvPANEL1") == 200
    await poll(lambda: bool(env.fake.calls_to("assistant.threads.setSuggestedPrompts")), what="prompts")
    assert env.fake.thread("D1", "2000.000001") == ["Hello! Ask *anything*."]
    [prompts] = [c.params for c in env.fake.calls_to("assistant.threads.setSuggestedPrompts")]
    assert (prompts["channel_id"], prompts["thread_ts"]) == ("D1", "2000.000001")
    assert prompts["prompts"] == [
        {"title": "Explain", "message": "Explain TLS simply."},
        {"title": "Write a haiku about tea.", "message": "Write a haiku about tea."},
    ]
    # A retry of the same event greets nobody twice.
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    assert await post_event(env, started, event_id="EvPANEL1", extra=retry) == 200
    # The user switches channels: recorded, nothing read from Slack, nothing said.
    calls_before = len(env.fake.calls)
    changed = panel_started("2000.000001")
    changed["type"] = "assistant_thread_context_changed"
    changed["assistant_thread"]["context"]["channel_id"] = "C2"
    assert await post_event(env, changed) == 200
    await poll(lambda: "now shows C2" in caplog.text, what="the context recorded")
    assert len(env.fake.calls) == calls_before
    assert len(env.fake.calls_to("assistant.threads.setSuggestedPrompts")) == 1
    assert env.fake.thread("D1", "2000.000001") == ["Hello! Ask *anything*."]


async def test_panel_threads_of_one_user_are_separate_conversations(start_env: Starter) -> None:
    engine = FakeEngine(replies=["Nice to meet you.", "I don't know your name.", "You are Aki."])
    env = await start_env(engine)
    a, b = "2100.000001", "2200.000001"
    await post_event(env, panel_message("My name is Aki", ts="2100.000002", thread_ts=a))
    await wait_panel_reply(env, a, "Nice to meet you.")
    await post_event(env, panel_message("What is my name?", ts="2200.000002", thread_ts=b))
    await wait_panel_reply(env, b, "I don't know your name.")
    await post_event(env, panel_message("And now?", ts="2100.000003", thread_ts=a))
    await wait_panel_reply(env, a, "You are Aki.")

    assert "My name is Aki" not in engine.calls[1].prompt_text  # thread b knows nothing of a
    assert "My name is Aki" in engine.calls[2].prompt_text
    assert "What is my name?" not in engine.calls[2].prompt_text
    assert env.fake.thread("D1", a) == ["Nice to meet you.", "You are Aki."]
    assert env.fake.thread("D1", b) == ["I don't know your name."]
    assert env.fake.thread("D1", None) == []  # nothing at the top of the DM
    # The title is each thread's first question, set once; the status shows in each thread.
    titles = [(c.params["thread_ts"], c.params["title"]) for c in env.fake.calls_to("assistant.threads.setTitle")]
    assert titles == [(a, "My name is Aki"), (b, "What is my name?")]
    for thread in (a, b):
        statuses = [c["status"] for c in thread_calls(env.fake, "assistant.threads.setStatus", thread)]
        assert statuses and all(s.startswith("is ") for s in statuses), statuses
    assert len(thread_calls(env.fake, "assistant.threads.setStatus", a)) >= 2  # both questions


async def test_panel_reply_streams_natively_without_edits(start_env: Starter) -> None:
    reply = "Here: <!here> & <@U2>, **bold**. " + " ".join(f"w{i}" for i in range(60))
    engine = FakeEngine(replies=[reply], piece_chars=8, delay=0.01)
    env = await start_env(engine, stream_interval=0.05)
    await post_event(env, panel_message("talk to me", ts="2300.000002", thread_ts="2300.000001"))
    [text] = await wait_panel_reply(env, "2300.000001", escape(reply))

    assert text == escape(reply)  # nothing the model wrote can ping anyone
    methods = [c.method for c in env.fake.calls if c.method.startswith("chat.")]
    assert methods[0] == "chat.startStream" and methods[-1] == "chat.stopStream"
    assert methods.count("chat.startStream") == 1 and methods.count("chat.appendStream") >= 2
    assert "chat.update" not in methods and "chat.postMessage" not in methods
    [start] = [c.params for c in env.fake.calls_to("chat.startStream")]
    assert (start["channel"], start["thread_ts"], start["recipient_user_id"]) == ("D1", "2300.000001", "U1")
    # The status line showed the wait before the first text.
    first_status = env.fake.calls_to("assistant.threads.setStatus")[0]
    assert first_status.params["status"] == "is thinking…"
    assert first_status.at < env.fake.calls_to("chat.startStream")[0].at
    # The finished reply carries Regenerate and Slack's feedback buttons (issue 10), ids in their values.
    await poll(lambda: env.bot.worker.running() == 0, what="the job's end")
    stop = env.fake.calls_to("chat.stopStream")[-1].params
    blocks = json.loads(stop["blocks"]) if isinstance(stop["blocks"], str) else stop["blocks"]
    assert [b["type"] for b in blocks] == ["actions", "context_actions"]
    async with env.bot.store.db.execute("SELECT id FROM messages WHERE role = 'assistant'") as cur:
        [(reply_id,)] = list(await cur.fetchall())
    assert [e["value"] for e in blocks[0]["elements"]] == [str(reply_id)]  # Regenerate (not cut: no Continue)
    [feedback] = blocks[1]["elements"]
    assert feedback["type"] == "feedback_buttons"
    values = (feedback["positive_button"]["value"], feedback["negative_button"]["value"])
    assert values == (f"up:{reply_id}", f"down:{reply_id}")


async def test_panel_reply_falls_back_to_plain_feedback_buttons_and_its_stream_ends(
    start_env: Starter, fake: FakeSlack
) -> None:
    fake.refuse_feedback_buttons = True  # a Slack without feedback_buttons, as in the thread test
    env = await start_env(FakeEngine(replies=["Fine."]))
    await post_event(env, panel_message("how are you", ts="2350.000002", thread_ts="2350.000001"))
    assert await wait_panel_reply(env, "2350.000001", "Fine.") == ["Fine."]
    [ts] = [t for t, m in fake.messages.items() if m["thread_ts"] == "2350.000001"]
    await poll(lambda: "xwin_regenerate" in fake.buttons(ts), what="the buttons")
    assert {"xwin_feedback_up", "xwin_feedback_down"} <= set(fake.buttons(ts))


async def test_panel_falls_back_to_edits_once_when_streaming_is_unknown(
    start_env: Starter, fake: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    fake.errors["chat.startStream"] = "unknown_method"
    engine = FakeEngine(replies=["first " * 30, "second " * 30], piece_chars=10, delay=0.005)
    env = await start_env(engine, stream_interval=0.05)
    await post_event(env, panel_message("one", ts="2400.000002", thread_ts="2400.000001"))
    assert await wait_panel_reply(env, "2400.000001", ("first " * 30).strip()) == [("first " * 30).strip()]
    await post_event(env, panel_message("two", ts="2500.000002", thread_ts="2500.000001"))
    assert await wait_panel_reply(env, "2500.000001", ("second " * 30).strip()) == [("second " * 30).strip()]

    assert len(fake.calls_to("chat.startStream")) == 1  # asked once, then never again
    assert fake.calls_to("chat.update")  # the edits took over
    refused = [r for r in caplog.records if "native streaming is not available" in r.getMessage()]
    assert len(refused) == 1 and "unknown_method" in refused[0].getMessage()


async def test_panel_long_reply_streams_in_messages_that_keep_code_blocks(start_env: Starter) -> None:
    para = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 30
    code = "```python\n" + "\n".join(f"print({i} < {i + 1})" for i in range(150)) + "\n```"
    reply = "\n\n".join([para, code, para, para])
    env = await start_env(FakeEngine(replies=[reply], piece_chars=400), stream_interval=0.0)
    await post_event(env, panel_message("essay", ts="2600.000002", thread_ts="2600.000001"))
    texts = await wait_panel_reply(env, "2600.000001", escape(para.strip()))
    assert len(texts) >= 3
    assert all(len(t) <= MESSAGE_LIMIT for t in texts)
    assert all(t.count("```") % 2 == 0 for t in texts)
    joined = "\n".join(texts)
    for i in (0, 75, 149):
        assert f"print({i} &lt; {i + 1})" in joined
    assert len(env.fake.calls_to("chat.startStream")) == len(texts) == len(env.fake.calls_to("chat.stopStream"))


async def test_panel_text_commands_stop_and_show_settings(start_env: Starter) -> None:
    engine = FakeEngine(replies=["word " * 400], piece_chars=1, delay=0.01)  # ~20 s if not stopped
    env = await start_env(engine)
    thread = "2700.000001"
    await post_event(env, panel_message("long please", ts="2700.000002", thread_ts=thread))
    await poll(lambda: engine.streaming.is_set(), what="streaming")
    await post_event(env, panel_message("stop", ts="2700.000003", thread_ts=thread))
    await poll(lambda: "stopped" in "".join(env.fake.thread("D1", thread)).lower(), what="the stopped reply")
    await post_event(env, panel_message(" /xwin set temperature 0.5", ts="2700.000004", thread_ts=thread))
    await post_event(env, panel_message("Settings", ts="2700.000005", thread_ts=thread))
    await poll(lambda: "temperature = 0.5" in env.fake.thread("D1", thread)[-1], what="the settings")
    assert len(engine.calls) == 1  # the commands never reached the model
    assert panel_command("stop.") == "stop" and panel_command("/xwin forget") == "forget"
    assert panel_command("stop the war") is None and panel_command("settings of a story") is None


async def test_panel_deleting_the_question_cancels_its_reply(start_env: Starter) -> None:
    long_reply = "word " * 400
    engine = FakeEngine(replies=[long_reply], piece_chars=1, delay=0.01)  # ~20 s if not stopped
    env = await start_env(engine)
    thread = "2750.000001"
    await post_event(env, panel_message("long please", ts="2750.000002", thread_ts=thread))
    await poll(lambda: engine.streaming.is_set(), what="streaming")
    previous = {"type": "message", "user": "U1", "ts": "2750.000002", "thread_ts": thread, "text": "long please"}
    deleted = message("", ts="2750.000003", channel="D1", channel_type="im", subtype="message_deleted",
                      deleted_ts="2750.000002", previous_message=previous)
    deleted.pop("user")
    assert await post_event(env, deleted) == 200
    await poll(lambda: "stopped" in "".join(env.fake.thread("D1", thread)).lower(), what="the stopped reply")
    assert long_reply.strip() not in "".join(env.fake.thread("D1", thread))


async def test_socket_mode_panel_message_retried_is_answered_once(start_env: Starter) -> None:
    engine = FakeEngine(replies=["only once"])
    env = await start_env(engine, mode="socket")
    event = socket_event(panel_message("hi", ts="2800.000002", thread_ts="2800.000001"), event_id="EvP1")
    first = await env.fake.send_envelope(event)
    await wait_panel_reply(env, "2800.000001", "only once")
    again = await env.fake.send_envelope(event, retry_attempt=1)
    replayed = await env.fake.send_envelope(socket_event(event["event"], event_id="EvP2"))  # as after a restart
    await poll(lambda: all(env.fake.acked(e) for e in (first, again, replayed)), what="acks")
    # A later message is answered: the deliveries before it were handled by then.
    await env.fake.send_envelope(socket_event(panel_message("next", ts="2900.000002", thread_ts="2900.000001")))
    await wait_panel_reply(env, "2900.000001", "only once")
    assert len(engine.calls) == 2
    assert env.fake.thread("D1", "2800.000001") == ["only once"]


async def test_panel_obeys_allow_dms_before_any_work(start_env: Starter) -> None:
    engine = FakeEngine()
    env = await start_env(engine, allow_dms=False)
    calls_before = len(env.fake.calls)
    await post_event(env, panel_started("3000.000001"))
    await post_event(env, panel_message("hello?", ts="3000.000002", thread_ts="3000.000001"))
    await post_command(env, "status")  # handled after both events: they were dropped by then
    assert engine.calls == []
    # Only bolt's own lazy auth.test: no greeting, status, title or reply.
    assert {c.method for c in env.fake.calls[calls_before:]} <= {"auth.test"}


async def test_sink_factory_resumes_a_panel_reply_as_a_stream(start_env: Starter) -> None:
    env = await start_env()
    key = ConversationKey("slack", "dm", "D1", "3100.000001")
    ref = {"channel": "D1", "thread_ts": "3100.000001", "panel": "1", "user": "U1", "team": "T1"}
    sink = env.adapter.sink_for(key, ref)
    await sink.queued(2)
    await sink.finish("resumed <!here>")
    assert env.fake.thread("D1", "3100.000001") == ["resumed &lt;!here&gt;"]
    [status] = env.fake.calls_to("assistant.threads.setStatus")
    assert status.params["status"] == "is waiting: 2 ahead of you…"
    assert [c.method for c in env.fake.calls if c.method.startswith("chat.")] == [
        "chat.startStream", "chat.stopStream"]


def test_manifest_declares_what_the_adapter_uses() -> None:
    import yaml

    manifest = yaml.safe_load((Path(__file__).parents[1] / "docs" / "slack-manifest.yaml").read_text())
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {*REQUIRED_SCOPES, DM_SCOPE, *OPTIONAL_SCOPES, "commands"} <= scopes
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert {"app_mention", "message.im", "message.channels", "assistant_thread_started",
            "assistant_thread_context_changed"} <= events
    features = manifest["features"]
    assert features["assistant_view"]["assistant_description"].strip()
    assert [c["command"] for c in features["slash_commands"]] == ["/xwin"]
    assert features["app_home"]["messages_tab_enabled"] is True
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    assert manifest["settings"]["socket_mode_enabled"] is True


# ---------------------------------------------------------------- start-up and restarts


async def test_start_refuses_a_bad_bot_token(start_env: Starter, fake: FakeSlack) -> None:
    with pytest.raises(AdapterError, match=r"SLACK_BOT_TOKEN.*invalid_auth"):
        await start_env(bot_token="xoxb-revoked-or-mistyped")


async def test_start_refuses_a_missing_scope(start_env: Starter, fake: FakeSlack) -> None:
    fake.scopes = tuple(s for s in fake.scopes if s != "chat:write")
    with pytest.raises(AdapterError, match="chat:write"):
        await start_env()


async def test_start_refuses_a_bad_app_token_in_socket_mode(start_env: Starter, fake: FakeSlack) -> None:
    with pytest.raises(AdapterError, match=r"SLACK_APP_TOKEN.*invalid_auth"):
        await start_env(mode="socket", app_token="xapp-revoked-or-mistyped")


async def test_start_refuses_missing_secrets(tmp_path: Path, fake: FakeSlack) -> None:
    config = Config(bot=BotConfig(database=str(tmp_path / "db.sqlite3")))
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, FakeEngine())
        cfg = replace(config.slack, api_base_url=fake.api_base_url)
        only_bot = Secrets(slack_bot_token=fake.bot_token)
        with pytest.raises(AdapterError, match="SLACK_BOT_TOKEN is not set"):
            await SlackAdapter(bot, cfg, Secrets()).start()
        with pytest.raises(AdapterError, match="SLACK_BOT_TOKEN is not a bot token"):
            await SlackAdapter(bot, cfg, Secrets(slack_bot_token="xapp-wrong-kind")).start()
        with pytest.raises(AdapterError, match="SLACK_APP_TOKEN is not set"):
            await SlackAdapter(bot, cfg, only_bot).start()
        with pytest.raises(AdapterError, match="SLACK_SIGNING_SECRET"):
            await SlackAdapter(bot, replace(cfg, mode="http"), only_bot).start()
    assert fake.calls == []


async def test_socket_mode_reconnects_after_a_drop_and_ends_when_refused_for_good(
    start_env: Starter, fake: FakeSlack
) -> None:
    env = await start_env(mode="socket")
    waiting = asyncio.ensure_future(env.adapter.wait_closed())
    await fake.kill_sockets()  # a passing fault: slack-sdk reconnects
    await poll(lambda: len(fake.calls_to("apps.connections.open")) == 2)
    await fake.wait_connected()
    await fake.send_envelope(event_body(mention("<@UBOT> still there?", ts="1300.000001")))
    await poll(lambda: env.thread_texts("C1", "1300.000001") == ["Hello from the fake engine."])
    assert not waiting.done()
    fake.errors["apps.connections.open"] = "token_revoked"  # the app token is gone for good
    await fake.kill_sockets()
    with pytest.raises(AdapterError, match=r"SLACK_APP_TOKEN.*token_revoked"):
        await asyncio.wait_for(waiting, 10)


async def test_xwin_bot_run_ends_when_slack_refuses_to_reconnect(tmp_path: Path, fake: FakeSlack) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'''[model]\nengine = "fake"\n[bot]\ndatabase = "bot.sqlite3"\n
[slack]\nenabled = true\nmode = "socket"\napi_base_url = "{fake.api_base_url}"\n''', encoding="utf-8")
    env = {**os.environ, "SLACK_BOT_TOKEN": fake.bot_token, "SLACK_APP_TOKEN": fake.app_token}
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.main", "run", "--config", str(config),
            cwd=ROOT, env=env, stdout=err, stderr=err,
        )  # fmt: skip
    try:
        await poll(lambda: "running; Ctrl-C" in log.read_text(), within=60)
        fake.errors["apps.connections.open"] = "invalid_auth"
        await fake.kill_sockets()
        code = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
    text = log.read_text()
    assert code == 1, text
    assert "Traceback" not in text
    assert "SLACK_APP_TOKEN was refused while reconnecting Socket Mode (invalid_auth)" in text.splitlines()[-1]
    assert fake.app_token not in text and fake.bot_token not in text


async def test_sink_factory_answers_a_resumed_job_in_its_thread(start_env: Starter) -> None:
    env = await start_env()
    key = ConversationKey("slack", "T1", "C1", "1200.000001")
    sink = env.adapter.sink_for(key, {"channel": "C1", "thread_ts": "1200.000001"})
    await sink.queued(2)
    await sink.started()
    await sink.finish("resumed <!here>")
    assert env.thread_texts("C1", "1200.000001") == ["resumed &lt;!here&gt;"]
    assert "Queued: 2 ahead" in env.fake.posted()[0]["text"]


# ---------------------------------------------------------------- the embedded model


@pytest.mark.model
async def test_embedded_model_answers_a_mention_and_a_panel_thread(tmp_path: Path, fake: FakeSlack) -> None:
    """One model load for both surfaces: a channel mention (edits) and a panel thread (native stream)."""
    from bot.config import GenerationConfig, parse_config
    from bot.engine.transformers import TransformersEngine

    base = parse_config({}, model_override="embedded")
    config = replace(
        base,
        generation=GenerationConfig(temperature=0.0, max_new_tokens=24),
        bot=BotConfig(database=str(tmp_path / "bot.sqlite3"), stream_interval=0.5),
        slack=SlackConfig(enabled=True, mode="socket", api_base_url=fake.api_base_url),
    )
    secrets = Secrets(slack_bot_token=fake.bot_token, slack_app_token=fake.app_token)
    engine = TransformersEngine(config.model)
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        adapter = SlackAdapter(bot, config.slack, secrets)
        await adapter.start()
        try:
            question = mention("<@UBOT> What is the capital of France?", ts="1300.000001")
            await fake.send_envelope(event_body(question))
            await poll(
                lambda: (
                    any(
                        c.method == "chat.update" and not str(c.params["text"]).startswith("_")
                        for c in fake.calls
                    )
                    and not bot.worker.running()
                ),
                within=120,
                what="the model's reply",
            )
            await bot.drain()
            await fake.send_envelope(event_body(panel_started("1400.000001")))
            panel_question = panel_message("What is the capital of Italy?", ts="1400.000002", thread_ts="1400.000001")
            await fake.send_envelope(event_body(panel_question))
            await poll(lambda: bool(thread_calls(fake, "chat.startStream", "1400.000001")), within=60,
                       what="the panel stream")
            await poll(lambda: bool(fake.calls_to("chat.stopStream")) and not bot.worker.running(), within=120,
                       what="the panel reply")
            await bot.drain()
        finally:
            await adapter.close()
    [answer] = fake.thread("C1", "1300.000001")
    greeting, panel_answer = fake.thread("D1", "1400.000001")
    assert greeting.startswith("Hi!")
    for text in (answer, panel_answer):
        assert text.strip()
        for leak in ("<s>", "</s>", "USER:", "ASSISTANT:", "\ufffd", "<|im_start|>", "<!", "<@"):
            assert leak not in text
    panel_ts = {ts for ts, m in fake.messages.items() if m["thread_ts"] == "1400.000001"}
    assert not [c for c in fake.calls_to("chat.update") if c.params["ts"] in panel_ts]  # streamed, not edited
    titles = [c.params["title"] for c in fake.calls_to("assistant.threads.setTitle")]
    assert titles == ["What is the capital of Italy?"]


# ---------------------------------------------------------------- issue 9: the final reply is never lost


async def test_http_final_reply_arrives_when_chat_update_keeps_failing(
    start_env: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.slack import SlackReplySink

    monkeypatch.setattr(SlackReplySink, "final_retry_delays", (0.01, 0.01))
    env = await start_env(FakeEngine(replies=["the answer that must arrive"]))
    env.fake.fail("chat.update", 10_000)
    assert await post_event(env, mention("<@UBOT> hello", ts="900.000001")) == 200
    await wait_reply(env, "C1", "900.000001", "the answer that must arrive")
    await env.bot.drain()
    # The "_Thinking…_" placeholder was deleted.
    assert env.thread_texts("C1", "900.000001") == ["the answer that must arrive"]
    job = await env.bot.store.job(1)
    assert job is not None and job.state == "done"


async def test_http_final_reply_that_cannot_be_posted_leaves_the_job_failed(
    start_env: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.slack import SlackReplySink

    monkeypatch.setattr(SlackReplySink, "final_retry_delays", (0.01,))
    env = await start_env(FakeEngine(replies=["an answer no one will see"], delay=0.05))
    assert await post_event(env, mention("<@UBOT> hello", ts="901.000001")) == 200
    await poll(lambda: env.engine.streaming.is_set(), what="generation under way")
    env.fake.fail("chat.update", 10_000)
    env.fake.fail("chat.postMessage", 10_000)
    await poll(lambda: env.bot.worker.running() == 0 and len(env.engine.calls) == 1, what="job end")
    await env.bot.drain()
    job = await env.bot.store.job(1)
    assert job is not None and job.state == "failed"
    assert await env.bot.store.message_count() == 1  # the undelivered reply is not history


# ---------------------------------------------------------------- issue 9: the signature before anything else


async def test_http_malformed_unsigned_requests_get_401_and_one_short_log_line(
    start_env: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    env = await start_env(FakeEngine(replies=["answer"]))
    big = b'{"padding": "' + b"B" * 1_000_000 + b'"}'
    bodies = [b'{"type": "event_callback", "event": {', b"[1]", b"\xff\xfe\xfd", big]
    with caplog.at_level(logging.DEBUG):
        statuses = []
        async with aiohttp.ClientSession() as session:
            for body in bodies:
                async with session.post(env.url, data=body, headers={"Content-Type": "application/json"}) as r:
                    statuses.append(r.status)
            bad_time = {"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "v0=00"}
            async with session.post(env.url, data=b"[1]", headers=bad_time) as r:
                statuses.append(r.status)
        # Signed, but not JSON a Slack event can be: refused, not a 500.
        assert await post_signed(env, b"[1]") == 400
        assert await post_signed(env, b"\xff\xfe") == 400
    assert statuses == [401] * 5
    refused = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refused) == 5
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert sum(len(r.getMessage()) for r in caplog.records) < 10_000  # no body in the log


async def test_http_a_restart_resumes_into_the_old_messages(start_env: Starter) -> None:
    """Issue 9: no stale "_Thinking…_", partial text or "restarting" left in the thread."""
    env = await start_env(FakeEngine(replies=["never finished " * 200], delay=0.02), stream_interval=0.05)
    assert await post_event(env, mention("<@UBOT> before the restart", ts="950.000001")) == 200
    await poll(lambda: "never finished" in "".join(env.thread_texts("C1", "950.000001")), what="partial text")
    await env.bot.close(grace=0.0)
    await env.adapter.close()
    await env.bot.store.close()
    before = env.thread_texts("C1", "950.000001")
    assert len(before) == 2 and "restarting" in before[1]  # the partial answer, then why it stopped

    second = await start_env(FakeEngine(replies=["Answered after the restart."]))
    assert await second.bot.resume_pending() == 1
    await poll(lambda: second.engine.calls and second.bot.worker.running() == 0, what="the resumed reply")
    await second.bot.drain()
    assert second.thread_texts("C1", "950.000001") == ["Answered after the restart."]


# ---------------------------------------------------------------- buttons (issue 11)

CUT = "The first part of a long answer"  # as long as max_new_tokens: cut there


async def press(env: Env, action_id: str, value: str, *, ts: str, thread: str | None, user: str = "U1",
                kind: str = "button", channel: str = "C1") -> str:
    """Presses a button under the bot's message ``ts``; returns the ephemeral answer."""
    url = env.fake.response_url()
    payload = block_action(action_id, value, user=user, channel=channel, message_ts=ts, thread_ts=thread,
                           response_url=url, kind=kind)
    if env.adapter.http_port:
        assert await post_signed(env, form_body(payload), content_type="application/x-www-form-urlencoded") == 200
    else:
        envelope = await env.fake.send_envelope(payload, kind="interactive")
        await poll(lambda: env.fake.acked(envelope), what="ack of the button")
    rid = url.rsplit("/", 1)[1]
    await poll(lambda: any(r["_rid"] == rid for r in env.fake.responses), what="button answer")
    answer = next(r for r in env.fake.responses if r["_rid"] == rid)
    assert answer["response_type"] == "ephemeral"
    return str(answer["text"])


async def test_continue_button_extends_the_reply_and_feedback_counts_once(start_env: Starter) -> None:
    engine = FakeEngine(replies=[CUT, ", and its end."])
    env = await start_env(engine, generation=GenerationConfig(max_new_tokens=len(CUT)))
    await post_event(env, mention("<@UBOT> tell me everything", ts="700.000001"))
    await poll(lambda: bool(env.fake.posted()), what="the reply")
    [ts] = [p["_ts"] for p in env.fake.posted()]
    await poll(lambda: "xwin_continue" in env.fake.buttons(ts), what="buttons")
    buttons = env.fake.buttons(ts)
    assert list(buttons) == ["xwin_continue", "xwin_regenerate", "xwin_feedback:up", "xwin_feedback:down"]
    section = env.fake.message_blocks()[ts][0]
    assert section["text"] == {"type": "mrkdwn", "text": CUT}

    assert await press(env, "xwin_continue", buttons["xwin_continue"], ts=ts, thread="700.000001") == "Continuing…"
    await poll(lambda: "xwin_continue" not in env.fake.buttons(ts) and "xwin_regenerate" in env.fake.buttons(ts),
               what="the continued reply's buttons")
    assert env.fake.message_texts()[ts] == f"{CUT}, and its end."
    assert len(env.fake.posted()) == 1  # edited in place
    assert engine.calls[1].prompt_text.endswith(f"tell me everything ASSISTANT: {CUT}")
    reply_id = int(buttons["xwin_continue"])
    stored = await env.bot.store.reply(reply_id)
    assert stored is not None and stored.text == f"{CUT}, and its end."

    up = env.fake.buttons(ts)["xwin_feedback:up"]
    first = await press(env, "xwin_feedback", up, ts=ts, thread="700.000001", kind="feedback_buttons")
    second = await press(env, "xwin_feedback", up, ts=ts, thread="700.000001", kind="feedback_buttons")
    assert (first, second) == ("Thanks for the feedback.", "Your feedback was already recorded.")
    assert [(r, u, v) for r, u, v, _ in await env.bot.store.feedback_rows()] == [(reply_id, "U1", 1)]


async def test_continue_as_text_in_a_panel_extends_the_reply_in_place_then_refuses(start_env: Starter) -> None:
    engine = FakeEngine(replies=[CUT, ", and its end."])
    env = await start_env(engine, generation=GenerationConfig(max_new_tokens=len(CUT)))
    thread = "3100.000001"
    await post_event(env, panel_message("tell me everything", ts="3100.000002", thread_ts=thread))
    await wait_panel_reply(env, thread, CUT)
    [ts] = [t for t, m in env.fake.messages.items() if m["thread_ts"] == thread]
    await poll(lambda: "xwin_continue" in env.fake.buttons(ts), what="the Continue button")

    await post_event(env, panel_message("Continue", ts="3100.000003", thread_ts=thread))
    await poll(lambda: "xwin_regenerate" in env.fake.buttons(ts) and "xwin_continue" not in env.fake.buttons(ts),
               what="the continued reply's buttons")
    assert env.fake.thread("D1", thread) == [f"{CUT}, and its end."]  # the same message, edited
    assert engine.calls[1].prompt_text.endswith(f"tell me everything ASSISTANT: {CUT}")
    reply_id = int(env.fake.buttons(ts)["xwin_regenerate"])
    stored = await env.bot.store.reply(reply_id)
    assert stored is not None and stored.text == f"{CUT}, and its end."
    assert await env.bot.store.message_count() == 2  # one question, one reply
    up = env.fake.buttons(ts)["xwin_feedback:up"]  # the panel's buttons find their reply too
    voted = await press(env, "xwin_feedback", up, ts=ts, thread=thread, kind="feedback_buttons", channel="D1")
    assert voted == "Thanks for the feedback."

    await post_event(env, panel_message("continue", ts="3100.000004", thread_ts=thread))
    refusal = "That reply is complete: there is nothing to continue."
    await poll(lambda: env.fake.thread("D1", thread)[-1] == refusal, what="the refusal")
    assert len(engine.calls) == 2
    in_channel = await post_command(env, "continue", user="U1", channel="C1")
    assert "press the Continue button" in in_channel["text"] and len(engine.calls) == 2


async def test_regenerate_in_a_panel_streams_the_new_reply(start_env: Starter) -> None:
    """Regenerate under a panel reply writes the new one as the panel writes
    replies: a native stream, not a posted message edited in place."""
    engine = FakeEngine(replies=["Red.", "Blue, " + " ".join(f"w{i}" for i in range(30))], piece_chars=8,
                        delay=0.01)
    env = await start_env(engine, stream_interval=0.05)
    thread = "3300.000001"
    await post_event(env, panel_message("name a colour", ts="3300.000002", thread_ts=thread))
    await wait_panel_reply(env, thread, "Red.")
    [ts] = [t for t, m in env.fake.messages.items() if m["thread_ts"] == thread]
    await poll(lambda: "xwin_regenerate" in env.fake.buttons(ts), what="the Regenerate button")
    starts = len(env.fake.calls_to("chat.startStream"))

    answer = await press(env, "xwin_regenerate", env.fake.buttons(ts)["xwin_regenerate"], ts=ts, thread=thread,
                         channel="D1")
    assert answer == "Writing a new reply…"
    second = escape(engine.replies[1])
    texts = await wait_panel_reply(env, thread, second)
    assert texts == ["Red.", second]
    assert len(env.fake.calls_to("chat.startStream")) == starts + 1
    [start] = [c.params for c in env.fake.calls_to("chat.startStream")][starts:]
    assert (start["channel"], start["thread_ts"], start["recipient_user_id"]) == ("D1", thread, "U1")
    assert "chat.postMessage" not in [c.method for c in env.fake.calls]
    assert "Red." not in engine.calls[1].prompt_text


async def test_xwin_continue_in_a_dm_extends_the_reply_in_place(start_env: Starter) -> None:
    engine = FakeEngine(replies=[CUT, ", and its end."])
    env = await start_env(engine, generation=GenerationConfig(max_new_tokens=len(CUT)))
    await post_event(env, message("tell me everything", ts="3200.000001", channel="D1", channel_type="im"))
    await poll(lambda: env.fake.thread("D1", None) == [CUT], what="the cut reply")
    [ts] = [p["_ts"] for p in env.fake.posted()]
    await poll(lambda: "xwin_continue" in env.fake.buttons(ts), what="the Continue button")

    answer = await post_command(env, "continue", user="U1", channel="D1")
    assert answer["text"] == "Continuing…" and answer["response_type"] == "ephemeral"
    await poll(lambda: "xwin_regenerate" in env.fake.buttons(ts) and "xwin_continue" not in env.fake.buttons(ts),
               what="the continued reply's buttons")
    assert env.fake.thread("D1", None) == [f"{CUT}, and its end."] and len(env.fake.posted()) == 1


async def test_buttons_work_after_a_restart_refuse_a_stranger_and_fall_back_to_plain_feedback(
    start_env: Starter, fake: FakeSlack
) -> None:
    fake.refuse_feedback_buttons = True  # a Slack without feedback_buttons: plain buttons instead
    first = await start_env(FakeEngine(replies=["Red."]))
    await post_event(first, mention("<@UBOT> name a colour", ts="800.000001"))
    await poll(lambda: bool(fake.posted()), what="the reply")
    [ts] = [p["_ts"] for p in fake.posted()]
    await poll(lambda: "xwin_regenerate" in fake.buttons(ts), what="buttons")
    assert {"xwin_feedback_up", "xwin_feedback_down"} <= set(fake.buttons(ts))
    buttons = fake.buttons(ts)
    await first.adapter.close()
    await first.bot.close()
    await first.bot.store.close()

    # A new process on the same SQLite file: nothing in memory.
    engine = FakeEngine(replies=["Blue."])
    env = await start_env(engine)
    refused = await press(env, "xwin_regenerate", buttons["xwin_regenerate"], ts=ts, thread="800.000001", user="U2")
    assert refused.startswith("Only the person who asked")
    vote = await press(env, "xwin_feedback_down", buttons["xwin_feedback_down"], ts=ts, thread="800.000001")
    assert vote == "Thanks for the feedback."
    assert await press(env, "xwin_regenerate", buttons["xwin_regenerate"], ts=ts, thread="800.000001") \
        == "Writing a new reply…"
    await wait_reply(env, "C1", "800.000001", "Blue.")
    assert env.thread_texts("C1", "800.000001") == ["Red.", "Blue."]
    assert "Red." not in engine.calls[0].prompt_text
    old = await env.bot.store.reply(int(buttons["xwin_regenerate"]))
    assert old is not None and old.replaced


async def test_socket_mode_feedback_click_is_acked_and_stored_once(start_env: Starter) -> None:
    env = await start_env(FakeEngine(replies=["Fine."]), mode="socket")
    await env.fake.send_envelope(event_body(mention("<@UBOT> how are you", ts="900.000001")))
    await poll(lambda: "xwin_feedback:down" in env.fake.buttons(next(iter(env.fake.message_texts()), "")),
               what="feedback buttons")
    ts = next(iter(env.fake.message_texts()))
    down = env.fake.buttons(ts)["xwin_feedback:down"]
    for expected in ("Thanks for the feedback.", "Your feedback was already recorded."):
        assert await press(env, "xwin_feedback", down, ts=ts, thread="900.000001", kind="feedback_buttons") \
            == expected
    assert [(u, v) for _, u, v, _ in await env.bot.store.feedback_rows()] == [("U1", -1)]
