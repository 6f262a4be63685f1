"""Prometheus metrics of one bot process.

:class:`Metrics` owns a dedicated ``CollectorRegistry`` (passed in or made
here, never the global one), so two bots in one process (tests) never share
counters. The core calls a few methods at fixed points; the HTTP endpoint
(:mod:`bot.health`) renders the registry. All names start with ``xwin_``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: How a job ended. ``requeued``: cut by a shutdown, answered after the restart.
JobOutcome = Literal["done", "failed", "crashed", "cancelled", "requeued"]
#: ``generation``: a reply failed for good; ``retry``: a passing fault, tried again;
#: ``crash``: an unexpected exception in the worker; ``delivery``: a finished
#: reply the platform would not show (taken back); ``adapter``: an adapter's
#: event handler failed.
ErrorKind = Literal["generation", "retry", "crash", "delivery", "adapter"]

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RATES = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0)


class Metrics:
    """Counters, gauges and histograms of the core, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages = Counter("xwin_messages", "Messages handed to the bot, by what became of them",
                                ["result"], registry=r)
        self.jobs = Counter("xwin_jobs", "Jobs (replies) by how they ended", ["outcome"], registry=r)
        self.queue_depth = Gauge("xwin_queue_depth", "Jobs waiting for the engine", registry=r)
        self.running = Gauge("xwin_engine_batch_occupancy", "Replies being generated now", registry=r)
        self.max_batch = Gauge("xwin_engine_max_batch", "Replies the engine can generate at once", registry=r)
        self.queue_wait = Histogram("xwin_queue_wait_seconds", "Time from queued to generation start",
                                    buckets=_SECONDS, registry=r)
        self.ttft = Histogram("xwin_time_to_first_token_seconds",
                              "Time from the prompt given to the engine to the first text", buckets=_SECONDS,
                              registry=r)
        self.tokens_per_s = Histogram("xwin_tokens_per_second", "Decode speed of each finished reply",
                                      buckets=_RATES, registry=r)
        self.tokens = Counter("xwin_generated_tokens", "Tokens generated (text pieces)", registry=r)
        self.cut = Counter("xwin_replies_cut_at_max_new_tokens",
                           "Replies that ended because they reached max_new_tokens", registry=r)
        self.errors = Counter("xwin_errors", "Errors by kind", ["kind"], registry=r)
        self.reconnects = Counter("xwin_adapter_reconnects", "Platform connections made again",
                                  ["platform"], registry=r)
        self.model_loaded = Gauge("xwin_model_loaded", "1 once the model is loaded", registry=r)
        self.ready = Gauge("xwin_ready", "1 when /readyz answered 200 at this scrape", registry=r)
        r.register(GpuMemoryCollector())
        self._queued_at: dict[int, float] = {}

    # -- the worker --------------------------------------------------------
    def watch_worker(self, waiting: Callable[[], int], running: Callable[[], int], max_batch: int) -> None:
        """Read the queue depth and batch occupancy from the worker at each scrape."""
        self.queue_depth.set_function(lambda: float(waiting()))
        self.running.set_function(lambda: float(running()))
        self.max_batch.set(max_batch)

    def job_queued(self, job_id: int) -> None:
        self._queued_at.setdefault(job_id, time.monotonic())

    def job_started(self, job_id: int) -> None:
        queued = self._queued_at.pop(job_id, None)
        if queued is not None:
            self.queue_wait.observe(time.monotonic() - queued)

    def job_ended(self, job_id: int, outcome: JobOutcome) -> None:
        self._queued_at.pop(job_id, None)
        self.jobs.labels(outcome).inc()

    def reply_streamed(self, tokens: int, first_token_s: float | None, total_s: float, *, cut: bool) -> None:
        """One finished generation: ``tokens`` pieces in ``total_s`` seconds."""
        self.tokens.inc(tokens)
        if first_token_s is not None:
            self.ttft.observe(first_token_s)
            decode_s = total_s - first_token_s
            if tokens > 1 and decode_s > 0:
                self.tokens_per_s.observe((tokens - 1) / decode_s)
        if cut:
            self.cut.inc()

    # -- everything else ---------------------------------------------------
    def message_handled(self, result: str) -> None:
        self.messages.labels(result).inc()

    def error(self, kind: ErrorKind) -> None:
        self.errors.labels(kind).inc()

    def reconnected(self, platform: str) -> None:
        self.reconnects.labels(platform).inc()


class GpuMemoryCollector(Collector):
    """``xwin_gpu_memory_bytes{device, kind}`` where torch is loaded and sees a GPU.

    torch is not imported here: a process whose engine never loaded it (the
    remote engine) reports nothing."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        family = GaugeMetricFamily("xwin_gpu_memory_bytes", "GPU memory held by this process",
                                   labels=["device", "kind"])
        for device in range(torch.cuda.device_count()):
            family.add_metric([str(device), "allocated"], float(torch.cuda.memory_allocated(device)))
            family.add_metric([str(device), "reserved"], float(torch.cuda.memory_reserved(device)))
        yield family
