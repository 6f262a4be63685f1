"""The engine interface: one model, loaded once, streaming text."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.tokenizer import PromptTokenizer
from bot.types import Settings, Turn

__all__ = ["Engine", "PromptTokenizer", "StreamStats"]


@dataclass
class StreamStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    # The longest wait between two consecutive tokens after the first (a
    # stall, e.g. behind other prompts' prefill); 0 where not measured.
    max_gap_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.first_token_s
        if self.new_tokens <= 1 or decode_s <= 0:
            return 0.0
        return (self.new_tokens - 1) / decode_s


class Engine(Protocol):
    @property
    def tokenizer(self) -> PromptTokenizer: ...

    @property
    def context_length(self) -> int: ...

    @property
    def prompt_format(self) -> str: ...

    @property
    def max_batch(self) -> int:
        """How many replies the worker may stream at once (the engine batches them)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, prompt_ids: list[int], settings: Settings, *,
               turns: Sequence[Turn] = (), is_dm: bool = False) -> AsyncGenerator[str, None]:
        """Text pieces of the reply, never half a character. Stops at EOS or
        ``settings.max_new_tokens``; closing the iterator cancels generation.
        ``turns`` (the conversation the ids were built from) is for engines
        that send a conversation instead of ids (a server's chat API)."""
        ...

    def describe(self) -> dict[str, str]: ...
