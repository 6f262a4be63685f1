"""The remote engine's cost: OpenAIEngine vs the same server called directly.

Starts ``transformers serve`` with the embedded SmolLM2 on 127.0.0.1 (as the
tests do), then, in the same run and on the same prompts and settings:

1. one reply at a time: time per reply through ``OpenAIEngine.stream`` and
   through a bare aiohttp SSE client sending the very same request body;
2. 8 conversations at once: wall time and tokens/s, both ways;
3. the client overhead alone, against the fake server streaming N pieces
   with no model behind it.

Usage: ``.venv/bin/python -m bench.openai_remote [--rounds 3] [--tokens 32]
[--threads 2] [--continuous-batching]``. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bot.config import ModelConfig
from bot.engine.openai import OpenAIEngine
from bot.prompt import PromptBuilder
from bot.types import Settings, Turn
from testkit.byte_tokenizer import byte_tokenizer
from testkit.openai_server import FakeOpenAIServer, TransformersServe, embedded_model_dir

HEADER = "| measure | direct client | OpenAIEngine | difference |\n|---|---|---|---|"

QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "What is 12 times 12?",
    "Who wrote Hamlet?", "What is the boiling point of water?", "Say hello in Spanish.",
    "What is the largest planet?", "How many days are in a week?",
]


@dataclass
class Run:
    seconds: float
    tokens: int
    first_s: float = 0.0


Reply = Callable[[list[int]], Awaitable[Run]]


async def engine_reply(engine: OpenAIEngine, ids: list[int], settings: Settings) -> Run:
    started = time.perf_counter()
    async for _ in engine.stream(ids, settings):
        pass
    stats = engine.last_stats
    assert stats is not None
    return Run(time.perf_counter() - started, stats.new_tokens, stats.first_token_s)


async def direct_reply(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Run:
    """A bare SSE client: the least any client must do."""
    started = time.perf_counter()
    tokens = pieces = 0
    first = 0.0
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            first = first or time.perf_counter() - started
            pieces += 1
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    return Run(time.perf_counter() - started, tokens or pieces, first)


async def concurrent(reply: Reply, prompts: list[list[int]]) -> Run:
    started = time.perf_counter()
    runs = await asyncio.gather(*(reply(p) for p in prompts))
    return Run(time.perf_counter() - started, sum(r.tokens for r in runs))


async def compare(engine: OpenAIEngine, settings: Settings, prompts: list[list[int]],
                  rounds: int) -> dict[str, list[Run]]:
    url = f"{engine.base_url}/v1/completions"
    dialect = engine._dialect or "ids"
    results: dict[str, list[Run]] = {"engine 1": [], "direct 1": [], "engine 8": [], "direct 8": []}
    async with aiohttp.ClientSession() as session:
        async def via_engine(ids: list[int]) -> Run:
            return await engine_reply(engine, ids, settings)

        async def via_direct(ids: list[int]) -> Run:
            return await direct_reply(session, url, engine._completion_body(dialect, ids, settings))

        ways = {"direct": via_direct, "engine": via_engine}
        for n in range(rounds):  # interleaved, order swapped each round: drift hits both alike
            order = ["direct", "engine"] if n % 2 == 0 else ["engine", "direct"]
            for ids in prompts[:4]:
                for way in order:
                    results[f"{way} 1"].append(await ways[way](ids))
            for way in order:
                results[f"{way} 8"].append(await concurrent(ways[way], prompts))
    return results


def table(results: dict[str, list[Run]]) -> str:
    e1 = statistics.median(r.seconds for r in results["engine 1"])
    d1 = statistics.median(r.seconds for r in results["direct 1"])
    tok1 = statistics.mean(r.tokens for r in results["engine 1"])
    f1e = statistics.median(r.first_s for r in results["engine 1"])
    f1d = statistics.median(r.first_s for r in results["direct 1"])
    e8 = [r.tokens / r.seconds for r in results["engine 8"]]
    d8 = [r.tokens / r.seconds for r in results["direct 8"]]
    w8e = statistics.median(r.seconds for r in results["engine 8"])
    w8d = statistics.median(r.seconds for r in results["direct 8"])
    return "\n".join([
        f"| one reply, first text, median s | {f1d:.3f} | {f1e:.3f} | {1000 * (f1e - f1d):+.0f} ms |",
        f"| one reply (~{tok1:.0f} tokens), whole, median s | {d1:.3f} | {e1:.3f} | {1000 * (e1 - d1):+.0f} ms |",
        f"| 8 at once, wall s (median) | {w8d:.2f} | {w8e:.2f} | {w8e - w8d:+.2f} s |",
        f"| 8 at once, tokens/s (median) | {statistics.median(d8):.1f} | {statistics.median(e8):.1f} | "
        f"{100 * (statistics.median(e8) / statistics.median(d8) - 1):+.1f} % |",
    ])


async def overhead(pieces: int, rounds: int) -> str:
    """Client cost alone: a fake server streams ``pieces`` pieces, no model."""
    server = await FakeOpenAIServer(pieces=["tok "] * pieces).start()
    config = ModelConfig(engine="openai", base_url=server.base_url, prompt_format="chat_template")
    engine = OpenAIEngine(config, tokenizer=byte_tokenizer())
    settings = Settings(0.0, 1.0, 0, 1.0, pieces, "")
    await engine.start()
    try:
        results = await compare(engine, settings, [[1, 2, 3]] * 8, rounds)
    finally:
        await engine.close()
        await server.close()
    e1 = statistics.median(r.seconds for r in results["engine 1"])
    d1 = statistics.median(r.seconds for r in results["direct 1"])
    return (f"| {pieces} pieces, no model, one reply | {1000 * d1:.1f} ms | {1000 * e1:.1f} ms | "
            f"{1000 * (e1 - d1) / pieces:+.3f} ms per piece |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--continuous-batching", action="store_true")
    args = parser.parse_args()
    no_model = await overhead(512, args.rounds)
    model_dir = embedded_model_dir()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    extra = ["--continuous-batching"] if args.continuous_batching else []
    server = TransformersServe(model_dir, log, threads=args.threads, extra_args=extra).start()
    print(f"transformers serve started in {server.start_s:.1f} s (threads={args.threads}, cb={bool(extra)})")
    try:
        config = ModelConfig(id=str(model_dir), engine="openai", base_url=server.base_url,
                             prompt_format="chat_template", context_length=2048, max_concurrency=8,
                             request_timeout=600)
        engine = OpenAIEngine(config)
        await engine.start()
        settings = Settings(0.0, 1.0, 0, 1.0, args.tokens, "You are a helpful assistant.")
        builder = PromptBuilder(engine.tokenizer, fmt="chat_template", context_length=2048)
        prompts = [builder.build([Turn("user", q)], settings, is_dm=True).ids for q in QUESTIONS]
        await engine_reply(engine, prompts[0], settings)  # warm-up; settles the dialect
        print(HEADER)
        results = await compare(engine, settings, prompts, args.rounds)
        print(table(results))
        print(no_model)
        for way in ("direct 8", "engine 8"):
            print(f"{way}: walls", [round(r.seconds, 2) for r in results[way]],
                  "tokens", [r.tokens for r in results[way]])
        await engine.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
