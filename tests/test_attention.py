"""Decode attention's torch form (the CPU path and the GPU kernels' oracle)
against attention computed row by row over exactly the row's own keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bot.engine import attention


def test_reference_reads_each_rows_own_keys_and_nothing_past_them() -> None:
    g = torch.Generator().manual_seed(0)
    rows, heads, n_kv, hd, max_len, ctx = 4, 8, 2, 16, 40, 32
    q = torch.randn(rows, heads, hd, generator=g)
    kc = torch.randn(rows + 1, n_kv, max_len, hd, generator=g)
    vc = torch.randn(rows + 1, n_kv, max_len, hd, generator=g)
    pos = torch.tensor([0, 7, ctx - 1, max_len - 1])  # the last: a padded row's scratch position, past ctx
    # what lies past each row's position (and past ctx) must not count (finite:
    # torch's form multiplies it by 0, where the GPU kernels do not read it)
    kc_noisy, vc_noisy = kc.clone(), vc.clone()
    for r, p in enumerate(pos.tolist()):
        kc_noisy[r, :, min(p, ctx - 1) + 1 :] = 1e4
        vc_noisy[r, :, min(p, ctx - 1) + 1 :] = -1e4
    got = attention.decode(q, kc_noisy, vc_noisy, pos, ctx, hd**-0.5)
    assert got.shape == (rows, heads * hd)
    for r, p in enumerate(pos.tolist()):
        n = min(p, ctx - 1) + 1
        keys = kc[r, :, :n].repeat_interleave(heads // n_kv, dim=0)  # query head i reads kv head i // group
        values = vc[r, :, :n].repeat_interleave(heads // n_kv, dim=0)
        want = F.scaled_dot_product_attention(q[r][:, None], keys, values)[:, 0].reshape(-1)
        assert torch.allclose(got[r], want, atol=1e-5), r


def test_the_kernels_are_not_used_off_the_gpu() -> None:
    assert not attention.supports(torch.device("cpu"), torch.float16, 128, 8)
