"""The sampler: each row's own temperature, top-k, top-p and repetition penalty,
applied to a batch of logits at once on the model's device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bot.types import Settings


class Sampler:
    """Per-row temperature / top-k / top-p / repetition penalty, batched on the GPU."""

    def __init__(self, max_batch: int, vocab: int, device: torch.device) -> None:
        self.seen = torch.zeros(max_batch, vocab, dtype=torch.bool, device=device)
        self.device = device
        self.vocab = vocab

    def admit(self, row: int, prompt: Sequence[int]) -> None:
        self.seen[row].zero_()
        idx = torch.tensor([i for i in prompt if 0 <= i < self.vocab], dtype=torch.long)
        self.seen[row, idx.to(self.device)] = True

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            self.seen[dst] = self.seen[src]

    def sample(self, logits: torch.Tensor, settings: Sequence[Settings], row0: int = 0) -> list[int]:
        """Next token of rows ``row0..row0+n-1`` from their logits ``[n, vocab]``."""
        out: list[int] = self.sample_ids(logits, settings, row0).tolist()
        return out

    @torch.no_grad()
    def sample_ids(self, logits: torch.Tensor, settings: Sequence[Settings], row0: int = 0) -> torch.Tensor:
        """:meth:`sample`'s tokens left on the device (``[n]`` int64): the
        next step can take them as its input before the CPU reads them."""
        n = logits.shape[0]
        seen = self.seen[row0 : row0 + n]
        x = logits.float()
        pens = [s.repetition_penalty for s in settings]
        if any(p != 1.0 for p in pens):
            pen = torch.tensor(pens, dtype=torch.float32).to(self.device, non_blocking=True)[:, None]
            penalized = torch.where(x > 0, x / pen, x * pen)
            x = torch.where(seen, penalized, x)
        temps = [s.temperature for s in settings]
        if all(t <= 1e-5 for t in temps):
            nxt = torch.argmax(x, dim=-1)
        else:
            greedy = torch.argmax(x, dim=-1)
            t = torch.tensor([max(v, 1e-5) for v in temps], dtype=torch.float32)
            x = x / t.to(self.device, non_blocking=True)[:, None]
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            ks = [s.top_k if s.top_k > 0 else self.vocab for s in settings]
            ps = [s.top_p if 0 < s.top_p < 1 else 1.0 for s in settings]
            k = torch.tensor(ks, dtype=torch.long).to(self.device, non_blocking=True)[:, None]
            p = torch.tensor(ps, dtype=torch.float32).to(self.device, non_blocking=True)[:, None]
            rank = torch.arange(self.vocab, device=self.device)[None, :]
            cum = torch.cumsum(probs, dim=-1)
            drop = (rank >= k) | ((cum - probs) > p)
            probs = probs.masked_fill(drop, 0.0).nan_to_num(0.0)
            probs[:, 0] = probs[:, 0].clamp_min(1e-30)  # never an all-zero row (NaN logits)
            pick = torch.multinomial(probs, 1)
            sampled = order.gather(-1, pick)[:, 0]
            is_greedy = torch.tensor([v <= 1e-5 for v in temps]).to(self.device, non_blocking=True)
            nxt = torch.where(is_greedy, greedy, sampled)
        seen[torch.arange(n, device=self.device), nxt] = True
        return nxt
