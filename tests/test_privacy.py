"""Privacy (issue 12): erase a conversation, export and purge from the command
line, retention on a schedule while the bot runs."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bot.app import Bot
from bot.engine.fake import FakeEngine
from bot.store import Store
from bot.types import Attachment, CommandContext, ConversationKey, Incoming
from tests.conftest import make_config
from tests.sinks import RecordingSink

ROOT = Path(__file__).resolve().parent.parent
THREAD = ConversationKey("discord", "g1", "c1", "t1")
OTHER = ConversationKey("discord", "g1", "c1", "t2")
SLACK_DM = ConversationKey("slack", "dm", "D1", "")
DAY = 86400.0


def msg(key: ConversationKey, mid: str, text: str, author: str = "u1", age_days: float = 0.0) -> Incoming:
    return Incoming(key, mid, author, author.upper(), text, key.workspace == "dm", time.time() - age_days * DAY)


async def ask(bot: Bot, incoming: Incoming) -> str:
    sink = RecordingSink()
    assert await bot.handle(incoming, sink) == "queued"
    kind, text = await sink.wait()
    assert kind == "finish"
    return str(text)


def count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


# ---------------------------------------------------------------------------- /xwin delete


async def test_delete_erases_a_thread_for_admins_only(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    admin = CommandContext(key=THREAD, author_id="boss", is_dm=False, is_admin=True)
    member = CommandContext(key=THREAD, author_id="u1", is_dm=False, is_admin=False)
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine(replies=["ok"])) as bot:
        await ask(bot, msg(THREAD, "m1", "my secret is 42"))
        await ask(bot, msg(OTHER, "m2", "another thread"))

        refused = await bot.command(member, "delete confirm")
        assert not refused.ok and "Only admins" in refused.text and "/xwin forget" in refused.text
        asked = await bot.command(admin, "delete")  # says what it would do, does nothing
        assert asked.ok and "cannot be undone" in asked.text and "/xwin delete confirm" in asked.text
        assert await store.message_count() == 4

        done = await bot.command(admin, "delete confirm")
        assert done.ok and done.text == "Deleted for good: 2 stored messages of this thread."
        db = config.database_path()
        assert count(db, "SELECT COUNT(*) FROM messages WHERE text LIKE '%secret%'") == 0
        assert count(db, "SELECT COUNT(*) FROM messages") == 2  # the other thread stays
        assert count(db, "SELECT COUNT(*) FROM jobs") == 1
        # The thread stays one of the bot's (follow-ups need no mention) and starts from nothing.
        assert await bot.knows_conversation(THREAD)
        await ask(bot, msg(THREAD, "m3", "hello again"))
        assert "secret" not in bot.engine.calls[-1].prompt_text  # type: ignore[attr-defined]


async def test_delete_waits_for_a_pending_reply_and_forget_says_it_keeps_history(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    admin = CommandContext(key=THREAD, author_id="boss", is_dm=False, is_admin=True)
    gate = asyncio.Event()
    engine = FakeEngine(replies=["slow"])
    real_stream = engine.stream

    async def gated(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        await gate.wait()
        async for piece in real_stream(*args, **kwargs):  # type: ignore[arg-type]
            yield piece

    engine.stream = gated  # type: ignore[method-assign]
    async with Store(config.database_path()) as store, Bot(config, store, engine) as bot:
        sink = RecordingSink()
        await bot.handle(msg(THREAD, "m1", "question"), sink)
        busy = await bot.command(admin, "delete confirm")
        assert not busy.ok and "/xwin stop" in busy.text
        assert await store.message_count() == 1
        gate.set()
        await sink.wait()
        forgot = await bot.command(admin, "forget")
        assert "not deleted" in forgot.text and "/xwin delete" in forgot.text
        assert await store.message_count() == 2
        assert (await bot.command(admin, "delete confirm")).ok
        assert await store.message_count() == 0


# ---------------------------------------------------------------------------- retention


async def test_scheduled_retention_removes_old_rows_while_running(tmp_path: Path) -> None:
    config = make_config(tmp_path, bot={"retention_days": 30, "retention_interval": 0.05})
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine(replies=["ok"])) as bot:
        retention = bot._retention
        assert retention is not None and retention.runs == 1  # the purge at start-up
        # Arrives while running, already 40 days old (an import, a slow clock): the
        # next scheduled purge takes it and the reply to it, and keeps the new one.
        await ask(bot, msg(THREAD, "old", "from long ago", age_days=40))
        await ask(bot, msg(OTHER, "new", "from today"))
        runs = retention.runs
        deadline = time.monotonic() + 5
        while await store.message_count() != 2 or retention.runs <= runs:
            assert time.monotonic() < deadline, "the scheduled purge did not run"
            await asyncio.sleep(0.02)
        db = config.database_path()
        assert count(db, "SELECT COUNT(*) FROM messages WHERE text = 'from long ago'") == 0
        assert count(db, "SELECT COUNT(*) FROM messages WHERE reply_to IS NOT NULL") == 1
        assert await bot.knows_conversation(THREAD)  # an id row, no text: its follow-ups still count


async def test_purge_keeps_what_a_pending_job_needs(tmp_path: Path) -> None:
    async with Store(tmp_path / "bot.sqlite3") as store:
        answered = await store.add_user_message(msg(THREAD, "a", "old, answered", age_days=10),
                                                settings_scope="s", with_job=True)
        waiting = await store.add_user_message(msg(OTHER, "w", "old, still queued", age_days=10),
                                               settings_scope="s", with_job=True)
        assert answered and answered[1] and waiting
        job = await store.job(answered[1])
        assert job is not None
        await store.add_assistant_message(job, "a fresh reply to an old question", "r1")
        assert await store.purge_messages_older_than(5) == 2  # the question and its (newer) reply
        assert await store.message_count() == 1 and await store.count_pending() == 1


# ---------------------------------------------------------------------------- the command line


def xwin_bot(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bot.main", *args, "--config", str(tmp_path / "config.toml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


async def two_users(tmp_path: Path) -> Path:
    """A real store: u1 in a Discord thread (one old exchange, one new), u2 in a Slack DM."""
    (tmp_path / "config.toml").write_text('[bot]\ndatabase = "bot.sqlite3"\n', encoding="utf-8")
    config = make_config(tmp_path)
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine(replies=["noted"])) as bot:
        await ask(bot, msg(THREAD, "m1", "u1 said this long ago", age_days=40))
        await ask(bot, msg(THREAD, "m2", "u1 said this today"))
        await ask(bot, msg(SLACK_DM, "m3", "u2's private question", author="u2"))
        u2 = CommandContext(key=SLACK_DM, author_id="u2", is_dm=True, is_admin=False)
        assert (await bot.command(u2, "set temperature 0.7")).ok
    return config.database_path()


async def test_export_by_user_and_by_conversation_through_the_cli(tmp_path: Path) -> None:
    await two_users(tmp_path)
    done = xwin_bot(tmp_path, "export", "--user", "u2")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    by_type = {t: [r for r in records if r["type"] == t] for t in ("message", "job", "setting")}
    assert [(r["role"], r["text"]) for r in by_type["message"]] == [("user", "u2's private question"),
                                                                    ("assistant", "noted")]
    assert {r["conversation"] for r in by_type["message"]} == {"slack:dm:D1"}
    assert len(by_type["job"]) == 1 and by_type["job"][0]["state"] == "done"
    [setting] = by_type["setting"]
    assert setting["scope"] == "user:slack:u2" and json.loads(setting["value"]) == 0.7
    assert "u1" not in done.stdout
    assert by_type["message"][0]["created_at_utc"].startswith(time.strftime("%Y-", time.gmtime()))

    out = tmp_path / "thread.jsonl"
    done = xwin_bot(tmp_path, "export", "--conversation", "discord:g1:c1:t1", "--output", str(out))
    assert done.returncode == 0, done.stderr
    texts = [r["text"] for r in map(json.loads, out.read_text(encoding="utf-8").splitlines()) if "text" in r]
    assert texts == ["u1 said this long ago", "noted", "u1 said this today", "noted"]

    bad = xwin_bot(tmp_path, "export", "--conversation", "irc:x:y")
    assert bad.returncode == 1 and "unknown platform 'irc'" in bad.stderr and "Traceback" not in bad.stderr
    neither = xwin_bot(tmp_path, "export")
    assert neither.returncode == 2 and "--user" in neither.stderr
    (tmp_path / "config.toml").write_text('[bot]\ndatabase = "typo.sqlite3"\n', encoding="utf-8")
    missing = xwin_bot(tmp_path, "purge", "--older-than", "1")
    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not (tmp_path / "typo.sqlite3").exists()


async def test_purge_through_the_cli_removes_only_old_rows(tmp_path: Path) -> None:
    db = await two_users(tmp_path)
    assert count(db, "SELECT COUNT(*) FROM messages") == 6
    done = xwin_bot(tmp_path, "purge", "--older-than", "30")
    assert done.returncode == 0, done.stderr
    assert "purged 2 messages" in done.stderr
    assert count(db, "SELECT COUNT(*) FROM messages") == 4
    assert count(db, "SELECT COUNT(*) FROM messages WHERE text LIKE '%long ago%'") == 0
    assert count(db, "SELECT COUNT(*) FROM jobs") == 2
    assert count(db, "SELECT COUNT(*) FROM messages WHERE author_id = 'u2'") == 1


async def test_export_has_the_files_and_the_votes(tmp_path: Path) -> None:
    """What a user attached and the votes on their replies are theirs too."""
    config = make_config(tmp_path)
    async with Store(config.database_path()) as store, Bot(config, store, FakeEngine(replies=["noted"])) as bot:
        await ask(bot, msg(SLACK_DM, "m1", "read my file", author="u2"))
        async with store.db.execute("SELECT id FROM messages WHERE role = 'user'") as cur:
            [(question,)] = list(await cur.fetchall())
        await store._add_attachments(question, [Attachment("notes.txt", "read", "u2's notes")])
        async with store.db.execute("SELECT id FROM messages WHERE role = 'assistant'") as cur:
            [(reply,)] = list(await cur.fetchall())
        await store.set_feedback(reply, "u2", -1)
        await store.set_feedback(reply, "admin", 1)
        mine = await store.export_records(user="u2")
        others = await store.export_records(user="u1")
    [file] = [r for r in mine if r["type"] == "attachment"]
    assert (file["message_id"], file["name"], file["text"]) == (question, "notes.txt", "u2's notes")
    assert sorted((r["user_id"], r["value"]) for r in mine if r["type"] == "feedback") == [("admin", 1), ("u2", -1)]
    assert not [r for r in others if r["type"] in ("attachment", "feedback")]
