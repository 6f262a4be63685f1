"""Never serve garbage: the load-time check of a model's logits.

A GPTQ kernel can be wrong for a checkpoint it accepts (GPTQModel's Marlin
gives NaN on group size -1; ExLlamaV2 decodes wrongly under CUDA graph replay
there: docs/gpu-notes.md). So at load, one forward of a fixed prompt must give
finite logits, and the batched decode path (prefill, then one decode step,
graph-replayed on the GPU) must match transformers' own forward within
:data:`TOLERANCE`. Otherwise the engine does not start: :class:`ConfigError`
with one sentence naming the model, the kernel and what to set instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bot.engine.base import PromptTokenizer
from bot.engine.batched.core import Fill
from bot.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TEXT = "USER: Hello! What is the capital of France, and why? ASSISTANT:"
# Relative L2 error of logits, batched path vs transformers' forward. fp16 on
# the GPU measured 0 at prefill and 2e-4 to 4e-4 at a decode step with every
# correct kernel; a wrong kernel gave 1.5 (docs/gpu-notes.md).
TOLERANCE = 2e-2


def probe_ids(tokenizer: PromptTokenizer) -> list[int]:
    """The fixed prompt's ids (BOS first where the tokenizer has one)."""
    ids = tokenizer.encode_template(PROBE_TEXT)
    bos = tokenizer.bos_id
    out = ([bos] if bos is not None else []) + list(ids)
    return out if len(out) >= 2 else [*out, *out, 0][:2]


def unusable(model_id: str, kernel: str, backend: str, problem: str) -> ConfigError:
    """The one-sentence start-up error: model, kernel, what to set instead."""
    if not kernel and backend == "auto":
        return ConfigError(
            f"model {model_id} {problem}; check the checkpoint and [model] dtype "
            "(\"float16\" or \"bfloat16\" on a GPU)"
        )
    alternative = "torch" if backend == "marlin" else "marlin"
    if "tensor-core" in kernel:  # the row packing alone: its batches through fused Marlin first
        return ConfigError(
            f"model {model_id} {problem} with the GPTQ kernels {kernel}: set [model] "
            f"batch_kernel = \"marlin\" (or row_kernel = false, Marlin alone) instead"
        )
    if "row kernel" in kernel:  # fused products: Marlin alone is the nearer fallback
        return ConfigError(
            f"model {model_id} {problem} with the GPTQ kernels {kernel}: set [model] "
            f"row_kernel = false (Marlin alone) or gptq_backend = \"{alternative}\" instead"
        )
    return ConfigError(
        f"model {model_id} {problem} with the GPTQ kernel {kernel or backend} "
        f"([model] gptq_backend = \"{backend}\"): set gptq_backend = \"{alternative}\" instead"
    )


@torch.no_grad()
def forward_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """transformers' own forward: logits ``[len(ids), vocab]`` in float32."""
    inputs = torch.tensor([ids], device=model.device)
    out: torch.Tensor = model(inputs).logits[0].float()
    return out


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_forward(model: Any, ids: list[int], model_id: str, kernel: str, backend: str) -> torch.Tensor:
    """Raise unless the forward's logits are all finite; return them."""
    logits = forward_logits(model, ids)
    if not bool(torch.isfinite(logits).all()):
        log.error("load check: non-finite logits from %s (kernel %s)", model_id, kernel or "-")
        raise unusable(model_id, kernel, backend, "gives non-finite logits (NaN or infinity)")
    return logits


def check_decode_path(
    core: Any, ids: list[int], reference: torch.Tensor, model_id: str, kernel: str, backend: str
) -> tuple[float, float]:
    """Prefill ``ids[:-1]`` into row 0, one decode step with ``ids[-1]``
    (graph-replayed where the core uses graphs); both logits against
    transformers' forward (``reference``, from :func:`forward_logits`).
    With fused products (bot/engine/products.py) each kernel they hold is
    checked: also a prompt long enough for the dequantizing path (where the
    cache holds one; with a decode step of row 0 in the same forward, as the
    scheduler's mixed turns run), and a step of two rows (the batch kernel).
    Raise if any is non-finite or off by more than :data:`TOLERANCE`;
    return (prefill error, step error)."""
    products = core.products or []
    with torch.no_grad():
        first = core.prefill(0, ids[:-1]).float()
        step = core.step([ids[-1]], [len(ids) - 1])[0].float()
        prefill_error = relative_error(first, reference[-2])
        step_error = relative_error(step, reference[-1])
        finite = bool(torch.isfinite(first).all()) and bool(torch.isfinite(step).all())
        # long prompts go through another kernel: check it too, if a prompt that
        # long fits, in one forward with a decode step of row 0 where there
        # are two rows (the scheduler's mixed turns: the step through it too)
        if products and core.prompt_min_tokens < core.scratch:
            n = core.prompt_min_tokens
            long_ids = (ids * (n // len(ids) + 1))[:n]
            if core.max_batch >= 2:
                fill, mixed = core.forward([Fill(1, long_ids)], [ids[-1]], [len(ids) - 1])
                long = fill[0].float()
                finite = finite and bool(torch.isfinite(mixed).all())
                step_error = max(step_error, relative_error(mixed[0].float(), reference[-1]))
                core.clear(1)
            else:
                long = core.prefill(0, long_ids).float()
            finite = finite and bool(torch.isfinite(long).all())
            prefill_error = max(prefill_error, relative_error(long, forward_logits(core.model, long_ids)[-1]))
        # steps of several rows go through the batch kernel
        if products and products[0].qkv.batch is not None and core.max_batch >= 2:
            for row in (0, 1):
                core.prefill(row, ids[:-1])
            pair = core.step([ids[-1]] * 2, [len(ids) - 1] * 2).float()
            finite = finite and bool(torch.isfinite(pair).all())
            step_error = max(step_error, *(relative_error(pair[r], reference[-1]) for r in (0, 1)))
            core.clear(1)
    errors = (prefill_error, step_error)
    log.info("load check: batched path vs transformers' forward, prefill %.1e, decode step %.1e",
             *errors)
    if not finite or max(errors) > TOLERANCE:
        what = "non-finite" if not finite else f"off by {max(errors):.2g} (relative)"
        log.error("load check failed for %s (kernel %s): batched logits %s", model_id, kernel, what)
        raise unusable(
            model_id, kernel, backend,
            f"decodes wrongly on the batched path (logits {what} against transformers' forward)",
        )
    return errors
