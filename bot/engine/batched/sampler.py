"""The sampler: each row's own temperature, top-k, top-p and repetition penalty,
applied to a batch of logits at once on the model's device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bot.types import Settings


@dataclass(frozen=True)
class _RowParams:
    """Each row's settings on the device, ``[n, 1]`` (``greedy``: ``[n]``)."""

    key: tuple[tuple[float, float, int, float], ...]
    penalized: bool  # some row's repetition penalty is not 1
    all_greedy: bool
    penalty: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor


class Sampler:
    """Per-row temperature / top-k / top-p / repetition penalty, batched on the GPU."""

    def __init__(self, max_batch: int, vocab: int, device: torch.device) -> None:
        self.seen = torch.zeros(max_batch, vocab, dtype=torch.bool, device=device)
        self.device = device
        self.vocab = vocab
        self._last: _RowParams | None = None
        self._rank = torch.arange(vocab, device=device)[None, :]

    def admit(self, row: int, prompt: Sequence[int]) -> None:
        self.seen[row].zero_()
        idx = torch.tensor([i for i in prompt if 0 <= i < self.vocab], dtype=torch.long)
        self.seen[row].index_fill_(0, idx.to(self.device, non_blocking=True), True)

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            self.seen[dst] = self.seen[src]

    def sample(self, logits: torch.Tensor, settings: Sequence[Settings], row0: int = 0) -> list[int]:
        """Next token of rows ``row0..row0+n-1`` from their logits ``[n, vocab]``."""
        out: list[int] = self.sample_ids(logits, settings, row0).tolist()
        return out

    def _params(self, settings: Sequence[Settings]) -> _RowParams:
        """The rows' settings as device tensors, made again only when they
        change: a copy from the CPU's pageable memory may wait for the GPU
        (the driver stages it), which would stall the scheduler's lookahead."""
        key = tuple((s.repetition_penalty, s.temperature, s.top_k, s.top_p) for s in settings)
        if self._last is None or self._last.key != key:
            table = torch.tensor(
                [
                    [pen, max(t, 1e-5), k if k > 0 else self.vocab, p if 0 < p < 1 else 1.0, float(t <= 1e-5)]
                    for pen, t, k, p in key
                ],
                dtype=torch.float32,
            ).to(self.device)
            self._last = _RowParams(
                key, any(pen != 1.0 for pen, *_ in key), all(t <= 1e-5 for _, t, *_ in key),
                table[:, 0:1], table[:, 1:2], table[:, 2:3].long(), table[:, 3:4], table[:, 4].bool(),
            )
        return self._last

    @torch.no_grad()
    def sample_ids(self, logits: torch.Tensor, settings: Sequence[Settings], row0: int = 0) -> torch.Tensor:
        """:meth:`sample`'s tokens left on the device (``[n]`` int64): the
        next step can take them as its input before the CPU reads them."""
        n = logits.shape[0]
        seen = self.seen[row0 : row0 + n]
        x = logits.float()
        rp = self._params(settings)
        if rp.penalized:
            penalized = torch.where(x > 0, x / rp.penalty, x * rp.penalty)
            x = torch.where(seen, penalized, x)
        if rp.all_greedy:
            nxt = torch.argmax(x, dim=-1)
        else:
            greedy = torch.argmax(x, dim=-1)
            x = x / rp.temperature
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            cum = torch.cumsum(probs, dim=-1)
            drop = (self._rank >= rp.top_k) | ((cum - probs) > rp.top_p)
            probs = probs.masked_fill(drop, 0.0).nan_to_num(0.0)
            probs[:, 0] = probs[:, 0].clamp_min(1e-30)  # never an all-zero row (NaN logits)
            # One draw from each row's probs: argmax of p / q, q ~ Exp(1), as
            # torch.multinomial draws one sample, without its two .item()
            # checks: each waits for the GPU, so no step could be queued
            # behind a sampled one.
            q = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
            sampled = order.gather(-1, torch.argmax(probs / q, dim=-1, keepdim=True))[:, 0]
            nxt = torch.where(rp.greedy, greedy, sampled)
        # A scalar scattered, not ``seen[rows, nxt] = True``: torch makes that
        # True a CPU tensor and copies it to the GPU with a wait for the
        # stream, so every call would wait for the step it samples
        # (docs/gpu-notes.md, item 35).
        seen.scatter_(1, nxt[:, None], True)
        return nxt
