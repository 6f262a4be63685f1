"""Engines: the one model the worker talks to."""

from __future__ import annotations

import os

from bot.config import ModelConfig, Secrets
from bot.engine.base import Engine


def make_engine(model: ModelConfig, secrets: Secrets) -> Engine:
    """The engine ``[model] engine`` names (imported lazily: torch is heavy)."""
    if model.engine == "fake":
        from bot.engine.fake import FakeEngine

        return FakeEngine(context_length=model.context_length, prompt_format=model.prompt_format)
    if model.engine == "openai":
        from bot.engine.openai import OpenAIEngine

        return OpenAIEngine(model, api_key=secrets.openai_api_key)
    if model.decode == "batched":
        # GPTQModel turns on expandable segments when this is unset; the CUDA
        # graphs of the batched engine were measured without them.
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")
        from bot.engine.batched import BatchedEngine

        return BatchedEngine(model)
    from bot.engine.transformers import TransformersEngine

    return TransformersEngine(model)
