"""A scripted engine for tests where the model is beside the point.

It is a real :class:`~bot.engine.base.Engine`: it tokenizes prompts (one id
per character, plus BOS/EOS), records what it was asked, and streams a reply
piece by piece with an optional delay, so the worker, the store and the
adapters run exactly as they do with a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from bot.engine.base import StreamStats
from bot.errors import GenerationError
from bot.types import Settings, Turn

BOS, EOS = 1, 2
_OFFSET = 16  # ids below this are reserved for special tokens
_SPECIALS = {BOS: "<s>", EOS: "</s>"}


class CharTokenizer:
    """One token per character; ``<s>``/``</s>`` as specials only in template text."""

    bos_id: int | None = BOS
    eos_id: int | None = EOS

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) + _OFFSET for c in text]

    def encode_template(self, text: str) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for sid, s in _SPECIALS.items():
                if text.startswith(s, i):
                    ids.append(sid)
                    i += len(s)
                    break
            else:
                ids.append(ord(text[i]) + _OFFSET)
                i += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(_SPECIALS.get(i, "") if i < _OFFSET else chr(i - _OFFSET) for i in ids)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        body = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return body + "<|assistant|>"


@dataclass
class Call:
    prompt_ids: list[int]
    prompt_text: str
    settings: Settings


Reply = str | Callable[[Call], str] | Exception


@dataclass
class FakeEngine:
    """Replies come from ``replies`` in order (the last one repeats); a reply
    may be a string, a function of the call, or an exception to raise midway."""

    replies: list[Reply] = field(default_factory=lambda: ["Hello from the fake engine."])
    piece_chars: int = 4
    delay: float = 0.0
    context_length: int = 4096
    prompt_format: str = "xwin"
    max_batch: int = 1
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    calls: list[Call] = field(default_factory=list)
    last_stats: StreamStats | None = None
    started: bool = False
    #: Set while a stream is being consumed; lets tests wait for "mid-reply".
    streaming: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    def describe(self) -> dict[str, str]:
        return {"engine": "fake", "model": "fake", "device": "none"}

    async def stream(self, prompt_ids: list[int], settings: Settings, *,
                     turns: Sequence[Turn] = (), is_dm: bool = False) -> AsyncGenerator[str, None]:
        call = Call(list(prompt_ids), self.tokenizer.decode(prompt_ids), settings)
        self.calls.append(call)
        reply = self.replies[min(len(self.calls) - 1, len(self.replies) - 1)]
        text = reply(call) if callable(reply) and not isinstance(reply, Exception) else reply
        stats = StreamStats(prompt_tokens=len(prompt_ids))
        self.streaming.set()
        try:
            if isinstance(text, Exception):
                yield "partial "
                if isinstance(text, GenerationError):
                    raise text
                raise GenerationError.internal(text, "fake engine") from text
            for i in range(0, len(text), self.piece_chars):
                if self.delay:
                    await asyncio.sleep(self.delay)
                stats.new_tokens += 1
                yield text[i : i + self.piece_chars]
        finally:
            self.streaming.clear()
            self.last_stats = stats
