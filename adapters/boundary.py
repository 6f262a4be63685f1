"""The one error boundary every platform event passes through.

An adapter runs each event's handler as ``await events.run(handler(...),
"message 123 in C1", tell=...)``. If the handler raises, the boundary logs
the traceback with that context on the adapter's logger, counts the error,
and tells the user :data:`adapters.strings.SORRY` through ``tell`` (one safe
sentence: never the exception's text). ``asyncio.CancelledError`` is not an
error of the event: it always propagates (shutdown must stay prompt). A
``tell`` that fails itself is logged, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from adapters.strings import SORRY

#: Shows one sentence to the user who caused the event.
Tell = Callable[[str], Awaitable[object]]


class EventBoundary:
    """One per adapter: ``platform`` and ``log`` name where a failure happened;
    ``on_error`` counts it (the ``xwin_errors_total{kind="adapter"}`` metric)."""

    def __init__(self, platform: str, log: logging.Logger, on_error: Callable[[], None]) -> None:
        self.platform = platform
        self.log = log
        self.on_error = on_error

    async def run(self, handler: Awaitable[object], what: str, *, tell: Tell | None = None) -> None:
        """Await ``handler``; on an exception, :meth:`failed`."""
        try:
            await handler
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.failed(exc, what, tell=tell)

    async def failed(self, exc: BaseException, what: str, *, tell: Tell | None = None) -> None:
        """Log ``exc`` with its context, count it, tell the user one sentence."""
        self.on_error()
        self.log.error("%s: %s failed", self.platform, what, exc_info=exc)
        if tell is None:
            return
        try:
            await tell(SORRY)
        except asyncio.CancelledError:
            raise
        except Exception as told:
            self.log.warning("%s: could not tell the user that %s failed: %s", self.platform, what, told)
