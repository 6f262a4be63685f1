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
  the model's context, in tokens, shared fairly (short files whole, the long
  ones an even part each). A cut file keeps its beginning.
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
from collections.abc import Mapping, Sequence
from typing import Protocol

from bot.config import AttachmentsConfig
from bot.errors import BotError
from bot.tokenizer import PromptTokenizer
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
#: Generous: tokens are 3-4 characters on average; a beginning this long holds enough.
_CHARS_PER_TOKEN = 8
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


def share_out(sizes: Mapping[int, int], budget: int) -> dict[int, int]:
    """Tokens for each file, fairly: the shortest take what they need, the rest
    split what is left evenly (so every file shows its beginning)."""
    out: dict[int, int] = {}
    left = max(0, budget)
    order = sorted(sizes, key=lambda k: sizes[k])
    for n, key in enumerate(order):
        out[key] = min(sizes[key], left // (len(order) - n))
        left -= out[key]
    return out


class TokenBudget(Protocol):
    """What the reader needs of an engine (an :class:`~bot.engine.base.Engine` is one)."""

    @property
    def tokenizer(self) -> PromptTokenizer: ...

    @property
    def context_length(self) -> int: ...


class FileReader:
    """Turns a message's files into :class:`Attachment` rows (see the module doc)."""

    def __init__(self, config: AttachmentsConfig, engine: TokenBudget) -> None:
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
        fetched = await asyncio.gather(*(self._fetch(files[i], fetcher) for i in wanted))
        out: dict[int, Attachment] = {
            i: _skipped(f, TOO_MANY.format(n=cfg.max_files) if i >= cfg.max_files else NOT_TEXT)
            for i, f in enumerate(files) if i not in wanted
        }
        texts: dict[int, tuple[str, bool]] = {}
        for i, data in zip(wanted, fetched, strict=True):
            found = self._decode(files[i], data)
            if isinstance(found, Attachment):
                out[i] = found
            else:
                texts[i] = found
        out.update(self._fit(files, texts))
        return tuple(out[i] for i in range(len(files)))

    async def _fetch(self, file: RemoteFile, fetcher: FileFetcher) -> bytes | FetchError:
        try:
            return await fetcher.fetch(file, self.config.max_file_bytes)
        except FetchError as exc:
            return exc
        except Exception:
            log.exception("downloading the attached file %r failed", file.name)
            return FetchError(NOT_FETCHED)

    def _decode(self, file: RemoteFile, data: bytes | FetchError) -> tuple[str, bool] | Attachment:
        """(the text, whether the byte cap cut it), or the file skipped."""
        if isinstance(data, FetchError):
            return _skipped(file, str(data) or NOT_FETCHED)
        cap = self.config.max_file_bytes
        text = decode_text(data[:cap], cut=len(data) > cap)
        if text is None:
            return _skipped(file, NOT_TEXT if content_kind(file.content_type) == "unknown" else NOT_UTF8)
        return text, len(data) > cap

    def _fit(self, files: Sequence[RemoteFile], texts: Mapping[int, tuple[str, bool]]) -> dict[int, Attachment]:
        """The texts within the message's share of the context, in tokens."""
        budget = int(self.config.context_share * self.engine.context_length)
        ids = {i: self._ids(text, budget) for i, (text, _cut) in texts.items()}
        allowed = share_out({i: len(v) for i, (v, _whole) in ids.items()}, budget)
        out: dict[int, Attachment] = {}
        for i, (text, cut) in texts.items():
            file_ids, whole = ids[i]
            if allowed[i] < len(file_ids) or not whole:
                cut, text = True, self.engine.tokenizer.decode(file_ids[: allowed[i]])
            if file_ids and not text:
                out[i] = _skipped(files[i], NO_ROOM)
            else:
                out[i] = Attachment(safe_name(files[i].name), "cut" if cut else "read", text)
        return out

    def _ids(self, text: str, most: int) -> tuple[list[int], bool]:
        """Token ids of ``text`` (and True), or of a beginning of it that holds at
        least ``most`` tokens (and False): a long file is not tokenized only to be
        thrown away."""
        head = text[: most * _CHARS_PER_TOKEN]
        ids = self.engine.tokenizer.encode_text(head)
        if len(head) < len(text) and len(ids) < most:
            return self.engine.tokenizer.encode_text(text), True
        return ids, len(head) == len(text)


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
