"""Per-user quotas: ``[limits] messages_per_minute`` and ``tokens_per_day``.

Counted in the store (the ``usage`` table), per platform and user id, so a
restart does not reset them. A message counts once it gets a job; the tokens
of each reply count when it is generated. Checked before any work: a message
over quota is stored (nothing is lost) but gets no job, and its author is
told when the limit resets. Messages per minute is a sliding 60-second
window; tokens per day is the UTC calendar day.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable

from bot.config import LimitsConfig
from bot.store import Store

MINUTE = 60.0
KEPT = "I kept your message but won't answer it; ask again then."


class Quotas:
    def __init__(self, store: Store, limits: LimitsConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock

    async def refusal(self, platform: str, author_id: str) -> str | None:
        """None when the user may have an answer now; otherwise what to tell them."""
        now = self.clock()
        per_minute = self.limits.messages_per_minute
        if per_minute:
            oldest = await self.store.nth_latest_usage(platform, author_id, "message", per_minute)
            if oldest is not None and oldest > now - MINUTE:
                wait = max(1, math.ceil(oldest + MINUTE - now))
                return (f"You have reached the limit of {per_minute} messages a minute; "
                        f"it resets in {wait} s. {KEPT}")
        per_day = self.limits.tokens_per_day
        if per_day:
            midnight = _utc_midnight(now)
            used = await self.store.usage_since(platform, author_id, "tokens", midnight)
            if used >= per_day:
                left = midnight + 86400 - now
                return (f"You have used today's {per_day} tokens of replies; the limit resets at "
                        f"00:00 UTC (in {_duration(left)}). {KEPT}")
        return None

    async def count_message(self, platform: str, author_id: str) -> None:
        if self.limits.messages_per_minute:
            await self.store.add_usage(platform, author_id, "message", 1, self.clock())

    async def count_tokens(self, platform: str, author_id: str, tokens: int) -> None:
        if self.limits.tokens_per_day and tokens > 0:
            await self.store.add_usage(platform, author_id, "tokens", tokens, self.clock())


def _utc_midnight(now: float) -> float:
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def _duration(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
