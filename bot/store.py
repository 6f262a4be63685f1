"""The conversation store: one SQLite file, the source of truth.

aiosqlite in WAL mode; the schema version lives in ``PRAGMA user_version``
and :data:`MIGRATIONS` brings any older file up to date. Every query is
parameterized. Jobs are rows first, so a job ``queued`` or ``running`` when
the process died is found again at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import aiosqlite

from bot.errors import StoreError
from bot.types import ConversationKey, Incoming, Platform, Turn

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
PENDING: tuple[JobState, ...] = ("queued", "running")

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        workspace TEXT NOT NULL,
        channel TEXT NOT NULL,
        thread TEXT NOT NULL,
        generation INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (platform, workspace, channel, thread)
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        generation INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        platform_message_id TEXT NOT NULL,
        author_id TEXT NOT NULL,
        author_name TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        -- for a reply: the user message it answers (its row id)
        reply_to INTEGER REFERENCES messages(id),
        UNIQUE (conversation_id, role, platform_message_id)
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, generation, id);
    CREATE TABLE settings (
        scope TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_by TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, name)
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        message_id INTEGER NOT NULL REFERENCES messages(id),
        author_id TEXT NOT NULL,
        is_dm INTEGER NOT NULL,
        settings_scope TEXT NOT NULL,
        reply_ref TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_by_state ON jobs (state, id);
    """,
]


@dataclass(frozen=True)
class Job:
    id: int
    conversation_id: int
    key: ConversationKey
    message_id: int
    platform_message_id: str
    author_id: str
    is_dm: bool
    settings_scope: str
    reply_ref: dict[str, str]
    state: JobState
    attempts: int


_JOB_SELECT = """
    SELECT j.id, j.conversation_id, c.platform, c.workspace, c.channel, c.thread,
           j.message_id, m.platform_message_id, j.author_id, j.is_dm, j.settings_scope,
           j.reply_ref, j.state, j.attempts
    FROM jobs j
    JOIN conversations c ON c.id = j.conversation_id
    JOIN messages m ON m.id = j.message_id
"""


