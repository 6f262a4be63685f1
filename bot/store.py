"""The conversation store: one SQLite file, the source of truth.

aiosqlite in WAL mode; the schema version lives in ``PRAGMA user_version``
and :data:`MIGRATIONS` brings any older file up to date. Every query is
parameterized. Jobs are rows first, so a job ``queued`` or ``running`` when
the process died is found again at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import aiosqlite

from bot.errors import StoreError
from bot.types import Attachment, ConversationKey, Incoming, Platform, Turn

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
#: ``reply`` answers a question; ``continue`` extends the reply ``target``;
#: ``regenerate`` answers the question again, replacing ``target``.
JobKind = Literal["reply", "continue", "regenerate"]
#: Why a reply ended: ``length`` = cut at max_new_tokens (it can be continued).
FinishReason = Literal["stop", "length"]
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
    # 2 (issue 11): text files attached to user messages, as the model reads them
    """
    CREATE TABLE attachments (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('read', 'cut', 'skipped')),
        text TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (message_id, position)
    );
    """,
    # 3 (issue 12, quotas): what each user used, so that a restart does not reset
    # their limits. kind 'message': a message that got a job (amount 1);
    # 'tokens': tokens of the bot's replies to them.
    """
    CREATE TABLE usage (
        platform TEXT NOT NULL,
        author_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('message', 'tokens')),
        amount INTEGER NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX usage_by_author ON usage (platform, author_id, kind, at);
    -- /healthz writes its one row here to prove the file takes writes.
    CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL);
    """,
    # 4 (issue 11: Continue, Regenerate, Feedback): why a reply ended ('length' =
    # cut at max_new_tokens), replies replaced by a regeneration (kept, left out of
    # prompts), what a job does to an existing reply, and one vote per user and reply.
    """
    ALTER TABLE messages ADD COLUMN finish_reason TEXT;
    ALTER TABLE messages ADD COLUMN replaced INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'reply'
        CHECK (kind IN ('reply', 'continue', 'regenerate'));
    ALTER TABLE jobs ADD COLUMN target INTEGER;
    CREATE TABLE feedback (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        value INTEGER NOT NULL CHECK (value IN (-1, 1)),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (message_id, user_id)
    );
    """,
]

UsageKind = Literal["message", "tokens"]
#: Usage rows older than this are deleted as new ones come (the longest quota window is a day).
USAGE_KEPT_S = 2 * 86400


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
    kind: JobKind = "reply"
    #: The reply a ``continue``/``regenerate`` job works on (its row id).
    target: int | None = None


@dataclass(frozen=True)
class StoredReply:
    """An assistant message, with what the buttons on it need to know."""

    id: int
    key: ConversationKey
    conversation_id: int
    question_id: int
    asker_id: str
    text: str
    finish_reason: FinishReason | None
    replaced: bool
    created_at: float
    #: Still in the conversation the model sees, and nothing was asked after it.
    is_last: bool


_JOB_SELECT = """
    SELECT j.id, j.conversation_id, c.platform, c.workspace, c.channel, c.thread,
           j.message_id, m.platform_message_id, j.author_id, j.is_dm, j.settings_scope,
           j.reply_ref, j.state, j.attempts, j.kind, j.target
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
        kind=row[14], target=row[15],
    )


SQLITE_HEADER = b"SQLite format 3\x00"


