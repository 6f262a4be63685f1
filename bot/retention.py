"""Retention on a schedule: ``[bot] retention_days`` applied while the bot runs.

The bot purges once at start-up and then every ``[bot] retention_interval``
seconds (an hour by default), so a bot that runs for months still drops what
is older than the limit. A failed purge is logged and tried again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bot.store import Store

log = logging.getLogger(__name__)


class Retention:
    """``start()`` / ``await stop()`` around a task that purges old messages."""

    def __init__(self, store: Store, days: float, interval: float) -> None:
        self.store = store
        self.days = days
        self.interval = interval
        self.runs = 0
        self._task: asyncio.Task[None] | None = None

    async def purge_now(self) -> int:
        purged = await self.store.purge_messages_older_than(self.days)
        self.runs += 1
        if purged:
            log.info("retention: purged %d messages older than %g days", purged, self.days)
        return purged

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.purge_now()
            except Exception:
                log.exception("retention: the purge failed; trying again in %g s", self.interval)