def _key_filter(key: ConversationKey) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause on ``conversations c``: one thread, or every thread of
    a channel when the key has no thread."""
    where = "c.platform = ? AND c.workspace = ? AND c.channel = ?"
    if key.thread:
        return where + " AND c.thread = ?", (key.platform, key.workspace, key.channel, key.thread)
    return where, (key.platform, key.workspace, key.channel)


def _job(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0], conversation_id=row[1],
        key=ConversationKey(row[2], row[3], row[4], row[5]),
        message_id=row[6], platform_message_id=row[7], author_id=row[8], is_dm=bool(row[9]),
        settings_scope=row[10], reply_ref=json.loads(row[11]), state=row[12], attempts=row[13],
    )


class Store:
    """Use as ``async with Store(path) as store:``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # One connection serves every coroutine: writes that span several
        # statements take this lock so that one never commits another's half.
        self._write_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            try:
                yield self.db
                await self.db.commit()
            except BaseException:
                await self.db.rollback()
                raise

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    async def open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA foreign_keys=ON")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this bot knows "
                f"({len(MIGRATIONS)}): upgrade xwin-bot"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            log.info("migrating %s to schema version %d", self.path, number)
            await self.db.executescript(
                f"BEGIN; {MIGRATIONS[number - 1]} PRAGMA user_version = {number}; COMMIT;"
            )

    async def schema_version(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- conversations and messages -------------------------------------
    async def _conversation(self, key: ConversationKey, *, create: bool) -> tuple[int, int] | None:
        sql = ("SELECT id, generation FROM conversations "
               "WHERE platform = ? AND workspace = ? AND channel = ? AND thread = ?")
        args = (key.platform, key.workspace, key.channel, key.thread)
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        if row is not None or not create:
            return (int(row[0]), int(row[1])) if row else None
        cur2 = await self.db.execute(
            "INSERT INTO conversations (platform, workspace, channel, thread, created_at) "
            "VALUES (?, ?, ?, ?, ?)", (*args, time.time()),
        )
        assert cur2.lastrowid is not None
        return cur2.lastrowid, 0

    async def has_conversation(self, key: ConversationKey) -> bool:
        return await self._conversation(key, create=False) is not None

    async def add_user_message(
        self, incoming: Incoming, *, settings_scope: str, with_job: bool
    ) -> tuple[int, int | None] | None:
        """Store a user turn (and its job) in one transaction.

        Returns ``(message row id, job id or None)``, or None when this
        platform message was stored before (a re-delivered event)."""
        async with self._transaction() as db:
            conv = await self._conversation(incoming.key, create=True)
            assert conv is not None
            conv_id, generation = conv
            cur = await db.execute(
                "INSERT OR IGNORE INTO messages (conversation_id, generation, role, "
                "platform_message_id, author_id, author_name, text, created_at) "
                "VALUES (?, ?, 'user', ?, ?, ?, ?, ?)",
                (conv_id, generation, incoming.message_id, incoming.author_id,
                 incoming.author_name, incoming.text, incoming.created_at),
            )
            if cur.rowcount == 0:
                return None
            message_id = cur.lastrowid
            assert message_id is not None
            if not with_job:
                return message_id, None
            jcur = await db.execute(
                "INSERT INTO jobs (conversation_id, message_id, author_id, is_dm, settings_scope, "
                "reply_ref, state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                (conv_id, message_id, incoming.author_id, int(incoming.is_dm), settings_scope,
                 json.dumps(incoming.reply_ref), time.time()),
            )
            return message_id, jcur.lastrowid

    async def add_assistant_message(self, job: Job, text: str, platform_message_id: str) -> None:
        """The reply, and its job marked done, in one transaction."""
        async with self._transaction() as db:
            gen = await self._generation(job.conversation_id)
            await db.execute(
                "INSERT OR REPLACE INTO messages (conversation_id, generation, role, "
                "platform_message_id, author_id, author_name, text, created_at, reply_to) "
                "VALUES (?, ?, 'assistant', ?, '', '', ?, ?, ?)",
                (job.conversation_id, gen, platform_message_id, text, time.time(), job.message_id),
            )
            await db.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, error = NULL WHERE id = ?",
                (time.time(), job.id),
            )

    async def _generation(self, conversation_id: int) -> int:
        async with self.db.execute(
            "SELECT generation FROM conversations WHERE id = ?", (conversation_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def history(self, job: Job, limit: int = 400) -> list[Turn]:
        """The turns of the job's conversation up to and including its own
        message, in the current generation (after the last ``forget``).

        A reply is stored after questions that were queued behind its own, so
        turns are ordered by the question they belong to, each reply right
        after its question."""
        sql = """
            SELECT role, text, author_name, platform_message_id FROM (
                SELECT m.role, m.text, m.author_name, m.platform_message_id,
                       COALESCE(m.reply_to, m.id) AS question, m.role = 'assistant' AS is_reply, m.id
                FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE m.conversation_id = ? AND m.generation = c.generation
                  AND ((m.role = 'user' AND m.id <= ?) OR (m.role = 'assistant' AND m.reply_to < ?))
                ORDER BY question DESC, is_reply DESC, m.id DESC LIMIT ?
            ) ORDER BY question, is_reply, id
        """
        args = (job.conversation_id, job.message_id, job.message_id, limit)
        async with self.db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [Turn(role=r[0], text=r[1], author_name=r[2], message_id=r[3]) for r in rows]

    async def message_count(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM messages") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def forget(self, key: ConversationKey) -> int:
        """Start over: later prompts leave out what was said before. A key
        without a thread forgets every conversation of the channel."""
        if key.thread:
            sql = ("UPDATE conversations SET generation = generation + 1 WHERE platform = ? "
                   "AND workspace = ? AND channel = ? AND thread = ?")
            args: tuple[str, ...] = (key.platform, key.workspace, key.channel, key.thread)
        else:
            sql = ("UPDATE conversations SET generation = generation + 1 "
                   "WHERE platform = ? AND workspace = ? AND channel = ?")
            args = (key.platform, key.workspace, key.channel)
        async with self._transaction() as db:
            cur = await db.execute(sql, args)
        return cur.rowcount

    async def purge_messages_older_than(self, days: float) -> int:
        """Retention: delete for good the messages older than ``days`` (with
        their finished jobs and the replies to them), except those a pending
        job still needs. Returns how many messages went. Conversation rows
        (ids, no text) stay: the bot still knows its threads."""
        cutoff = time.time() - days * 86400
        async with self._transaction() as db:
            await db.execute("DROP TABLE IF EXISTS temp.doomed")
            await db.execute(
                "CREATE TEMP TABLE doomed AS SELECT id FROM messages WHERE (created_at < ? OR reply_to IN "
                "(SELECT id FROM messages WHERE created_at < ?)) AND id NOT IN "
                "(SELECT message_id FROM jobs WHERE state IN ('queued', 'running'))", (cutoff, cutoff),
            )
            # A reply whose question stays (it is pending) stays too.
            await db.execute(
                "DELETE FROM doomed WHERE id IN (SELECT m.id FROM messages m WHERE m.reply_to IS NOT NULL "
                "AND m.reply_to NOT IN (SELECT id FROM doomed))"
            )
            cur = await self._delete_messages(db, "SELECT id FROM doomed")
            await db.execute("DROP TABLE temp.doomed")
        return cur

    @staticmethod
    async def _delete_messages(db: aiosqlite.Connection, ids_sql: str, args: Sequence[Any] = ()) -> int:
        """Delete the messages ``ids_sql`` selects, their jobs first and the
        replies before the questions (foreign keys are on)."""
        await db.execute(f"DELETE FROM jobs WHERE message_id IN ({ids_sql})", args)
        replies = await db.execute(f"DELETE FROM messages WHERE reply_to IS NOT NULL AND id IN ({ids_sql})", args)
        rest = await db.execute(f"DELETE FROM messages WHERE id IN ({ids_sql})", args)
        return max(replies.rowcount, 0) + max(rest.rowcount, 0)

    # -- privacy: erase and export (issue 12) -----------------------------
    async def delete_conversations(self, key: ConversationKey) -> int | None:
        """Erase for good the messages and jobs of a conversation (of every
        thread of the channel when the key has no thread). None, and nothing
        erased, while a reply is pending there. Returns how many messages
        went. The conversation row (ids, no text) stays, a new generation, so
        that the thread goes on as a new conversation."""
        where, args = _key_filter(key)
        conversations = f"SELECT id FROM conversations c WHERE {where}"
        async with self._transaction() as db:
            async with db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') "
                f"AND conversation_id IN ({conversations})", args,
            ) as cur:
                row = await cur.fetchone()
            if row and row[0]:
                return None
            await db.execute(f"DELETE FROM jobs WHERE conversation_id IN ({conversations})", args)
            count = await self._delete_messages(
                db, f"SELECT id FROM messages WHERE conversation_id IN ({conversations})", args
            )
            await db.execute(f"UPDATE conversations SET generation = generation + 1 WHERE id IN ({conversations})",
                             args)
        return count

    async def export_records(self, *, user: str | None = None,
                             conversation: ConversationKey | None = None) -> list[dict[str, Any]]:
        """What the store holds about a user (their messages, the replies to
        them, their jobs and their own settings) or about a conversation (its
        messages and jobs, and its channel's settings), as plain records."""
        if (user is None) == (conversation is None):
            raise ValueError("export one user or one conversation")
        if user is not None:
            msg_where = "m.author_id = ? OR m.reply_to IN (SELECT id FROM messages WHERE author_id = ?)"
            msg_args: tuple[Any, ...] = (user, user)
            job_where = "j.author_id = ?"
            job_args: tuple[Any, ...] = (user,)
            scopes = [f"user:{p}:{user}" for p in get_args(Platform)]
            set_where = f"scope IN ({','.join('?' * len(scopes))}) OR updated_by = ?"
            set_args: tuple[Any, ...] = (*scopes, user)
        else:
            assert conversation is not None
            where, args = _key_filter(conversation)
            msg_where = job_where = where
            msg_args = job_args = args
            channel = conversation.channel_key()
            set_where = "scope = ?"
            set_args = (f"channel:{channel.platform}:{channel.workspace}:{channel.channel}",)
        records = await self._records(
            "message", "SELECT m.id, c.platform, c.workspace, c.channel, c.thread, m.generation, m.role, "
            "m.platform_message_id, m.author_id, m.author_name, m.text, m.created_at, m.reply_to "
            f"FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE {msg_where} ORDER BY m.id",
            msg_args,
        )
        records += await self._records(
            "job", "SELECT j.id, c.platform, c.workspace, c.channel, c.thread, j.message_id, j.author_id, "
            "j.is_dm, j.settings_scope, j.state, j.attempts, j.error, j.created_at, j.started_at, j.finished_at "
            f"FROM jobs j JOIN conversations c ON c.id = j.conversation_id WHERE {job_where} ORDER BY j.id",
            job_args,
        )
        records += await self._records(
            "setting", "SELECT scope, name, value, updated_by, updated_at FROM settings "
            f"WHERE {set_where} ORDER BY scope, name", set_args,
        )
        return records

    async def _records(self, kind: str, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        async with self.db.execute(sql, args) as cur:
            names = [d[0] for d in cur.description]
            rows = await cur.fetchall()
        records = []
        for row in rows:
            record: dict[str, Any] = {"type": kind, **dict(zip(names, row, strict=True))}
            if "platform" in record:
                record["conversation"] = ":".join(
                    str(record.pop(k)) for k in ("platform", "workspace", "channel", "thread")
                ).rstrip(":")
            records.append(record)
        return records

    # -- jobs ------------------------------------------------------------
    async def job(self, job_id: int) -> Job | None:
        async with self.db.execute(_JOB_SELECT + " WHERE j.id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None

    async def pending_jobs(self) -> list[Job]:
        sql = _JOB_SELECT + " WHERE j.state IN ('queued', 'running') ORDER BY j.id"
        async with self.db.execute(sql) as cur:
            return [_job(r) for r in await cur.fetchall()]

    async def jobs_in(self, key: ConversationKey, states: Sequence[JobState] = PENDING) -> list[Job]:
        """Jobs of a conversation (or of every thread of a channel, when the
        key has no thread)."""
        marks = ",".join("?" * len(states))
        where = "c.platform = ? AND c.workspace = ? AND c.channel = ?"
        args: list[Any] = [key.platform, key.workspace, key.channel]
        if key.thread:
            where += " AND c.thread = ?"
            args.append(key.thread)
        sql = f"{_JOB_SELECT} WHERE {where} AND j.state IN ({marks}) ORDER BY j.id"
        async with self.db.execute(sql, (*args, *states)) as cur:
            return [_job(r) for r in await cur.fetchall()]

    async def job_for_message(self, key: ConversationKey, platform_message_id: str) -> Job | None:
        sql = (_JOB_SELECT + " WHERE c.platform = ? AND c.workspace = ? AND c.channel = ? "
               "AND c.thread = ? AND m.platform_message_id = ? ORDER BY j.id DESC LIMIT 1")
        args = (key.platform, key.workspace, key.channel, key.thread, platform_message_id)
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None

    async def set_job_state(self, job_id: int, state: JobState, error: str | None = None) -> bool:
        """Move a job on; a job already finished stays finished. True if it moved."""
        now = time.time()
        if state == "running":
            sql = ("UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1 "
                   "WHERE id = ? AND state IN ('queued', 'running')")
            args: tuple[Any, ...] = (now, job_id)
        else:
            sql = ("UPDATE jobs SET state = ?, finished_at = ?, error = ? "
                   "WHERE id = ? AND state IN ('queued', 'running')")
            args = (state, now, error, job_id)
        async with self._transaction() as db:
            cur = await db.execute(sql, args)
        return cur.rowcount > 0

    async def count_pending(self, author_id: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
        args: tuple[str, ...] = ()
        if author_id is not None:
            sql += " AND author_id = ?"
            args = (author_id,)
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def jobs_ahead(self, job_id: int) -> int:
        """Jobs queued or running that were created before this one."""
        async with self.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND id < ?", (job_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- settings --------------------------------------------------------
    async def settings(self, scope: str) -> dict[str, Any]:
        async with self.db.execute("SELECT name, value FROM settings WHERE scope = ?", (scope,)) as cur:
            return {name: json.loads(value) for name, value in await cur.fetchall()}

    async def set_setting(self, scope: str, name: str, value: Any, updated_by: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO settings (scope, name, value, updated_by, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, "
                "updated_by = excluded.updated_by, updated_at = excluded.updated_at",
                (scope, name, json.dumps(value), updated_by, time.time()),
            )

    async def reset_settings(self, scope: str, name: str | None = None) -> int:
        async with self._transaction() as db:
            if name is None:
                cur = await db.execute("DELETE FROM settings WHERE scope = ?", (scope,))
            else:
                cur = await db.execute("DELETE FROM settings WHERE scope = ? AND name = ?", (scope, name))
        return cur.rowcount