class _ProcessLock:
    """One process per database (issue 9): an OS lock on ``<database>.lock``,
    held for the store's life. The kernel drops it when the process dies, so
    a killed bot never blocks the next start."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise StoreError(
                f"another xwin-bot process (pid {owner}) is using the database {self.db_path}; "
                "stop it first, or give this one its own [bot] database"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _check_database_file(path: Path) -> None:
    """Refuse what is not a database file before SQLite gets to write into it."""
    if str(path) in ("", "."):
        raise StoreError("the database path is empty; set [bot] database to a file name")
    if path.is_dir():
        raise StoreError(f"the database {path} is a directory; set [bot] database to a file")
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if head != SQLITE_HEADER:
            raise StoreError(
                f"{path} is not an SQLite database (it holds something else); "
                "refusing to overwrite it: set [bot] database to another file"
            )


class Store:
    """Use as ``async with Store(path) as store:``.

    One process at a time: opening a database another live process holds
    raises :class:`StoreError`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._lock: _ProcessLock | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
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
        """Lock, open and migrate; on any failure nothing stays open (an open
        aiosqlite thread would keep the process from exiting)."""
        try:
            await self._open()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
                raise StoreError(
                    f"cannot open the database {self.path} ({reason}); check [bot] database"
                ) from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(
                    f"cannot use the database {self.path} ({exc}); check [bot] database"
                ) from None
            raise

    async def _open(self) -> None:
        _check_database_file(self.path)
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _ProcessLock(self.path)
        self._lock.acquire()
        self._db = await aiosqlite.connect(self.path)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA foreign_keys=ON")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await self._migrate()
        stat = self.path.stat()
        self._identity = (stat.st_dev, stat.st_ino)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- the file itself (issue 9) ----------------------------------------
    def file_problem(self) -> str | None:
        """What happened to the database file since it was opened, if anything."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return "was deleted"
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if (stat.st_dev, stat.st_ino) != self._identity:
            return "was replaced by another file"
        return None

    async def watch(self, interval: float = 5.0) -> None:
        """Runs until the database file is deleted or replaced under the running
        bot, then saves what the open connection still holds (pending questions
        included) and raises :class:`StoreError` saying where."""
        while True:
            await asyncio.sleep(interval)
            problem = self.file_problem()
            if problem is not None:
                saved = await self._save_copy()
                raise StoreError(
                    f"the database {self.path} {problem} while the bot ran; what it held was saved "
                    f"to {saved}; stopping"
                )

    async def _save_copy(self) -> Path:
        target = self.path
        if target.exists():  # someone else's file now: leave it alone
            target = self.path.with_name(f"{self.path.name}.recovered-{int(time.time())}")
        async with self._write_lock:
            await self.db.execute("VACUUM INTO ?", (str(target),))
        log.error("database %s saved from the open connection to %s", self.path, target)
        return target

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
        self, incoming: Incoming, *, settings_scope: str, with_job: bool,
        attachments: Sequence[Attachment] = (),
    ) -> tuple[int, int | None] | None:
        """Store a user turn (with its attached files, and its job) in one transaction.

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
            await self._add_attachments(message_id, attachments)
            if not with_job:
                return message_id, None
            jcur = await db.execute(
                "INSERT INTO jobs (conversation_id, message_id, author_id, is_dm, settings_scope, "
                "reply_ref, state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                (conv_id, message_id, incoming.author_id, int(incoming.is_dm), settings_scope,
                 json.dumps(incoming.reply_ref), time.time()),
            )
            return message_id, jcur.lastrowid

    async def _add_attachments(self, message_id: int, attachments: Sequence[Attachment]) -> None:
        await self.db.executemany(
            "INSERT INTO attachments (message_id, position, name, status, text, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(message_id, i, a.name, a.status, a.text, a.reason) for i, a in enumerate(attachments)],
        )

    async def attachments(self, message_ids: Sequence[int]) -> dict[int, tuple[Attachment, ...]]:
        """The files of these messages, by message row id, in the order attached."""
        found: dict[int, list[Attachment]] = {}
        for start in range(0, len(message_ids), 500):
            chunk = list(message_ids[start : start + 500])
            sql = ("SELECT message_id, name, status, text, reason FROM attachments "
                   f"WHERE message_id IN ({','.join('?' * len(chunk))}) ORDER BY message_id, position")
            async with self.db.execute(sql, chunk) as cur:
                for row in await cur.fetchall():
                    found.setdefault(int(row[0]), []).append(Attachment(row[1], row[2], row[3], row[4]))
        return {k: tuple(v) for k, v in found.items()}

    async def add_assistant_message(self, job: Job, text: str, platform_message_id: str,
                                    finish_reason: FinishReason | None = None) -> int:
        """The reply, and its job marked done, in one transaction. A ``continue``
        job rewrites its target reply (the two parts joined); a ``regenerate`` job
        marks its target replaced. Returns the reply's row id."""
        async with self._transaction() as db:
            if job.kind == "continue" and job.target is not None:
                await db.execute("UPDATE messages SET text = ?, finish_reason = ? WHERE id = ?",
                                 (text, finish_reason, job.target))
                reply_id: int | None = job.target
            else:
                if job.kind == "regenerate" and job.target is not None:
                    await db.execute("UPDATE messages SET replaced = 1 WHERE id = ?", (job.target,))
                gen = await self._generation(job.conversation_id)
                cur = await db.execute(
                    "INSERT OR REPLACE INTO messages (conversation_id, generation, role, "
                    "platform_message_id, author_id, author_name, text, created_at, reply_to, "
                    "finish_reason) VALUES (?, ?, 'assistant', ?, '', '', ?, ?, ?, ?)",
                    (job.conversation_id, gen, platform_message_id, text, time.time(), job.message_id,
                     finish_reason),
                )
                reply_id = cur.lastrowid
            await db.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, error = NULL WHERE id = ?",
                (time.time(), job.id),
            )
        assert reply_id is not None
        return reply_id

    async def reply(self, reply_id: int) -> StoredReply | None:
        sql = """
            SELECT m.id, c.platform, c.workspace, c.channel, c.thread, m.conversation_id, q.id,
                   q.author_id, m.text, m.finish_reason, m.replaced, m.created_at,
                   m.generation = c.generation AND m.replaced = 0 AND NOT EXISTS (
                       SELECT 1 FROM messages later WHERE later.conversation_id = m.conversation_id
                         AND later.role = 'user' AND later.id > q.id)
            FROM messages m
            JOIN conversations c ON c.id = m.conversation_id
            JOIN messages q ON q.id = m.reply_to
            WHERE m.id = ? AND m.role = 'assistant'
        """
        async with self.db.execute(sql, (reply_id,)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return StoredReply(
            id=r[0], key=ConversationKey(r[1], r[2], r[3], r[4]), conversation_id=r[5], question_id=r[6],
            asker_id=r[7], text=r[8], finish_reason=r[9], replaced=bool(r[10]), created_at=r[11],
            is_last=bool(r[12]),
        )

    async def last_reply_id(self, key: ConversationKey) -> int | None:
        """The newest reply the model still sees in this conversation."""
        sql = ("SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
               "WHERE c.platform = ? AND c.workspace = ? AND c.channel = ? AND c.thread = ? "
               "AND m.role = 'assistant' AND m.replaced = 0 AND m.generation = c.generation "
               "ORDER BY m.id DESC LIMIT 1")
        async with self.db.execute(sql, (key.platform, key.workspace, key.channel, key.thread)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None

    async def question_job(self, reply: StoredReply) -> Job | None:
        """The job that first answered ``reply``'s question (its asker and settings)."""
        async with self.db.execute(_JOB_SELECT + " WHERE j.message_id = ? ORDER BY j.id LIMIT 1",
                                   (reply.question_id,)) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None

    async def add_reply_job(self, reply: StoredReply, kind: JobKind, reply_ref: dict[str, str]) -> int | None:
        """A ``continue`` or ``regenerate`` job on ``reply``, with the settings
        and asker of the job that answered its question. None if that is gone."""
        first = await self.question_job(reply)
        if first is None:
            return None
        async with self._transaction() as db:
            cur = await db.execute(
                "INSERT INTO jobs (conversation_id, message_id, author_id, is_dm, settings_scope, "
                "reply_ref, state, created_at, kind, target) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (reply.conversation_id, reply.question_id, first.author_id, int(first.is_dm),
                 first.settings_scope, json.dumps(reply_ref), time.time(), kind, reply.id),
            )
            return cur.lastrowid

    async def set_feedback(self, reply_id: int, user_id: str, value: int) -> Literal["new", "changed", "same"]:
        """One vote per user and reply: a second click with the same value
        changes nothing; the other value replaces the vote."""
        async with self._transaction() as db:
            async with db.execute(
                "SELECT value FROM feedback WHERE message_id = ? AND user_id = ?", (reply_id, user_id)
            ) as cur:
                row = await cur.fetchone()
            if row is not None and int(row[0]) == value:
                return "same"
            now = time.time()
            await db.execute(
                "INSERT INTO feedback (message_id, user_id, value, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id, user_id) DO UPDATE SET "
                "value = excluded.value, updated_at = excluded.updated_at",
                (reply_id, user_id, value, now, now),
            )
        return "new" if row is None else "changed"

    async def feedback_rows(self) -> list[tuple[int, str, int, float]]:
        """Every vote: (reply id, user id, value, time), oldest first."""
        async with self.db.execute(
            "SELECT message_id, user_id, value, updated_at FROM feedback ORDER BY updated_at, message_id"
        ) as cur:
            return [(int(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in await cur.fetchall()]

    async def take_back_reply(self, job: Job, platform_message_id: str, error: str,
                              before: str | None = None) -> None:
        """The stored reply never reached the chat: remove it and fail the job,
        in one transaction (what the user did not see is not history). A
        ``continue`` job's target gets its text ``before`` back, cut as it was."""
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND role = 'assistant' "
                "AND platform_message_id = ?", (job.conversation_id, platform_message_id),
            )
            if job.kind == "regenerate" and job.target is not None:  # the old reply stands again
                await db.execute("UPDATE messages SET replaced = 0 WHERE id = ?", (job.target,))
            if job.kind == "continue" and job.target is not None and before is not None:
                await db.execute("UPDATE messages SET text = ?, finish_reason = 'length' WHERE id = ?",
                                 (before, job.target))
            await db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ? AND state = 'done'",
                (time.time(), error, job.id),
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
            SELECT role, text, author_name, platform_message_id, id FROM (
                SELECT m.role, m.text, m.author_name, m.platform_message_id,
                       COALESCE(m.reply_to, m.id) AS question, m.role = 'assistant' AS is_reply, m.id
                FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE m.conversation_id = ? AND m.generation = c.generation AND m.replaced = 0
                  AND ((m.role = 'user' AND m.id <= ?) OR (m.role = 'assistant' AND m.reply_to < ?))
                ORDER BY question DESC, is_reply DESC, m.id DESC LIMIT ?
            ) ORDER BY question, is_reply, id
        """
        args = (job.conversation_id, job.message_id, job.message_id, limit)
        async with self.db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        files = await self.attachments([int(r[4]) for r in rows if r[0] == "user"])
        return [Turn(role=r[0], text=r[1], author_name=r[2], message_id=r[3],
                     attachments=files.get(int(r[4]), ())) for r in rows]

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
        # Files read into those messages, and votes on those replies (a user's own votes too).
        records += await self._records(
            "attachment", "SELECT a.message_id, a.position, a.name, a.status, a.text, a.reason "
            "FROM attachments a JOIN messages m ON m.id = a.message_id "
            f"JOIN conversations c ON c.id = m.conversation_id WHERE {msg_where} ORDER BY a.message_id, a.position",
            msg_args,
        )
        vote_where = f"({msg_where})" + (" OR f.user_id = ?" if user is not None else "")
        records += await self._records(
            "feedback", "SELECT f.message_id, f.user_id, f.value, f.created_at, f.updated_at "
            "FROM feedback f JOIN messages m ON m.id = f.message_id "
            f"JOIN conversations c ON c.id = m.conversation_id WHERE {vote_where} ORDER BY f.message_id, f.user_id",
            (*msg_args, user) if user is not None else msg_args,
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

    async def set_reply_messages(self, job_id: int, message_ids: Sequence[str]) -> None:
        """Where the job's reply is shown (placeholder, partial text): kept in
        its ``reply_ref["messages"]`` so that a restart resumes into those
        messages instead of leaving them stale (issue 9)."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET reply_ref = json_set(reply_ref, '$.messages', ?) WHERE id = ?",
                (",".join(message_ids), job_id),
            )

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

    # -- usage (issue 12: quotas) ----------------------------------------
    async def add_usage(self, platform: str, author_id: str, kind: UsageKind, amount: int,
                        at: float | None = None) -> None:
        """Count what a user used; anyone's rows older than two days go (a user
        who stopped writing leaves no trace there after that)."""
        now = time.time() if at is None else at
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO usage (platform, author_id, kind, amount, at) VALUES (?, ?, ?, ?, ?)",
                (platform, author_id, kind, amount, now),
            )
            await db.execute("DELETE FROM usage WHERE at < ?", (now - USAGE_KEPT_S,))

    async def usage_since(self, platform: str, author_id: str, kind: UsageKind, since: float) -> int:
        """The sum of a user's ``kind`` since a time."""
        sql = ("SELECT COALESCE(SUM(amount), 0) FROM usage "
               "WHERE platform = ? AND author_id = ? AND kind = ? AND at >= ?")
        async with self.db.execute(sql, (platform, author_id, kind, since)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def nth_latest_usage(self, platform: str, author_id: str, kind: UsageKind, n: int) -> float | None:
        """When the user's ``n``-th latest ``kind`` row was counted (1 = the latest)."""
        sql = ("SELECT at FROM usage WHERE platform = ? AND author_id = ? AND kind = ? "
               "ORDER BY at DESC LIMIT 1 OFFSET ?")
        async with self.db.execute(sql, (platform, author_id, kind, n - 1)) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    async def check_writable(self) -> None:
        """Raise unless the file takes writes now (for /healthz): one real write
        of one row (SQLite grants a write lock even on a read-only file)."""
        async with self._transaction() as db:
            await db.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),))

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
