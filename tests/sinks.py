"""A ReplySink that records what the core told it, for core tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class RecordingSink:
    update_interval: float = 0.0
    events: list[tuple[str, object]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def queued(self, position: int) -> None:
        self.events.append(("queued", position))

    async def started(self) -> None:
        self.events.append(("started", None))

    async def update(self, text_so_far: str) -> None:
        self.events.append(("update", text_so_far))

    async def finish(self, text: str) -> None:
        self.events.append(("finish", text))
        self.done.set()

    async def fail(self, user_message: str) -> None:
        self.events.append(("fail", user_message))
        self.done.set()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    def final(self) -> tuple[str, object]:
        return self.events[-1]

    async def wait(self, timeout: float = 10.0) -> tuple[str, object]:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.final()
