"""Text both ways between the model and Slack, with no Slack SDK involved.

Outgoing (model → Slack): :func:`to_mrkdwn` escapes ``&``, ``<`` and ``>`` in
everything the model wrote, so no ``<!channel>``, ``<!here>``, ``<!everyone>``
or ``<@U…>`` can ever reach Slack as a working mention, and turns the Markdown
that Slack spells differently into mrkdwn (bold, italics, strike, links,
headings); code keeps its text. :func:`split_message` cuts a long reply into
messages under Slack's limit without breaking a code block; :class:`StreamSplitter`
does the same for a reply that grows while it is streamed (append-only).

Incoming (Slack → model): :func:`readable_text` removes the bot's mention and
turns Slack markup (``<@U1>``, ``<#C1|general>``, ``<https://x|label>``) into
plain, readable text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from adapters import render

FENCE = "```"

_FENCED = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_LINK = re.compile(r"\[([^\[\]\n]+)\]\(((?:https?://|mailto:)[^\s()<>|]+)\)")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+", re.MULTILINE)
_ENTITY_TAIL = re.compile(r"&[a-z]{0,3}$")
_MARKUP = re.compile(r"<([^<>\n]+)>")
_USER = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
_CHANNEL = re.compile(r"<#([CGD][A-Z0-9]+)(?:\|[^>]*)?>")


# ---------------------------------------------------------------- outgoing


def escape(text: str) -> str:
    """Slack's three control characters as entities (``&`` first)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(markdown: str) -> str:
    """Model Markdown → Slack mrkdwn, every ``&``, ``<`` and ``>`` escaped."""
    out: list[str] = []
    pos = 0
    for match in _FENCED.finditer(markdown):
        out.append(_prose_to_mrkdwn(markdown[pos : match.start()]))
        out.append(escape(match.group(0)))
        pos = match.end()
    out.append(_prose_to_mrkdwn(markdown[pos:]))
    return "".join(out)


def _prose_to_mrkdwn(text: str) -> str:
    """Text outside fenced blocks: inline code kept, the rest converted."""
    out: list[str] = []
    pos = 0
    for match in _INLINE_CODE.finditer(text):
        out.append(_links_to_mrkdwn(text[pos : match.start()]))
        out.append(escape(match.group(0)))
        pos = match.end()
    out.append(_links_to_mrkdwn(text[pos:]))
    return "".join(out)


def _links_to_mrkdwn(text: str) -> str:
    out: list[str] = []
    pos = 0
    for match in _LINK.finditer(text):
        out.append(_style_to_mrkdwn(text[pos : match.start()]))
        out.append(_link(match.group(2), match.group(1)))
        pos = match.end()
    out.append(_style_to_mrkdwn(text[pos:]))
    return "".join(out)


def _link(url: str, label: str) -> str:
    # The URL pattern admits no whitespace, "<", ">" or "|", so the link can't
    # be broken out of; the label is escaped and may not hold a "|" either.
    return f"<{escape(url)}|{escape(label).replace('|', '/')}>"


def _style_to_mrkdwn(text: str) -> str:
    text = _BULLET.sub(lambda m: f"{m.group(1)}• ", escape(text))
    text = _ITALIC.sub(lambda m: f"_{m.group(1)}_", text)
    text = _BOLD.sub(lambda m: f"*{m.group(2)}*", text)
    text = _STRIKE.sub(lambda m: f"~{m.group(1)}~", text)
    return _HEADING.sub(lambda m: f"*{m.group(1).strip('*')}*", text)


# ---------------------------------------------------------------- splitting


def split_message(text: str, limit: int) -> list[str]:
    """Cut mrkdwn into messages of at most ``limit`` characters with the one
    splitter (:func:`adapters.render.split_message`: between lines where
    possible, a code block cut in two closed and reopened), never inside an
    entity (``&amp;``) or a ``<…>`` link."""
    return render.split_message(text, limit, cut_point=_cut_point)


def _cut_point(line: str, limit: int) -> int:
    head = line[:limit]
    space = head.rfind(" ")
    cut = space + 1 if space > limit // 2 else limit
    opened = line.rfind("<", 0, cut)
    if opened > line.rfind(">", 0, cut) and opened > 0:
        cut = opened  # don't cut a <url|label> link
    entity = _ENTITY_TAIL.search(line[:cut])
    if entity and entity.start() > 0:
        cut = entity.start()  # don't cut &amp; &lt; &gt;
    return cut


