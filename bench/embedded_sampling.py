"""Which sampling settings suit the embedded model (SmolLM2-135M-Instruct)?

    PYTHONPATH=. .venv/bin/python -m bench.embedded_sampling [--seeds 3] [--max-new-tokens 64]

Eight factual questions, each asked alone in a fresh DM through the real
prompt path (chat template, system prompt from the settings) and the real
engine, under a few candidate settings; sampled settings are run with several
seeds. Prints one row a candidate: replies whose first sentence holds the
expected answer, replies that ran to the token cap instead of ending
(rambling), replies in French (the shipped settings answered the capital of
France in French), mean length. The table goes into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

from bot.config import EMBEDDED_MODEL, GenerationConfig, parse_config, settings_from_generation
from bot.engine.transformers import TransformersEngine
from bot.prompt import PromptBuilder
from bot.types import Settings, Turn

QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the chemical symbol for gold?", ("au",)),
    ("What is 7 times 8?", ("56",)),
    ("At what temperature in degrees Celsius does water boil at sea level?", ("100",)),
    ("Which is the largest ocean on Earth?", ("pacific",)),
]

SHIPPED = settings_from_generation(GenerationConfig())
SHORT = "You are a helpful assistant. Answer the question briefly and in English."
#: The system prompt SmolLM2's own chat template puts in when none is given.
OWN = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CANDIDATES: dict[str, Settings] = {
    "shipped: T 0.1, top_p 0.95, rep 1.1, Vicuna system prompt": SHIPPED,
    "greedy, rep 1.1, Vicuna prompt": dataclasses.replace(SHIPPED, temperature=0.0),
    "greedy, rep 1.0, Vicuna prompt": dataclasses.replace(SHIPPED, temperature=0.0, repetition_penalty=1.0),
    "greedy, rep 1.0, short prompt": dataclasses.replace(
        SHIPPED, temperature=0.0, repetition_penalty=1.0, system_prompt=SHORT),
    "greedy, rep 1.0, SmolLM's own prompt": dataclasses.replace(
        SHIPPED, temperature=0.0, repetition_penalty=1.0, system_prompt=OWN),
    "greedy, rep 1.1, SmolLM's own prompt": dataclasses.replace(SHIPPED, temperature=0.0, system_prompt=OWN),
    "T 0.2, top_p 0.9, rep 1.1, SmolLM's own prompt": dataclasses.replace(
        SHIPPED, temperature=0.2, top_p=0.9, system_prompt=OWN),
}
#: Words that show a reply has gone into French (the shipped settings did).
FRENCH = {"le", "la", "les", "est", "une", "des", "du", "et", "de", "au", "pays"}


def first_sentence(reply: str) -> str:
    return re.split(r"(?<=[.!?])\s|\n", reply.strip(), maxsplit=1)[0]


def correct(reply: str, expected: tuple[str, ...]) -> bool:
    """The expected word in the first sentence: the answer comes first."""
    words = set(re.findall(r"[a-z0-9]+", first_sentence(reply).lower()))
    return any(e in words for e in expected)


def french(reply: str) -> bool:
    words = re.findall(r"[a-zà-ÿ]+", reply.lower())
    return sum(w in FRENCH for w in words) >= 3


async def ask(engine: TransformersEngine, builder: PromptBuilder, question: str, settings: Settings) -> tuple[str, int]:
    ids = builder.build([Turn("user", question)], settings, is_dm=True).ids
    text = "".join([piece async for piece in engine.stream(ids, settings)])
    assert engine.last_stats is not None
    return text, engine.last_stats.new_tokens


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show", action="store_true", help="print every reply")
    args = parser.parse_args()
    import torch

    config = parse_config({}, model_override=EMBEDDED_MODEL)
    engine = TransformersEngine(config.model)
    await engine.start()
    builder = PromptBuilder(engine.tokenizer, fmt=engine.prompt_format, context_length=engine.context_length)
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens}")
    print("| settings | replies | right answer in the first sentence | ran to the cap | in French | mean tokens |")
    print("|---|---|---|---|---|---|")
    for name, base in CANDIDATES.items():
        settings = dataclasses.replace(base, max_new_tokens=args.max_new_tokens)
        seeds = range(args.seeds) if settings.temperature > 0 else range(1)
        right = capped = foreign = tokens = runs = 0
        for seed in seeds:
            for question, expected in QUESTIONS:
                torch.manual_seed(seed)
                reply, n = await ask(engine, builder, question, settings)
                runs += 1
                right += correct(reply, expected)
                capped += n >= settings.max_new_tokens
                foreign += french(reply)
                tokens += n
                if args.show:
                    print(f"  [{name} / seed {seed}] {question} -> {reply!r}")
        print(f"| {name} | {runs} | {right}/{runs} | {capped}/{runs} | {foreign}/{runs} | {tokens / runs:.0f} |",
              flush=True)
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
