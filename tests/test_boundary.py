"""The one event boundary (adapters/boundary.py): a failing handler is logged
with its context, the user gets one safe sentence, cancellation passes."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest

from adapters.boundary import EventBoundary
from adapters.console import ConsoleAdapter
from adapters.strings import SORRY
from bot.app import Bot
from bot.engine.fake import FakeEngine
from bot.store import Store
from tests.conftest import make_config

LEAK = "CUDA error at /home/ops/xwin/.env token=xoxb-1234-SECRET-5678"
log = logging.getLogger("tests.boundary")


class Told:
    def __init__(self, fails: bool = False) -> None:
        self.texts: list[str] = []
        self.fails = fails

    async def __call__(self, text: str) -> None:
        self.texts.append(text)
        if self.fails:
            raise ConnectionError("the platform is down too")


def boundary(errors: list[int]) -> EventBoundary:
    return EventBoundary("test", log, lambda: errors.append(1))


async def fails() -> None:
    raise RuntimeError(LEAK)


async def test_a_failing_handler_is_logged_counted_and_the_user_told_one_safe_sentence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[int] = []
    told = Told()
    await boundary(errors).run(fails(), "message 42 in C1", tell=told)
    assert told.texts == [SORRY]
    assert "SECRET" not in SORRY and "RuntimeError" not in SORRY
    [record] = [r for r in caplog.records if r.name == "tests.boundary"]
    assert record.levelno == logging.ERROR and "test: message 42 in C1 failed" in record.getMessage()
    assert record.exc_info is not None and LEAK in caplog.text  # the detail is in the log
    assert errors == [1]


async def test_cancellation_passes_through_untold_and_uncounted() -> None:
    errors: list[int] = []
    told = Told()

    async def waits_forever() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(boundary(errors).run(waits_forever(), "an event", tell=told))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert told.texts == [] and errors == []


async def test_a_failing_tell_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    told = Told(fails=True)
    await boundary([]).run(fails(), "an event", tell=told)
    assert told.texts == [SORRY]
    assert "could not tell the user that an event failed: the platform is down too" in caplog.text


async def test_console_tells_one_sentence_when_a_message_fails_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path)
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, FakeEngine())
        await bot.start()
        out = io.StringIO()
        console = ConsoleAdapter(bot, stdin=io.StringIO("hello\n/xwin\n"), stdout=out,
                                 interactive=False, user="aki")
        await store.close()  # the database is gone: handling the message fails
        await console.start()
        await asyncio.wait_for(console.wait_closed(), 10)
        await console.close()
        await bot.close()
    blocks = out.getvalue().split("\n\n")
    assert blocks[0] == SORRY  # the message: one safe sentence
    assert blocks[1] != SORRY and blocks[1].strip()  # the next line was still read and answered
    assert "the store is not open" not in out.getvalue()
    assert "console: a message failed" in caplog.text and "the store is not open" in caplog.text
    assert bot.metrics.errors.labels("adapter")._value.get() == 1
