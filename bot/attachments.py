"""Text files attached to a message: which are read, how much, and what the
reply says about the rest.

The adapter describes each file (:class:`~bot.types.RemoteFile`) and brings a
:class:`FileFetcher` that downloads from its platform's own servers only. Here,
platform-free:

- **which**: at most ``max_files`` per message; a content type that can only
  be binary (images, audio, PDF, archives...) is skipped without a download;
  text types and unknown ones are downloaded, then kept only if they are UTF-8
  text (no NUL bytes, hardly any control characters). The extension is never
  looked at.
- **how much**: ``max_file_bytes`` per file (the fetcher stops reading one byte
  past it), then all files of one message together within ``context_share`` of
  the model's context, in tokens. A cut file keeps its beginning.
- **what is said**: :func:`files_notice`, e.g. "I read a.log (first 40 KB) and
  skipped photo.png: I read text files only."
- **how the model sees them**: :func:`with_files` joins them to the turn's text
  with their names; the prompt builder then defuses role markers in the whole
  turn, and encodes it as plain text (``</s>`` in a file is four characters).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.config import AttachmentsConfig
from bot.engine.base import Engine, PromptTokenizer
from bot.errors import BotError
from bot.types import Attachment, RemoteFile

log = logging.getLogger(__name__)

NOT_TEXT = "I read text files only"
NOT_UTF8 = "I read UTF-8 text files only"
TOO_MANY = "I read at most {n} files per message"
NO_ROOM = "the model's context has no room left for it"
NOT_FETCHED = "I could not download it"
TURNED_OFF = "reading files is turned off here"

_TEXT_TYPES = frozenset({
    "application/json", "application/ld+json", "application/x-ndjson", "application/xml",
    "application/javascript", "application/ecmascript", "application/x-javascript",
    "application/typescript", "application/x-sh", "application/x-shellscript",
    "application/yaml", "application/x-yaml", "application/toml", "application/sql",
    "application/csv", "application/x-python", "application/x-python-code",
    "application/x-httpd-php", "application/graphql", "application/x-tex", "application/x-latex",
    "application/x-subrip", "application/rtf", "application/x-diff", "application/x-patch",
})
#: Types that say nothing: the UTF-8 check decides.
_UNKNOWN_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_NAME_UNSAFE = re.compile(r"[\x00-\x1f\x7f\[\]\"]+")


class FetchError(BotError):
    """A file could not be downloaded; ``str(exc)`` is one clause for the user
    (the details are logged where they happen)."""


class FileFetcher(Protocol):
    async def fetch(self, file: RemoteFile, max_bytes: int) -> bytes:
        """The file's first bytes: at most ``max_bytes + 1`` (one more tells
        that it was longer). Raises :class:`FetchError`."""
        ...


def content_kind(content_type: str) -> str:
    """``"text"``, ``"binary"`` or ``"unknown"`` for a MIME type (parameters ignored)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in _UNKNOWN_TYPES:
        return "unknown"
    if mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+json", "+xml", "+yaml")):
        return "text"
    return "binary"


