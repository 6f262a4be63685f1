from __future__ import annotations

import os

# No test may reach the internet: the hub is off, and only 127.0.0.1 is used.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TQDM_DISABLE", "1")

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import Config, parse_config
from bot.engine.transformers import HFPromptTokenizer
from tests.llama_tokenizer import build_llama_tokenizer


@pytest.fixture(scope="session")
def llama_tok() -> HFPromptTokenizer:
    return HFPromptTokenizer(build_llama_tokenizer())


@pytest.fixture(scope="session")
def embedded_tok() -> HFPromptTokenizer:
    from bot.config import EMBEDDED_MODEL, ModelConfig
    from bot.engine.transformers import load_tokenizer

    return load_tokenizer(ModelConfig(id=EMBEDDED_MODEL))


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {"bot": {"database": str(tmp_path / "bot.sqlite3"), "stream_interval": 0.0}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw, base_dir=tmp_path)


@pytest.fixture(params=[False, True], ids=["read-each-step", "lookahead"])
def lookahead(request: pytest.FixtureRequest) -> bool:
    """The batched scheduler both ways: reading each step before queuing the
    next (the CPU's default), and queuing one step ahead (the GPU's)."""
    return bool(request.param)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "bot.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Any]:
    from bot.store import Store

    async with Store(db_path) as s:
        yield s
