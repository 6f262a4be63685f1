"""The Slack adapter end to end: the real slack-bolt app against a fake Slack.

Every test asserts on what the bot sent to the fake (Web API calls, Socket
Mode acks, response_url posts) and on what the fake engine was asked.
Nothing sleeps for a fixed time: waits poll with a deadline.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.slack import MESSAGE_LIMIT, SlackAdapter
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
            if p.get("channel") == channel and p.get("thread_ts") == thread_ts
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
        adapter = SlackAdapter(bot, slack_cfg, secrets)
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
async def test_embedded_model_answers_a_mention_in_its_thread(tmp_path: Path, fake: FakeSlack) -> None:
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
        finally:
            await adapter.close()
    [answer] = [t for t in fake.message_texts().values() if not t.startswith("_")]
    assert answer.strip()
    for leak in ("<s>", "</s>", "USER:", "ASSISTANT:", "\ufffd", "<|im_start|>"):
        assert leak not in answer


# ---------------------------------------------------------------- buttons (issue 11)

CUT = "The first part of a long answer"  # as long as max_new_tokens: cut there


async def press(env: Env, action_id: str, value: str, *, ts: str, thread: str | None, user: str = "U1",
                kind: str = "button") -> str:
    """Presses a button under the bot's message ``ts``; returns the ephemeral answer."""
    url = env.fake.response_url()
    payload = block_action(action_id, value, user=user, channel="C1", message_ts=ts, thread_ts=thread,
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
