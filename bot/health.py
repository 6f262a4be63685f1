"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP.

One small aiohttp server in the bot's own process and event loop, off unless
``[metrics] enabled``; it listens on ``[metrics] host``/``port`` (127.0.0.1 by
default). It is a server of its own, not a route on Slack's HTTP-mode server:
see docs/operations.md for why.

- ``/healthz``: 200 while the process runs and the store takes writes.
- ``/readyz``: 200 once every readiness check passes (model loaded, adapters
  connected); 503 with the reasons, one a line, otherwise.
- ``/metrics``: the :class:`~bot.metrics.Metrics` registry, Prometheus text
  format, with ``xwin_ready`` set from the readiness checks at each scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.errors import AdapterError
from bot.metrics import Metrics

log = logging.getLogger(__name__)

#: A check returns None when all is well, or one short reason why not.
Check = Callable[[], Awaitable[str | None]]


class HealthServer:
    """Use as ``async with HealthServer(metrics, host, port, live=..., ready=[...]):``."""

    def __init__(self, metrics: Metrics, host: str, port: int, *, live: Check,
                 ready: list[tuple[str, Check]] | None = None) -> None:
        self.metrics = metrics
        self.host = host
        self._port = port
        self._live = live
        self._ready: list[tuple[str, Check]] = list(ready or [])
        self._runner: web.AppRunner | None = None

    def add_readiness(self, name: str, check: Check) -> None:
        """Another thing /readyz waits for (an adapter's connection, say)."""
        self._ready.append((name, check))

    @property
    def port(self) -> int:
        """The port it listens on (useful when configured as 0)."""
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise AdapterError(f"metrics: cannot listen on {self.host}:{self._port} ({exc.strerror}); "
                               "change [metrics] host / port.") from None
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        log.info("metrics and health on http://%s:%d/metrics", self.host, self._port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _metrics(self, request: web.Request) -> web.Response:
        # Readiness as a metric too, for an alert rule (docs/operations.md).
        self.metrics.ready.set(0 if await self._problems() else 1)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        problem = await _run(self._live)
        return _answer([problem] if problem else [])

    async def _readyz(self, request: web.Request) -> web.Response:
        return _answer(await self._problems())

    async def _problems(self) -> list[str]:
        problems = []
        for name, check in self._ready:
            if (problem := await _run(check)) is not None:
                problems.append(f"{name}: {problem}")
        return problems


async def _run(check: Check) -> str | None:
    """A check that raises is a failed check; the details go to the log."""
    try:
        return await check()
    except Exception as exc:
        log.warning("health check failed", exc_info=True)
        return f"check failed ({type(exc).__name__})"


def _answer(problems: list[str]) -> web.Response:
    if problems:
        return web.Response(status=503, text="\n".join(problems) + "\n")
    return web.Response(text="ok\n")
