"""Access by role and user (issue 12), through the real discord.py and slack-bolt
against the fake servers: refused people get no work done, before any of it."""

from __future__ import annotations

from pathlib import Path

from bot.engine.fake import FakeEngine
from tests.fakes.discord_server import wait_for
from tests.fakes.slack_server import poll
from tests.test_discord import bot_on, discord_server
from tests.test_slack import Starter, fake, mention, post_command, post_event, press, start_env, wait_reply

__all__ = ["fake", "start_env"]  # fixtures used by the Slack tests


async def test_discord_allowed_roles_and_blocked_users(tmp_path: Path) -> None:
    async with discord_server() as place:
        server = place.fake
        helpers = server.add_role(place.guild, "helpers")
        outsider, blocked = server.user("bo"), server.user("mallory")
        access = {"allowed_roles": [helpers["id"]], "blocked_users": [blocked["id"]]}
        async with bot_on(place, tmp_path, discord=access) as w:
            assert await w.adapter.not_ready() is None
            me = f"<@{server.bot_user['id']}> "
            role = [helpers["id"]]
            gid = w.guild["id"]
            await server.user_message(w.channel["id"], me + "no role", outsider,
                                      mentions=[server.bot_user], guild_id=gid)
            await server.user_message(w.channel["id"], me + "blocked", blocked,
                                      mentions=[server.bot_user], guild_id=gid, roles=role)
            blocked_dm = server.snowflake()
            await server.user_message(blocked_dm, "blocked in a DM", blocked)
            token = await server.slash_command("status", user=outsider, channel_id=w.channel["id"], guild_id=gid)
            refusal = await wait_for(lambda: server.interaction_text(token))
            # Then the allowed ones: a member with the role, and a DM (no roles there: allow_dms decides).
            asked = await server.user_message(w.channel["id"], me + "with the role", w.user,
                                              mentions=[server.bot_user], guild_id=gid, roles=role)
            await wait_for(lambda: server.sent("POST", "/threads$"))
            await w.reply_in(w.thread_of(asked))
            dm = server.snowflake()
            await server.user_message(dm, "a DM without roles", outsider)
            await w.reply_in(dm, count=2)

            prompts = [c.prompt_text for c in w.engine.calls]
            assert len(prompts) == 2
            assert "with the role" in prompts[0] and "a DM without roles" in prompts[1]
            assert "not enabled here" in refusal
            assert len(server.sent("POST", "/threads$")) == 1
            assert not server.sent(path_regex=rf"/channels/{blocked_dm}/")
            assert await w.bot.store.message_count() == 4  # two questions, two answers: nothing else stored
        assert await w.adapter.not_ready() == "closed"


async def test_discord_buttons_refuse_blocked_users_before_any_work(tmp_path: Path) -> None:
    async with discord_server() as place:
        blocked = place.fake.user("mallory")
        async with bot_on(place, tmp_path, replies=["answer"], discord={"blocked_users": [blocked["id"]]}) as w:
            asked = await w.say("a question")
            await wait_for(lambda: w.fake.sent("POST", "/threads$"))
            [reply] = await w.reply_in(w.thread_of(asked))
            regenerate, down = (i for i in reply.custom_ids() if i.split(":")[1] in ("regenerate", "down"))
            tokens = [await w.fake.click(reply.id, i, user=blocked, guild_id=w.guild["id"]) for i in (down, regenerate)]
            answers = [await wait_for(lambda t=t: w.fake.interaction_text(t)) for t in tokens]
            assert answers == ["The bot is not enabled here."] * 2
            assert await w.bot.store.feedback_rows() == []
            assert len(w.engine.calls) == 1


async def test_slack_allowed_and_blocked_users(start_env: Starter) -> None:
    engine = FakeEngine(replies=["answer"])
    env = await start_env(engine, allowed_users=("U1", "U2"), blocked_users=("U2",))
    assert await env.adapter.not_ready() is None
    await post_event(env, mention("<@UBOT> not on the list", ts="900.000001", user="U3"))
    await post_event(env, mention("<@UBOT> blocked", ts="900.000002", user="U2"))
    refusal = await post_command(env, "status", user="U3")
    await post_event(env, mention("<@UBOT> allowed", ts="901.000001", user="U1"))
    await wait_reply(env, "C1", "901.000001", "answer")

    assert [("allowed" in c.prompt_text) for c in engine.calls] == [True]
    assert {p.get("thread_ts") for p in env.fake.posted()} == {"901.000001"}
    assert "not enabled here" in refusal["text"]
    admitted = await post_command(env, "status", user="U1")
    assert "queued" in admitted["text"]


async def test_slack_socket_mode_readiness_and_reconnects(start_env: Starter) -> None:
    env = await start_env(mode="socket")
    await env.fake.wait_connected()
    assert await env.adapter.not_ready() is None
    await env.fake.ask_to_reconnect()
    value = env.bot.metrics.registry.get_sample_value
    await poll(lambda: value("xwin_adapter_reconnects_total", {"platform": "slack"}) == 1, what="a reconnect")
    assert len(env.fake.calls_to("apps.connections.open")) == 2
    assert await env.adapter.not_ready() is None
    await env.adapter.close()
    assert await env.adapter.not_ready() == "not connected"


async def test_slack_buttons_refuse_blocked_users_before_any_work(start_env: Starter) -> None:
    engine = FakeEngine(replies=["answer"])
    env = await start_env(engine, blocked_users=("U2",))
    await post_event(env, mention("<@UBOT> allowed", ts="902.000001", user="U1"))
    await wait_reply(env, "C1", "902.000001", "answer")
    [ts] = [p["_ts"] for p in env.fake.posted()]
    await poll(lambda: "xwin_regenerate" in env.fake.buttons(ts), what="buttons")
    buttons = env.fake.buttons(ts)

    vote = await press(env, "xwin_feedback", buttons["xwin_feedback:down"], ts=ts, thread="902.000001",
                       user="U2", kind="feedback_buttons")
    again = await press(env, "xwin_regenerate", buttons["xwin_regenerate"], ts=ts, thread="902.000001", user="U2")
    assert (vote, again) == ("The bot is not enabled here.", "The bot is not enabled here.")
    assert await env.bot.store.feedback_rows() == []
    assert len(engine.calls) == 1
