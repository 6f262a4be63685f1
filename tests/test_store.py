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


# ---------------------------------------------------------------- issue 9: one process, files that are not ours

_HOLD = """
import asyncio, sys
from bot.store import Store
async def main():
    async with Store(sys.argv[1]):
        print("open", flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_a_second_store_on_one_database_is_refused(store: Store, db_path: Path) -> None:
    with pytest.raises(StoreError, match=r"another xwin-bot process \(pid \d+\) is using the database"):
        await Store(db_path).open()
    assert await store.count_pending() == 0  # the first one is untouched


async def test_a_killed_process_does_not_keep_the_database_locked(db_path: Path) -> None:
    import asyncio
    import os
    import sys

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD, str(db_path), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"open\n"
        with pytest.raises(StoreError, match=f"pid {child.pid}"):
            await Store(db_path).open()
    finally:
        child.kill()  # SIGKILL: no clean-up runs in the child
        await child.wait()
    async with Store(db_path) as store:  # the stale lock file is no obstacle
        assert await store.schema_version() == len(MIGRATIONS)


@pytest.mark.parametrize("content", [b"x", b"not a database at all, just some text\n" * 10])
def test_a_file_that_is_not_a_database_is_refused_and_left_alone(db_path: Path, content: bytes) -> None:
    import asyncio

    db_path.write_bytes(content)
    with pytest.raises(StoreError, match="not an SQLite database"):
        asyncio.run(Store(db_path).open())
    assert db_path.read_bytes() == content


@pytest.mark.parametrize("where", ["dir", "under-file", "proc"])
async def test_a_bad_database_path_is_one_sentence(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    path = {"dir": tmp_path, "under-file": tmp_path / "file" / "db.sqlite3", "proc": Path("/proc/db.sqlite3")}[where]
    with pytest.raises(StoreError, match=r"\[bot\] database") as info:
        await Store(path).open()
    assert "\n" not in str(info.value)


async def test_a_deleted_database_is_noticed_and_its_pending_questions_saved(db_path: Path) -> None:
    import asyncio
    import contextlib
    import os

    from bot.main import _until_stop_or_adapter_dies

    async with Store(db_path) as store:
        await store.add_user_message(incoming("m1", "still waiting"), settings_scope="s", with_job=True)
        assert store.file_problem() is None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{db_path}{suffix}")
        with pytest.raises(StoreError, match=r"was deleted while the bot ran; what it held was saved to"):
            # As `xwin-bot run` waits: until a signal, a dead adapter, or this.
            await _until_stop_or_adapter_dies([], asyncio.Event(), store.watch(interval=0.01))
    async with Store(db_path) as store:  # the next start finds the question
        [job] = await store.pending_jobs()
        assert [t.text for t in await store.history(job)] == ["still waiting"]


async def test_a_replaced_database_is_left_alone_and_ours_saved_beside_it(db_path: Path) -> None:
    import os

    async with Store(db_path) as store:
        await store.add_user_message(incoming("m1"), settings_scope="s", with_job=True)
        other = db_path.with_name("other.sqlite3")
        sqlite3.connect(other).close()
        os.replace(other, db_path)
        with pytest.raises(StoreError, match="was replaced by another file") as info:
            await store.watch(interval=0.01)
    saved = Path(str(info.value).split("saved to ")[1].split(";")[0])
    assert saved.name.startswith("bot.sqlite3.recovered-")
    with sqlite3.connect(saved) as raw:
        assert raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0  # untouched


async def test_old_usage_rows_go_whoever_writes_next(tmp_path: Path) -> None:
    """Quota counts are kept two days: a user who stopped writing leaves no usage rows after that."""
    async with Store(tmp_path / "db.sqlite3") as store:
        now = time.time()
        await store.add_usage("slack", "gone", "message", 1, at=now - 3 * 86400)
        await store.add_usage("slack", "gone", "tokens", 40, at=now - 3 * 86400)
        await store.add_usage("discord", "active", "message", 1, at=now)
        async with store.db.execute("SELECT DISTINCT author_id FROM usage") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["active"]
