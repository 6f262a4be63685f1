"""The residual add + RMSNorm's torch form (the CPU path, the compiled glue
and the GPU kernel's oracle) against the model's own RMSNorm module."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bot.engine import norm


def test_reference_is_the_residual_sum_and_the_models_own_rmsnorm_of_it() -> None:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(3, 64, generator=g)).half()
    y = torch.randn(3, 64, generator=g).half()
    module = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
    module = module.half()
    s, h = norm.add_rms_norm(x, y, module.weight, 1e-5)  # off the GPU: the reference
    assert s.dtype == h.dtype == torch.float16
    assert torch.equal(s, x + y)  # the residual stream in half, as the model adds it
    with torch.no_grad():
        want = module(x + y)
    assert torch.allclose(h.float(), want.float(), rtol=2e-3, atol=2e-3)
    # each row normalized by its own mean square: scaling one row leaves the others
    x2 = x.clone()
    x2[1] *= 4
    _, h2 = norm.add_rms_norm(x2, torch.zeros_like(y), module.weight, 1e-5)
    _, h0 = norm.add_rms_norm(x, torch.zeros_like(y), module.weight, 1e-5)
    assert torch.equal(h2[0], h0[0]) and torch.equal(h2[2], h0[2])
    assert torch.allclose(h2[1].float(), h0[1].float(), rtol=2e-3, atol=2e-3)


def test_the_kernel_is_not_used_off_the_gpu() -> None:
    assert not norm.supports(torch.device("cpu"), torch.float16, 8192)
