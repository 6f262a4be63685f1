"""CPU benchmark of the core on the embedded model.

    .venv/bin/python -m bench.core [--replies 6] [--max-new-tokens 64]

Measures, in one run and interleaved (direct, worker, direct, worker...):
- the engine called directly: time to first piece, decode tokens/s;
- the same prompts through the console path (Bot.handle → store → queue →
  worker → engine → ConsoleSink): time to first text on the terminal, total;
- the worker's overhead per reply against the direct call.
Greedy decoding, so both paths generate the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

from adapters.console import KEY, ConsoleSink
from bot.app import Bot
from bot.config import EMBEDDED_MODEL, parse_config, settings_from_generation
from bot.engine.transformers import TransformersEngine
from bot.prompt import PromptBuilder
from bot.store import Store
from bot.types import Incoming, Turn

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for learning Python.",
    "Explain what a large language model is.",
    "How many apples are left if I have 5 and eat 2?",
    "Write a haiku about autumn.",
    "What is the difference between a list and a tuple?",
]


class StampedOut(io.StringIO):
    """A terminal stand-in that notes when the first reply text arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first_text: float | None = None

    def write(self, s: str) -> int:
        if self.first_text is None and s.strip() and s.strip() != "xwin>":
            self.first_text = time.perf_counter()
        return super().write(s)


async def direct(engine: TransformersEngine, builder: PromptBuilder, question: str,
                 settings: object) -> dict[str, float]:
    ids = builder.build([Turn("user", question)], settings, is_dm=True).ids  # type: ignore[arg-type]
    start = time.perf_counter()
    first = None
    async for _piece in engine.stream(ids, settings):  # type: ignore[arg-type]
        first = first or time.perf_counter()
    total = time.perf_counter() - start
    stats = engine.last_stats
    assert stats is not None and first is not None
    return {"ttft": first - start, "total": total, "tokens": stats.new_tokens, "tps": stats.tokens_per_s}


async def through_worker(bot: Bot, question: str, n: int) -> dict[str, float]:
    out = StampedOut()
    sink = ConsoleSink(out, interactive=True)  # streams like a terminal
    incoming = Incoming(KEY, f"bench-{n}", "bench", "bench", question, True, time.time())
    await bot.store.forget(KEY)  # same one-turn prompt as the direct call
    start = time.perf_counter()
    await bot.handle(incoming, sink)
    await sink.done.wait()
    total = time.perf_counter() - start
    assert out.first_text is not None
    stats = bot.engine.last_stats  # type: ignore[attr-defined]
    return {"ttft": out.first_text - start, "total": total, "tokens": stats.new_tokens,
            "tps": stats.tokens_per_s}


async def main(replies: int, max_new_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {"bot": {"database": "bench.sqlite3", "stream_interval": 0.0},
             "generation": {"temperature": 0.0, "max_new_tokens": max_new_tokens}},
            base_dir=Path(tmp), model_override=EMBEDDED_MODEL,
        )
        settings = settings_from_generation(config.generation)
        engine = TransformersEngine(config.model)
        load_start = time.perf_counter()
        async with Store(config.database_path()) as store:
            bot = Bot(config, store, engine)
            await bot.start()
            load_s = time.perf_counter() - load_start
            builder = PromptBuilder(engine.tokenizer, fmt=engine.prompt_format,
                                    context_length=engine.context_length)
            await direct(engine, builder, "Hi", dataclasses.replace(settings, max_new_tokens=4))  # warm-up
            rows_d, rows_w = [], []
            for i in range(replies):
                q = QUESTIONS[i % len(QUESTIONS)]
                rows_d.append(await direct(engine, builder, q, settings))
                rows_w.append(await through_worker(bot, q, i))
            await bot.close()
    report(rows_d, rows_w, load_s, max_new_tokens)


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(rows_d: list[dict[str, float]], rows_w: list[dict[str, float]], load_s: float, mnt: int) -> None:
    overhead = [w["total"] - d["total"] for d, w in zip(rows_d, rows_w, strict=True)]
    same_tokens = all(d["tokens"] == w["tokens"] for d, w in zip(rows_d, rows_w, strict=True))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"model: embedded SmolLM2-135M-Instruct (GGUF, float32), greedy, max_new_tokens={mnt}, "
          f"{len(rows_d)} replies each path, interleaved; load {load_s:.1f} s")
    print(f"same tokens generated on both paths: {same_tokens}")
    print()
    print("| path | time to first text (median) | decode tokens/s (median) | reply time (median) |")
    print("|---|---|---|---|")
    for name, rows in (("engine called directly", rows_d), ("console → Bot → store → worker", rows_w)):
        print(f"| {name} | {med(rows, 'ttft') * 1000:.0f} ms | {med(rows, 'tps'):.1f} | "
              f"{med(rows, 'total'):.2f} s |")
    ratio = sum(d["total"] for d in rows_d) / sum(w["total"] for w in rows_w)
    print()
    print(f"worker overhead per reply: median {statistics.median(overhead) * 1000:.0f} ms, "
          f"max {max(overhead) * 1000:.0f} ms; worker throughput = {ratio:.3f} × direct")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--replies", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.replies, args.max_new_tokens))
