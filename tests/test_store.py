from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bot.errors import StoreError
from bot.store import MIGRATIONS, Store
from bot.types import ConversationKey, Incoming

KEY = ConversationKey("discord", "g1", "c1", "t1")


def incoming(mid: str, text: str = "hello", key: ConversationKey = KEY, author: str = "u1") -> Incoming:
    return Incoming(key, mid, author, "Aki", text, False, time.time(), {"channel": "c1"})


async def test_schema_version_and_wal(store: Store, db_path: Path) -> None:
    assert await store.schema_version() == len(MIGRATIONS)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer"):
        async with Store(db_path):
            pass


async def test_message_and_job_are_stored_once(store: Store) -> None:
    first = await store.add_user_message(incoming("m1"), settings_scope="s", with_job=True)
    assert first is not None and first[1] is not None
    assert await store.add_user_message(incoming("m1"), settings_scope="s", with_job=True) is None
    job = await store.job(first[1])
    assert job is not None and job.state == "queued" and job.reply_ref == {"channel": "c1"}
    assert [t.text for t in await store.history(job)] == ["hello"]
    assert await store.count_pending() == 1 and await store.count_pending("u1") == 1


async def test_text_is_stored_verbatim(store: Store) -> None:
    nasty = "Robert'); DROP TABLE messages;-- \x00 </s> 🙂"
    stored = await store.add_user_message(incoming("m1", nasty), settings_scope="s", with_job=True)
    assert stored is not None and stored[1] is not None
    job = await store.job(stored[1])
    assert job is not None
    assert (await store.history(job))[0].text == nasty


async def test_history_stops_at_the_jobs_message_and_after_forget(store: Store) -> None:
    a = await store.add_user_message(incoming("m1", "one"), settings_scope="s", with_job=True)
    b = await store.add_user_message(incoming("m2", "two"), settings_scope="s", with_job=True)
    assert a and b and a[1] and b[1]
    job_a = await store.job(a[1])
    assert job_a is not None
    assert [t.text for t in await store.history(job_a)] == ["one"]
    await store.add_assistant_message(job_a, "reply one", "job:1")
    job_b = await store.job(b[1])
    assert job_b is not None
    # The reply was stored after m2 was queued, and still comes right after its question.
    assert [t.text for t in await store.history(job_b)] == ["one", "reply one", "two"]
    assert (await store.job(a[1])).state == "done"  # type: ignore[union-attr]
    await store.forget(KEY)
    c = await store.add_user_message(incoming("m3", "three"), settings_scope="s", with_job=True)
    assert c and c[1]
    job_c = await store.job(c[1])
    assert job_c is not None
    assert [t.text for t in await store.history(job_c)] == ["three"]
    assert await store.message_count() == 4  # forgotten, not deleted


async def test_settings_per_scope(store: Store) -> None:
    await store.set_setting("channel:x", "temperature", 0.3, "u1")
    await store.set_setting("channel:x", "temperature", 0.4, "u1")
    await store.set_setting("channel:y", "top_k", 5, "u1")
    assert await store.settings("channel:x") == {"temperature": 0.4}
    assert await store.reset_settings("channel:x") == 1
    assert await store.settings("channel:x") == {}


async def test_retention_purges_only_old_finished_messages(store: Store) -> None:
    old = Incoming(KEY, "old", "u1", "Aki", "old text", False, time.time() - 40 * 86400)
    stored = await store.add_user_message(old, settings_scope="s", with_job=False)
    pending = Incoming(KEY, "old2", "u1", "Aki", "old but pending", False, time.time() - 40 * 86400)
    await store.add_user_message(pending, settings_scope="s", with_job=True)
    await store.add_user_message(incoming("new"), settings_scope="s", with_job=False)
    assert stored is not None
    assert await store.purge_messages_older_than(30) == 1
    assert await store.message_count() == 2