class StreamSplitter:
    """Cuts a growing reply into messages for append-only streaming.

    ``feed(text_so_far)`` returns the pieces to send now: the first is
    appended to the current message, each further one starts a new message.
    Sizes are counted as escaped text (``escape``), each message stays within
    ``limit``, cuts fall after a line or at a space where possible, and a code
    block cut in two is closed and reopened. What was sent is never taken
    back: a text that no longer extends what was fed (trailing spaces stripped
    at the end) continues from where the two agree.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 64)
        #: The reply text placed in messages so far.
        self.consumed = ""
        self._size = 0  # escaped characters in the current message
        self._tail = ""  # its last character

    def feed(self, text: str) -> list[str]:
        done = _common_prefix(self.consumed, text)
        self.consumed, new = text[:done], text[done:]
        pieces = [""]
        while new:
            fit = _fitting(new, self.limit - len(FENCE) - 1 - self._size)
            if fit >= len(new):
                self._place(pieces, new)
                break
            cut = _cut_before(new, fit)
            self._place(pieces, new[:cut])
            rest = new[cut:].lstrip(" ")
            self.consumed += new[cut : len(new) - len(rest)]
            new = rest
            self._next_message(pieces)
        return pieces

    def _place(self, pieces: list[str], text: str) -> None:
        if text:
            pieces[-1] += text
            self.consumed += text
            self._size += len(escape(text))
            self._tail = text[-1]

    def _next_message(self, pieces: list[str]) -> None:
        fence = _open_fence(self.consumed)
        if fence:
            pieces[-1] += ("" if self._tail in ("\n", "") else "\n") + FENCE
        opening = fence + "\n" if fence else ""
        pieces.append(opening)
        self._size, self._tail = len(escape(opening)), opening[-1:]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _fitting(text: str, budget: int) -> int:
    """How many characters of ``text`` fit in ``budget`` once escaped."""
    used = 0
    for i, ch in enumerate(text):
        used += len(escape(ch))
        if used > budget:
            return i
    return len(text)


def _cut_before(text: str, fit: int) -> int:
    head = text[:fit]
    newline = head.rfind("\n")
    if newline >= 0:
        return newline + 1
    space = head.rfind(" ")
    return space + 1 if space > fit // 2 else fit


def _open_fence(text: str) -> str:
    """The opening line of the code block ``text`` ends inside, or ""."""
    if text.count(FENCE) % 2 == 0:
        return ""
    at = text.rfind(FENCE)
    end = text.find("\n", at)
    return text[at : end if end >= 0 else len(text)].strip()


# ---------------------------------------------------------------- incoming


def mentioned_users(text: str) -> set[str]:
    return set(_USER.findall(text))


def mentioned_channels(text: str) -> set[str]:
    return {m.group(1) for m in _CHANNEL.finditer(text) if "|" not in m.group(0)}


def readable_text(
    text: str,
    *,
    bot_user_id: str,
    user_names: Mapping[str, str],
    channel_names: Mapping[str, str] | None = None,
) -> str:
    """Slack markup → plain text, the bot's own mention removed."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", " ", text)
    names = channel_names or {}
    text = _MARKUP.sub(lambda m: _readable_markup(m.group(1), user_names, names), text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def _readable_markup(inner: str, users: Mapping[str, str], channels: Mapping[str, str]) -> str:
    target, _, label = inner.partition("|")
    if target.startswith("@"):
        return "@" + (users.get(target[1:]) or label or target[1:])
    if target.startswith("#"):
        return "#" + (label or channels.get(target[1:]) or target[1:])
    if target.startswith("!"):
        return _readable_special(target[1:], label)
    if target.startswith("mailto:"):
        return label or target.removeprefix("mailto:")
    if label and label != target:
        return f"{label} ({target})"
    return target


def _readable_special(target: str, label: str) -> str:
    if label:
        return label if label.startswith("@") or target.startswith("date") else "@" + label
    if target.startswith("subteam^"):
        return "@" + target.removeprefix("subteam^")
    return "@" + target  # here, channel, everyone