def decode_text(data: bytes, *, cut: bool) -> str | None:
    """``data`` as text, or None when it is not UTF-8 text. A ``cut`` file may
    end inside a character: that partial character is dropped."""
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (cut and exc.end == len(data) and len(data) - exc.start < 4):
            return None
        try:
            text = data[: exc.start].decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = text.removeprefix("\ufeff")
    if len(_CONTROL.findall(text[:65536])) > max(2, len(text[:65536]) // 100):
        return None
    return text


def size_text(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{round(n / 1024)} KB"


def safe_name(name: str) -> str:
    """A file name fit to show the model and the user: one line, no brackets or quotes."""
    cleaned = _NAME_UNSAFE.sub(" ", name).strip()
    return (cleaned or "file")[:100]


@dataclass(frozen=True)
class _Budget:
    """Tokens left for the files of one message."""

    tokenizer: PromptTokenizer
    tokens: int

    def take(self, text: str) -> tuple[_Budget, str, bool]:
        """(what is left, the part of ``text`` that fits, whether it was cut)."""
        ids = self.tokenizer.encode_text(text)
        if len(ids) <= self.tokens:
            return _Budget(self.tokenizer, self.tokens - len(ids)), text, False
        kept = self.tokenizer.decode(ids[: self.tokens])
        return _Budget(self.tokenizer, 0), kept, True


class FileReader:
    """Turns a message's files into :class:`Attachment` rows (see the module doc)."""

    def __init__(self, config: AttachmentsConfig, engine: Engine) -> None:
        self.config = config
        # The engine's tokenizer and context are known once it has started.
        self.engine = engine

    async def read(self, files: Sequence[RemoteFile], fetcher: FileFetcher | None) -> tuple[Attachment, ...]:
        if not files:
            return ()
        cfg = self.config
        if not cfg.enabled or fetcher is None:
            reason = TURNED_OFF if not cfg.enabled else NOT_FETCHED
            return tuple(_skipped(f, reason) for f in files)
        wanted = [i for i, f in enumerate(files[: cfg.max_files]) if content_kind(f.content_type) != "binary"]
        fetched = dict(zip(wanted, await asyncio.gather(*(self._fetch(files[i], fetcher) for i in wanted)),
                           strict=True))
        budget = _Budget(self.engine.tokenizer, int(cfg.context_share * self.engine.context_length))
        out: list[Attachment] = []
        for i, file in enumerate(files):
            if i >= cfg.max_files:
                out.append(_skipped(file, TOO_MANY.format(n=cfg.max_files)))
            elif i not in fetched:
                out.append(_skipped(file, NOT_TEXT))
            else:
                attachment, budget = self._fit(file, fetched[i], budget)
                out.append(attachment)
        return tuple(out)

    async def _fetch(self, file: RemoteFile, fetcher: FileFetcher) -> bytes | FetchError:
        try:
            return await fetcher.fetch(file, self.config.max_file_bytes)
        except FetchError as exc:
            return exc
        except Exception:
            log.exception("downloading the attached file %r failed", file.name)
            return FetchError(NOT_FETCHED)

    def _fit(self, file: RemoteFile, data: bytes | FetchError, budget: _Budget) -> tuple[Attachment, _Budget]:
        if isinstance(data, FetchError):
            return _skipped(file, str(data) or NOT_FETCHED), budget
        cap = self.config.max_file_bytes
        cut = len(data) > cap
        text = decode_text(data[:cap], cut=cut)
        if text is None:
            reason = NOT_TEXT if content_kind(file.content_type) == "unknown" else NOT_UTF8
            return _skipped(file, reason), budget
        if budget.tokens <= 0 and text:
            return _skipped(file, NO_ROOM), budget
        budget, text, over = budget.take(text)
        return Attachment(safe_name(file.name), "cut" if cut or over else "read", text), budget


def _skipped(file: RemoteFile, reason: str) -> Attachment:
    return Attachment(safe_name(file.name), "skipped", "", reason)


def with_files(text: str, attachments: Sequence[Attachment]) -> str:
    """The turn as the model reads it: its text, then each file with its name."""
    parts = [text] if text else []
    for a in attachments:
        if a.status == "skipped":
            parts.append(f'[file "{a.name}" not read]')
            continue
        part = " (its beginning)" if a.status == "cut" else ""
        parts.append(f'[file "{a.name}"{part}]\n{a.text}\n[end of file "{a.name}"]')
    return "\n\n".join(parts)


def files_notice(attachments: Sequence[Attachment]) -> str:
    """One sentence for the top of the reply when a file was cut or skipped
    ("" when every file was read whole)."""
    if all(a.status == "read" for a in attachments):
        return ""
    read = [a.name + (f" (first {size_text(len(a.text.encode()))})" if a.status == "cut" else "")
            for a in attachments if a.status != "skipped"]
    reasons: dict[str, list[str]] = {}
    for a in attachments:
        if a.status == "skipped":
            reasons.setdefault(a.reason, []).append(a.name)
    clauses = [f"read {_join(read)}"] if read else []
    clauses += [f"skipped {_join(names)}: {reason}" for reason, names in reasons.items()]
    return "I " + " and ".join(clauses[:2]) + "".join(f"; {c}" for c in clauses[2:]) + "."


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
