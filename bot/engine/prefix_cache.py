"""Which idle rows of the batched engine's KV cache hold a finished reply's prefix.

A follow-up in a thread is the previous prompt, the previous reply and a few
new tokens. When a reply ends, its row of the static KV cache still holds the
keys and values of every token it was fed; instead of forgetting them, the
scheduler *parks* the row (rows beyond the live ones are idle anyway). A new
prompt that starts with a parked row's tokens takes that row over and only its
remaining tokens are prefilled. Parked rows are evicted, least recently used
first, whenever a live conversation needs the row.

This module is the bookkeeping only (which row holds which ids); the
scheduler (``bot.engine.batched``) moves the caches.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

MIN_REUSE = 32  # shorter shared prefixes are prefilled again (not worth a copy)


@dataclass
class _Parked:
    ids: list[int]
    stamp: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Parked rows: row -> the token ids whose keys and values it holds."""

    def __init__(self, rows: int, min_reuse: int = MIN_REUSE, *, enabled: bool = True) -> None:
        self.rows = rows
        self.min_reuse = min_reuse
        self.enabled = enabled  # off: nothing is parked, so nothing is reused
        self._parked: dict[int, _Parked] = {}
        self._clock = itertools.count()
        self.hits = 0
        self.reused_tokens = 0
        self.evictions = 0

    def __contains__(self, row: int) -> bool:
        return row in self._parked

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, row: int, ids: Sequence[int]) -> None:
        if self.enabled and len(ids) >= self.min_reuse:
            self._parked[row] = _Parked(list(ids), next(self._clock))

    def lookup(self, ids: Sequence[int]) -> tuple[int, int] | None:
        """(row, tokens to reuse) of the parked row sharing the longest prefix
        with ``ids`` (at least one token of ``ids`` is left to prefill), or None."""
        best: tuple[int, int] | None = None
        for row, parked in self._parked.items():
            n = min(common_prefix(parked.ids, ids), len(ids) - 1)
            if n >= self.min_reuse and (best is None or n > best[1]):
                best = (row, n)
        return best

    def take(self, row: int) -> None:
        """The row's prefix is being reused: it is no longer parked."""
        if self._parked.pop(row, None) is not None:
            self.hits += 1

    def clear(self) -> None:
        """Forget every parked row (benchmarks measuring cold prompts)."""
        self._parked.clear()

    def evict(self, row: int) -> None:
        if self._parked.pop(row, None) is not None:
            self.evictions += 1

    def free_row(self, live: int, exclude: Collection[int], evict: bool = True) -> int | None:
        """An idle row (``live`` or beyond, none of ``exclude``) to park in, from
        the top (the next live conversations take the low rows): an unparked
        one, else (``evict``) the least recently used parked one, evicted."""
        for row in range(self.rows - 1, live - 1, -1):
            if row not in exclude and row not in self._parked:
                return row
        if not evict:
            return None
        candidates = [(p.stamp, row) for row, p in self._parked.items() if row >= live and row not in exclude]
        if not candidates:
            return None
        row = min(candidates)[1]
        self.evict(row)
        return row
