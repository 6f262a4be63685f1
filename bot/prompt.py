"""Prompt building, as token ids.

The ``xwin`` format is Vicuna v1.1, exactly as on Xwin-LM's model card::

    <s>{system} USER: Hi! ASSISTANT: Hello.</s>USER: Who are you? ASSISTANT: I am Xwin-LM.</s>USER: {new} ASSISTANT:

The prompt is built as ids, not as one string tokenized at the end: BOS once,
each finished assistant turn closed by the real EOS id, and every piece of
text between special tokens encoded as plain text, so that a user who types
``</s>`` gets four characters, not an end of sequence. Role markers typed by
a user (``USER:``, ``ASSISTANT:``) are defused so that no turn can be forged.

``chat_template`` uses the tokenizer's own template, rendered with placeholder
contents that are then replaced by the plain-text encoding of each message.

For a server's chat API (``[model] api = "chat"``) the same turns become chat
messages instead (:func:`chat_messages`, fitted by :func:`fit_messages`), with
the speakers named and defused as in the prompt.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from bot.attachments import with_files
from bot.errors import GenerationError
from bot.tokenizer import PromptTokenizer
from bot.types import Settings, Turn

USER, ASSISTANT = "USER:", "ASSISTANT:"
#: Generated text is cut here: small models go on with the user's next turn.
XWIN_STOPS = (USER, "</s>")
CHAT_TEMPLATE_STOPS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")

_MARKER = re.compile(r"\b(USER|ASSISTANT)(\s*):", re.IGNORECASE)
TRUNCATION_NOTICE = "(Your message was too long for the model; I read only its beginning.)\n\n"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    #: Older turns left out to fit the context.
    dropped_turns: int = 0
    #: The newest message was cut to fit: tell the user.
    truncated: bool = False


def defuse(text: str) -> str:
    """Make role markers in untrusted text harmless: ``USER:`` → ``USER :``."""
    return _MARKER.sub(lambda m: f"{m.group(1)} :", text)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def system_text(system_prompt: str) -> str:
    """The system prompt is text a user controls (in a DM, ``/xwin set``):
    defused like a message, control characters dropped (issue 9)."""
    return defuse(_CONTROL.sub("", system_prompt)).strip()


def speaker(turn: Turn, is_dm: bool) -> str:
    # Attached files join the text before defusing: they are as untrusted as it.
    text = with_files(turn.text.strip(), turn.attachments)
    if turn.role == "user" and not is_dm and turn.author_name:
        name = turn.author_name.replace(":", "").strip() or "someone"
        text = f"{name}: {text}"
    # Defused after the name is joined: "ASSISTANT" as a name must not make a marker.
    return defuse(text)


@dataclass(frozen=True)
class _Exchange:
    """One user segment (consecutive user turns) and the reply to it, if any."""

    user: str
    reply: str | None
    #: The reply is unfinished (Continue): no end of turn after it.
    open: bool = False


def _exchanges(turns: Sequence[Turn], is_dm: bool) -> list[_Exchange]:
    out: list[_Exchange] = []
    users: list[str] = []
    for turn in turns:
        if turn.role == "user":
            users.append(speaker(turn, is_dm))
        elif users:
            out.append(_Exchange("\n".join(users), speaker(turn, is_dm)))
            users = []
        # An assistant turn with no question before it (history cut) is skipped.
    if users:
        out.append(_Exchange("\n".join(users), None))
    return out


class PromptBuilder:
    def __init__(self, tokenizer: PromptTokenizer, *, fmt: str, context_length: int,
                 max_message_chars: int = 16000) -> None:
        if fmt not in ("xwin", "chat_template"):
            raise GenerationError(f"unknown prompt format {fmt!r}")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.context_length = context_length
        # Longer messages are stored whole but read only this far (a 1 MB paste
        # is not tokenized to be thrown away).
        self.max_message_chars = max_message_chars

    @property
    def stops(self) -> tuple[str, ...]:
        return XWIN_STOPS if self.fmt == "xwin" else CHAT_TEMPLATE_STOPS

    def build(self, turns: Sequence[Turn], settings: Settings, *, is_dm: bool,
              open_reply: bool = False) -> Prompt:
        """Ids for ``turns`` (the newest last, a user turn), fitted to
        ``context_length - max_new_tokens`` by dropping the oldest exchanges
        whole, then by cutting the newest message.

        With ``open_reply`` the newest turn is an unfinished assistant reply
        (Continue): the prompt ends with its text, no end of sequence after it."""
        if open_reply:
            return self._build_open(turns, settings, is_dm=is_dm)
        limit = self.max_message_chars
        newest_cut = bool(turns) and len(turns[-1].text) > limit
        turns = [dataclasses.replace(t, text=t.text[:limit]) if len(t.text) > limit else t for t in turns]
        exchanges = _exchanges(turns, is_dm)
        if not exchanges or exchanges[-1].reply is not None:
            raise GenerationError("the conversation has no new message to answer")
        prompt = self._fit(exchanges, settings)
        return dataclasses.replace(prompt, truncated=True) if newest_cut else prompt

    def _build_open(self, turns: Sequence[Turn], settings: Settings, *, is_dm: bool) -> Prompt:
        limit = self.max_message_chars
        *before, last = turns or [Turn("user", "")]
        before = [dataclasses.replace(t, text=t.text[:limit]) if len(t.text) > limit else t for t in before]
        exchanges = _exchanges(before, is_dm)
        if last.role != "assistant" or not exchanges or exchanges[-1].reply is not None:
            raise GenerationError("there is no unfinished reply to continue")
        # Kept as it was generated (not stripped): the model goes on from its last character.
        exchanges[-1] = _Exchange(exchanges[-1].user, defuse(last.text), open=True)
        budget = self.context_length - settings.max_new_tokens
        system = system_text(settings.system_prompt)
        for start in range(len(exchanges)):
            ids = self._encode(system, exchanges[start:])
            if len(ids) <= budget:
                return Prompt(ids, dropped_turns=start)
        raise GenerationError("the reply is too long to continue within the model's context")

    def _fit(self, exchanges: list[_Exchange], settings: Settings) -> Prompt:
        budget = self.context_length - settings.max_new_tokens
        system = system_text(settings.system_prompt)
        for start in range(self._first_fitting(system, exchanges, budget), len(exchanges)):
            ids = self._encode(system, exchanges[start:])
            if len(ids) <= budget:
                return Prompt(ids, dropped_turns=start)
        return self._cut_newest(system, exchanges[-1], budget, dropped=len(exchanges) - 1)

    def _first_fitting(self, system: str, exchanges: Sequence[_Exchange], budget: int) -> int:
        """A cheap estimate of the oldest exchange that can stay (each one
        encoded alone), so that long histories are not encoded again and
        again; :meth:`build` then checks the exact encoding."""
        used = len(self._encode(system, []))
        for i in range(len(exchanges) - 1, -1, -1):
            used += len(self._encode("", exchanges[i : i + 1]))
            if used > budget:
                return min(i + 1, len(exchanges) - 1)
        return 0

    def _cut_newest(self, system: str, newest: _Exchange, budget: int, dropped: int) -> Prompt:
        empty = len(self._encode(system, [_Exchange("", None)]))
        room = budget - empty
        if room < 8:
            raise GenerationError(
                "the system prompt and max_new_tokens leave no room for your message: "
                "lower max_new_tokens or shorten the system prompt"
            )
        text_ids = self.tokenizer.encode_text(newest.user)
        text = self.tokenizer.decode(text_ids[:room])
        while True:
            ids = self._encode(system, [_Exchange(text, None)])
            if len(ids) <= budget or not text:
                return Prompt(ids, dropped_turns=dropped, truncated=True)
            text = text[: max(0, len(text) - max(1, (len(ids) - budget) * 2))]

    def _encode(self, system: str, exchanges: Sequence[_Exchange]) -> list[int]:
        if self.fmt == "xwin":
            return self._encode_xwin(system, exchanges)
        return self._encode_template(system, exchanges)

    def _encode_xwin(self, system: str, exchanges: Sequence[_Exchange]) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = [] if tok.bos_id is None else [tok.bos_id]
        head = f"{system} " if system else ""
        for ex in exchanges:
            chunk = f"{head}{USER} {ex.user} {ASSISTANT}"
            if ex.reply is None:
                ids += tok.encode_text(chunk)
                break
            ids += tok.encode_text(f"{chunk} {ex.reply}")
            if ex.open:
                break
            if tok.eos_id is not None:
                ids.append(tok.eos_id)
            head = ""
        return ids

    def _encode_template(self, system: str, exchanges: Sequence[_Exchange]) -> list[int]:
        contents: list[str] = []
        messages: list[dict[str, str]] = []

        def add(role: str, content: str) -> None:
            placeholder = f"@@{uuid.uuid4().hex}@@"
            contents.append(content)
            messages.append({"role": role, "content": placeholder})

        if system:
            add("system", system)
        for ex in exchanges:
            add("user", ex.user)
            if ex.reply is not None and not ex.open:
                add("assistant", ex.reply)
        rendered = self.tokenizer.render_chat(messages)
        ids: list[int] = []
        rest = rendered
        for message, content in zip(messages, contents, strict=True):
            before, found, after = rest.partition(message["content"])
            if not found:  # a template that leaves this message out
                continue
            ids += self.tokenizer.encode_template(before)
            ids += self.tokenizer.encode_text(content)
            rest = after
        ids += self.tokenizer.encode_template(rest)
        if exchanges and exchanges[-1].open and exchanges[-1].reply is not None:
            # After the generation prompt, the reply so far, left open.
            ids += self.tokenizer.encode_text(exchanges[-1].reply)
        return ids


# -- chat messages (a server's chat API) ------------------------------------------
def chat_messages(turns: Sequence[Turn], settings: Settings, is_dm: bool) -> list[dict[str, str]]:
    """System prompt, then the turns, speakers named as in the prompt builder."""
    messages = [{"role": "system", "content": system_text(settings.system_prompt)}]
    for turn in turns:
        text = speaker(turn, is_dm)
        if messages[-1]["role"] == turn.role:  # strict templates want alternating roles
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": turn.role, "content": text})
    return messages


def fit_messages(messages: list[dict[str, str]], tokenizer: PromptTokenizer, budget: int, *,
                 exact: bool) -> list[dict[str, str]]:
    """Drop the oldest turns (never the system prompt or the newest) until the
    prompt fits ``budget`` tokens: counted through the tokenizer's own chat
    template when ``exact``, estimated when it has none."""
    kept = list(messages)
    while len(kept) > 2 and _chat_tokens(kept, tokenizer, exact) > budget:
        del kept[1]
    if len(kept) > 2 and kept[1]["role"] == "assistant":
        del kept[1]
    if _chat_tokens(kept, tokenizer, exact) > budget:
        raise GenerationError("your message is too long for the model")
    return kept


def _chat_tokens(messages: list[dict[str, str]], tokenizer: PromptTokenizer, exact: bool) -> int:
    if exact:
        return len(tokenizer.encode_template(tokenizer.render_chat(messages)))
    return sum(len(tokenizer.encode_text(m["content"])) + 8 for m in messages)
