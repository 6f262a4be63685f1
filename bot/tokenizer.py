"""What prompt building needs from a tokenizer.

It lives in the core, not in ``bot.engine``: the prompt builder (bot/prompt.py)
depends on this interface only, and engines depend on the prompt builder,
never the other way round (an import contract in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class PromptTokenizer(Protocol):
    """What prompt building needs from a tokenizer."""

    bos_id: int | None
    eos_id: int | None

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS/EOS added, and no special token can
        come out of it (``</s>`` typed by a user is the four characters)."""
        ...

    def encode_template(self, text: str) -> list[int]:
        """Token ids of trusted template text, special-token strings parsed."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's own chat template, rendered to text with the
        assistant's generation prompt at the end."""
        ...
