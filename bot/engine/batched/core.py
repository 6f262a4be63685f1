"""The decode core: a static KV cache, CUDA graphs and the fused glue.

:class:`DecodeCore` runs the model's own modules (embedding, norms, the GPTQ
projections, ``lm_head``) over a cache ``[layers, rows, kv_heads, max_len,
head_dim]``: a prompt is prefilled into one row, and a decode step advances
rows ``0..n-1`` by one token each, captured once per (batch bucket, context
bucket) as a CUDA graph and replayed. The small element-wise work between the
quantized products can be fused by ``torch.compile`` (``_glue_*``). One
thread uses it: the scheduler's.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from bot.engine import attention, cuda_ext
from bot.engine import norm as residual_norm
from bot.engine.products import LAYOUT, PROMPT_MIN_TOKENS, ROW_MAX_ROWS, LayerProducts
from bot.errors import GenerationError

_MODULES = {name: (parent, attrs) for name, parent, attrs in LAYOUT}  # product -> the model's modules
# Decode steps of at most this many rows take their attention in
# bot/engine/attention.py's kernels, larger ones in torch's matmuls: 8 layers
# on the H200 at ~1,100 positions, a step 1.263 against 1.283 ms at one row,
# 2.895 against 2.863 at 32 (docs/gpu-notes.md, item 34).
ATTENTION_KERNEL_MAX_ROWS = 1
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
_CTX_BUCKETS = tuple(range(256, 32768 + 1, 256))  # attention reads at most 255 extra positions
# What a prompt's attention may run on (torch's SDPA), in torch's order: not
# cuDNN's, which torch prefers on Hopper and which builds a graph for each new
# prompt length (docs/gpu-notes.md item 41).
PROMPT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Fill(NamedTuple):
    """A prompt chunk for :meth:`DecodeCore.forward`: ``ids[start:]`` go into
    ``row``'s cache at positions ``start..len(ids)-1`` (the row holds the
    first ``start`` already)."""

    row: int
    ids: Sequence[int]
    start: int = 0


def _bucket(n: int, buckets: Sequence[int], cap: int) -> int:
    for b in buckets:
        if b >= n:
            return min(b, cap)
    return cap


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _glue_rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _glue_rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, layer: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
) -> torch.Tensor:
    """Rope on q and k, k and v written into the whole caches at ``[layer, rows,
    :, pos]`` (in place), q returned: one compiled kernel where rope and two
    index writes were three or four (3.3 us each at one row on the H200).
    ``layer`` is a one-element tensor, so that one compilation serves every
    layer."""
    q, k = _glue_rope_qk(q, k, cos, sin)
    k_cache[layer, rows, :, pos] = k
    v_cache[layer, rows, :, pos] = v
    return q


def _glue_probs(s: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(s.float() * scale + bias, dim=-1).to(s.dtype)


def _glue_add_norm(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_norm.reference(x, y, w, eps)


def _glue_silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


# The same glue for prompts, as functions of their own: torch.compile keeps its
# compilations and its automatic-dynamic state per function (per code object),
# so the prompts' (the length dynamic) stay apart from the decode step's
# (static shapes, one per batch bucket, captured into CUDA graphs).
def _prompt_rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _glue_rope_qk(q, k, cos, sin)


def _prompt_add_norm(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _glue_add_norm(x, y, w, eps)


def _prompt_silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _glue_silu_mul(g, u)


def _eps(norm: Any) -> float:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    return float(eps)


class DecodeCore:
    """The model's decode loop over a static KV cache (one thread uses it).

    Rows ``0..n-1`` are the live sequences. :meth:`prefill` fills one row from
    a prompt, :meth:`step` advances rows ``0..n-1`` by one token each,
    :meth:`move` copies a row's cache into another row (compaction).
    """

    def __init__(
        self,
        model: Any,
        max_batch: int,
        max_len: int,
        use_graphs: bool | None = None,
        fused_norm: bool = True,
        compile_glue: bool = False,
        attention_kernel: bool = True,
        norm_kernel: bool = True,
        dependent_launch: bool = True,
    ) -> None:
        inner = model.model
        cfg = model.config
        self.model = model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.vocab: int = cfg.vocab_size
        self.max_batch = max_batch
        self.max_len = max_len
        self.device: torch.device = self.embed.weight.device
        self.dtype: torch.dtype = self.embed.weight.dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        # torch's one-kernel RMSNorm instead of the module's six small kernels
        self.fused_norm = fused_norm and hasattr(F, "rms_norm")
        self.glue: dict[str, Callable[..., Any]] | None = None
        if compile_glue:
            self.set_compiled_glue(True)
        n_layers = len(self.layers)
        shape = (n_layers, max_batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Position max_len-1 is scratch: padded rows and graph warm-ups write there.
        self.scratch = max_len - 1
        with torch.no_grad():
            pos = torch.arange(max_len, device=self.device)[None]
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(dummy, pos)
        self.cos = cos[0].to(self.dtype).contiguous()
        self.sin = sin[0].to(self.dtype).contiguous()
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.positions = torch.full((max_batch,), self.scratch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(max_batch, device=self.device)
        # each layer's index as a tensor of its own (the compiled rope_store's argument)
        self.layer_ids = [torch.full((1,), i, dtype=torch.long, device=self.device) for i in range(n_layers)]
        self.ctx_range = torch.arange(max_len, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self._plan: list[tuple[int, int]] | None = None  # graphs warm_next has still to capture
        self.capture_s = 0.0
        # Fused products per layer (bot/engine/products.py), where the loader
        # built them; otherwise the model's own modules.
        self.products: list[LayerProducts] | None = None
        self.row_max_rows = ROW_MAX_ROWS  # decode steps this small use the row kernel
        self.prompt_min_tokens = PROMPT_MIN_TOKENS  # prompts this long: dequantize + cuBLAS
        self.prompt_attention = list(PROMPT_ATTENTION)  # the SDPA backends a prompt's attention may use
        # Small decode steps' attention in bot/engine/attention.py's kernels,
        # where they take this model (on a GPU; the first start builds them).
        self.attention_kernel = False
        self.attention_max_rows = ATTENTION_KERNEL_MAX_ROWS
        self.set_attention_kernel(attention_kernel)
        # The compiled step's residual add + RMSNorm in bot/engine/norm.py's
        # kernel, where it takes this model (on a GPU, with the glue compiled:
        # the first start builds it).
        self.norm_kernel = False
        self.set_norm_kernel(norm_kernel)
        # The project's kernels launched as programmatic dependent launches
        # (bot/engine/cuda_ext.py), where the GPU takes them (Hopper or later).
        self.dependent_launch = False
        self.set_dependent_launch(dependent_launch)

    def set_attention_kernel(self, on: bool, max_rows: int = ATTENTION_KERNEL_MAX_ROWS) -> bool:
        """Attention of decode steps of at most ``max_rows`` rows in the
        kernels of bot/engine/attention.py (where they take this model), or
        of every step in torch's matmuls and softmax. Returns whether the
        kernels are now used."""
        self.reset_graphs()
        self.attention_kernel = on and attention.supports(self.device, self.dtype, self.head_dim, self.group)
        self.attention_max_rows = max_rows
        return self.attention_kernel

    def set_norm_kernel(self, on: bool) -> bool:
        """The compiled decode step's residual add + RMSNorm in the kernel of
        bot/engine/norm.py (where it takes this model), or in the compiled
        glue. Without the compiled glue nothing would call it: off, and not
        built. Returns whether the kernel is now used."""
        self.reset_graphs()
        hidden = int(self.embed.weight.shape[-1])
        self.norm_kernel = (on and self.glue is not None
                            and residual_norm.supports(self.device, self.dtype, hidden))
        return self.norm_kernel

    def set_dependent_launch(self, on: bool) -> bool:
        """The project's kernels (row kernel, attention, norm) launched as
        programmatic dependent launches, each starting while the kernel
        before it ends (bot/engine/cuda_ext.py), where this GPU takes them,
        or the plain way. Returns whether they now are."""
        self.reset_graphs()
        self.dependent_launch = on and cuda_ext.dependent_launch_supported(self.device)
        cuda_ext.set_dependent_launch(self.dependent_launch)
        return self.dependent_launch

    def _attention_kernel_takes(self, bb: int) -> bool:
        return self.attention_kernel and bb <= self.attention_max_rows

    def set_products(self, products: Sequence[LayerProducts] | None) -> None:
        """Decode and prefill through these fused products (one per layer)."""
        if products is not None and len(products) != len(self.layers):
            raise ValueError(f"{len(products)} layers of products for a model of {len(self.layers)}")
        self.reset_graphs()
        self.products = list(products) if products is not None else None

    def set_compiled_glue(self, on: bool) -> None:
        """Fuse the small element-wise work around the GPTQ products (rope,
        softmax, residual + RMSNorm, SiLU x up) with ``torch.compile``: a
        decode step is ~30 small kernels a layer otherwise, and a prompt's
        are slow ones (strided views: 0.39 ms a layer at 1,000 tokens)."""
        self.reset_graphs()
        if not on:
            self.glue = None
            return
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        fns = {
            "probs": _glue_probs,
            "add_norm": _glue_add_norm,
            "silu_mul": _glue_silu_mul,
        }
        self.glue = {k: torch.compile(f, fullgraph=True) for k, f in fns.items()}  # type: ignore[call-overload]
        # rope_store writes into the KV cache: inductor, timing its candidate
        # kernels at each compilation, first copies every tensor a kernel
        # writes, i.e. the whole key cache (16 GB in a 70B bench run: out of
        # memory beside dense weights, and on a card whose cache fills what
        # the weights leave). One configuration, nothing timed, nothing copied.
        self.glue["rope_store"] = torch.compile(  # type: ignore[call-overload]
            _glue_rope_store, fullgraph=True, options={"triton.autotune_pointwise": False})
        # prompts: compiled apart from the steps' (whose shapes are a few
        # buckets); the second prompt length recompiles them with the length
        # dynamic (torch's automatic dynamic shapes), for every length after
        prompt_fns = {"prompt_rope_qk": _prompt_rope_qk, "prompt_add_norm": _prompt_add_norm,
                      "prompt_silu_mul": _prompt_silu_mul}
        self.glue.update({k: torch.compile(f, fullgraph=True)  # type: ignore[call-overload]
                          for k, f in prompt_fns.items()})

    def reset_graphs(self) -> None:
        """Drop the captured graphs and their memory pool (a pool whose graphs
        are all gone must not be captured into again)."""
        self._graphs = {}
        self._pool = None
        self._plan = None

    # -- eager pieces ---------------------------------------------------------

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_half(x) * sin

    def _norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), module.weight, _eps(module))
        out: torch.Tensor = module(x)
        return out

    def _decode_body(self, bb: int, ctx: int) -> torch.Tensor:
        """One decode step for rows 0..bb-1 reading ``ctx`` cache positions."""
        tokens = self.tokens[:bb]
        pos = self.positions[:bb]
        rows = self.rows[:bb]
        x = self.embed(tokens)  # [bb, D]
        cos = self.cos[pos][:, None, :]
        sin = self.sin[pos][:, None, :]
        kernel = self._attention_kernel_takes(bb)
        bias = None if kernel else self._step_bias(pos, ctx)
        hd, nkv = self.head_dim, self.n_kv
        if self.glue is not None:
            return self._decode_body_glued(bb, ctx, x, cos, sin, bias, rows, pos, kernel)
        use_row = bb <= self.row_max_rows
        for li, layer in enumerate(self.layers):
            h = self._norm(layer.input_layernorm, x)
            q, k, v = self._proj(li, "qkv", h, use_row)
            q = self._rope(q.view(bb, self.n_heads, hd), cos, sin)
            k = self._rope(k.view(bb, nkv, hd), cos, sin)
            v = v.view(bb, nkv, hd)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            o = self._attend(li, q, pos, ctx, bias, _glue_probs, kernel)
            x = x + self._proj(li, "o", o, use_row)[0]
            x = x + self._mlp(li, layer.mlp, self._norm(layer.post_attention_layernorm, x), use_row)
        out: torch.Tensor = self.lm_head(self._norm(self.norm, x))
        return out

    def _step_bias(self, pos: torch.Tensor, ctx: int) -> torch.Tensor:
        """The mask of a step's attention in torch's matmuls, ``[rows, 1, 1,
        ctx]``: 0 where row r may read a cache position (``0..pos[r]``),
        -inf past it."""
        visible = self.ctx_range[:ctx][None, :] <= pos[:, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=self.device)
        return bias.masked_fill(~visible, float("-inf"))[:, None, None, :]

    def _attend(
        self, li: int, q: torch.Tensor, pos: torch.Tensor, ctx: int, bias: torch.Tensor | None,
        probs: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], kernel: bool,
    ) -> torch.Tensor:
        """Layer ``li``'s attention for the step's queries ``q [bb, heads,
        head_dim]`` over cache positions ``0..pos`` of each row (at most
        ``ctx``): the decode attention kernels, or q.kᵀ, ``probs`` (softmax
        with the mask ``bias``) and p.v in torch."""
        kc, vc = self.k_cache[li], self.v_cache[li]
        if kernel:
            return attention.decode(q, kc, vc, pos, ctx, self.scale)
        assert bias is not None
        bb, hd = q.shape[0], self.head_dim
        s = torch.matmul(q.view(bb, self.n_kv, self.group, hd), kc[:bb, :, :ctx].transpose(-1, -2))
        return torch.matmul(probs(s, bias, self.scale), vc[:bb, :, :ctx]).reshape(bb, self.n_heads * hd)

    # -- the quantized products: fused (self.products) or the model's modules --

    def _proj(self, li: int, name: str, x: torch.Tensor, row: bool) -> tuple[torch.Tensor, ...]:
        """Layer ``li``'s product ``name`` (``products.LAYOUT``: qkv, o,
        gate_up, down), one output per module it covers: the fused product
        (the row packing where ``row``), or else the model's own modules."""
        if self.products is not None:
            return getattr(self.products[li], name)(x, row)  # type: ignore[no-any-return]
        parent, attrs = _MODULES[name]
        owner = getattr(self.layers[li], parent)
        return tuple(getattr(owner, attr)(x) for attr in attrs)

    def _mlp(self, li: int, mlp: Any, h: torch.Tensor, row: bool) -> torch.Tensor:
        gate, up = self._proj(li, "gate_up", h, row)
        return self._proj(li, "down", mlp.act_fn(gate) * up, row)[0]

    def _decode_body_glued(
        self,
        bb: int,
        ctx: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        pos: torch.Tensor,
        kernel: bool,
    ) -> torch.Tensor:
        assert self.glue is not None
        rope_store, probs, add_norm, silu_mul = (
            self.glue["rope_store"], self.glue["probs"], self.glue["add_norm"], self.glue["silu_mul"]
        )
        if self.norm_kernel:
            add_norm = residual_norm.add_rms_norm
        hd, nkv = self.head_dim, self.n_kv
        zero = torch.zeros_like(x)
        first = self.layers[0].input_layernorm
        x, h = add_norm(x, zero, first.weight, _eps(first))
        use_row = bb <= self.row_max_rows
        for li, layer in enumerate(self.layers):
            q, k, v = self._proj(li, "qkv", h, use_row)
            q = rope_store(q.view(bb, self.n_heads, hd), k.view(bb, nkv, hd), v.view(bb, nkv, hd), cos, sin,
                           self.k_cache, self.v_cache, self.layer_ids[li], rows, pos)
            o = self._attend(li, q, pos, ctx, bias, probs, kernel)
            post = layer.post_attention_layernorm
            x, h = add_norm(x, self._proj(li, "o", o, use_row)[0], post.weight, _eps(post))
            m = self._proj(li, "down", silu_mul(*self._proj(li, "gate_up", h, use_row)), use_row)[0]
            nxt = self.layers[li + 1].input_layernorm if li + 1 < len(self.layers) else self.norm
            x, h = add_norm(x, m, nxt.weight, _eps(nxt))
        out: torch.Tensor = self.lm_head(h)
        return out

    def check_fits(self, n: int) -> None:
        """Raise GenerationError unless a prompt of ``n`` tokens fits a row."""
        if n == 0 or n >= self.scratch:
            raise GenerationError(f"prompt of {n} tokens does not fit the cache ({self.scratch - 1})")

    @torch.no_grad()
    def prefill(self, row: int, ids: Sequence[int], start: int = 0) -> torch.Tensor:
        """Fill ``row``'s cache with a prompt; the logits after its last token.
        With ``start``, the row already holds the first ``start`` tokens' keys
        and values (a reused prefix): only the rest is computed."""
        return self.forward([Fill(row, ids, start)])[0][0]

    @torch.no_grad()
    def forward(
        self, fills: Sequence[Fill], tokens: Sequence[int] | torch.Tensor = (), positions: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One eager forward of prompt chunks and decode rows together: each
        :class:`Fill` writes its prompt's tokens ``start..len(ids)-1`` into its
        row's cache, and rows ``0..n-1`` advance by one token each (``tokens``
        at ``positions``, as :meth:`step` takes them). Every token goes through
        the same products, so the decode rows ride on the prompt chunk's
        weight read instead of reading the weights again in a step of their
        own. Returns (the logits after each fill's last token ``[fills,
        vocab]``, the decode rows' logits ``[n, vocab]``). The fills' rows
        must be distinct and lie at or above ``n``."""
        n = len(tokens)
        if len(positions) != n:
            raise ValueError(f"{n} tokens for {len(positions)} positions")
        spans: list[tuple[int, int, int]] = []  # (row, start, end) of each fill
        for f in fills:
            self.check_fits(len(f.ids))
            if not 0 <= f.start < len(f.ids):
                raise ValueError(f"start {f.start} outside a prompt of {len(f.ids)} tokens")
            if f.row < n or f.row in {r for r, _, _ in spans}:
                raise ValueError(f"fill row {f.row} is one of the {n} decoding rows or another fill's")
            spans.append((f.row, f.start, len(f.ids)))
        hd, nkv, dev = self.head_dim, self.n_kv, self.device
        new_ids = [t for f in fills for t in f.ids[f.start:]]
        m = len(new_ids)  # prompt tokens; then the n decode rows
        total = m + n
        ids_t = torch.tensor(new_ids, dtype=torch.long, device=dev)
        if n:
            step_tokens = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
            ids_t = torch.cat([ids_t, step_tokens.to(dev, torch.long)])
        fill_pos = [p for _, s, e in spans for p in range(s, e)]
        pos = torch.tensor(fill_pos + list(positions), dtype=torch.long, device=dev)
        fill_rows = [r for r, s, e in spans for _ in range(s, e)]
        rows = torch.tensor(fill_rows + list(range(n)), dtype=torch.long, device=dev)
        x = self.embed(ids_t)  # [total, D]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [total, 1, hd]
        use_row = total >= self.prompt_min_tokens  # dequantize + cuBLAS, where products have a row packing
        gqa = nkv != self.n_heads
        # The compiled glue where the GPU's work is long (the dequantizing
        # prompts); a short prompt is bound by the CPU's launches, and with
        # the compiled glue a 21-token follow-up at 80 layers took 137 ms
        # (docs/gpu-notes.md item 21).
        glue = self.glue if self.glue is not None and use_row else {}
        rope_qk = glue.get("prompt_rope_qk", _glue_rope_qk)
        silu_mul = glue.get("prompt_silu_mul", _glue_silu_mul)
        fused_add_norm = glue.get("prompt_add_norm")
        # each fill's attention: causal over its own new tokens (nothing
        # before them), or, past the tokens already in its row, new token i
        # sees 0..start+i: causal aligned to the lower right, which torch's
        # flash attention takes (with an explicit mask it took the math
        # kernel: 32 prompts of 1,005 tokens packed in chunks of 512 took 418
        # ms per 1,000 tokens with it, 310 this way; docs/gpu-notes.md item 40)
        masks = [None if s == 0 else causal_lower_right(e - s, e) for _, s, e in spans]
        kernel, ctx, bias = False, 0, None
        if n:
            ctx = self.buckets(n, max(positions))[1]
            kernel = self._attention_kernel_takes(n)
            bias = None if kernel else self._step_bias(pos[m:], ctx)

        def add_norm(x: torch.Tensor, y: torch.Tensor, module: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if fused_add_norm is not None:
                return fused_add_norm(x, y, module.weight, _eps(module))  # type: ignore[no-any-return]
            x = x + y
            return x, self._norm(module, x)

        h = self._norm(self.layers[0].input_layernorm, x)
        for li, layer in enumerate(self.layers):
            q, k, v = self._proj(li, "qkv", h, use_row)
            q, k = rope_qk(q.view(total, self.n_heads, hd), k.view(total, nkv, hd), cos, sin)
            v = v.view(total, nkv, hd)
            kc, vc = self.k_cache[li], self.v_cache[li]
            if len(spans) == 1 and not n:  # one prompt alone: a slice, not a scatter
                row, s, e = spans[0]
                kc[row, :, s:e] = k.transpose(0, 1)
                vc[row, :, s:e] = v.transpose(0, 1)
            else:
                kc[rows, :, pos] = k
                vc[rows, :, pos] = v
            outs = []
            at = 0
            with sdpa_kernel(self.prompt_attention):
                for (row, s, e), mask in zip(spans, masks, strict=True):
                    qf = q[at : at + e - s].transpose(0, 1)[None]  # [1, heads, tokens, hd]
                    if mask is None:
                        kf = k[at : at + e - s].transpose(0, 1)[None]
                        vf = v[at : at + e - s].transpose(0, 1)[None]
                        o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=gqa)
                    else:
                        o = F.scaled_dot_product_attention(qf, kc[row, :, :e][None], vc[row, :, :e][None],
                                                           attn_mask=mask, enable_gqa=gqa)
                    outs.append(o[0].transpose(0, 1).reshape(e - s, self.n_heads * hd))
                    at += e - s
            if n:
                outs.append(self._attend(li, q[m:], pos[m:], ctx, bias, _glue_probs, kernel))
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            x, h = add_norm(x, self._proj(li, "o", o, use_row)[0], layer.post_attention_layernorm)
            down = self._proj(li, "down", silu_mul(*self._proj(li, "gate_up", h, use_row)), use_row)[0]
            x, h = add_norm(x, down, self.layers[li + 1].input_layernorm if li + 1 < len(self.layers) else self.norm)
        ends = list(itertools.accumulate(e - s for _, s, e in spans))
        last = torch.tensor([e - 1 for e in ends] + list(range(m, total)), dtype=torch.long, device=dev)
        out: torch.Tensor = self.lm_head(h[last])
        return out[: len(spans)], out[len(spans):]

    def _graph(self, bb: int, ctx: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (bb, ctx)
        hit = self._graphs.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        saved_pos = self.positions.clone()
        saved_tok = self.tokens.clone()
        # Warm-up and capture write only at the scratch position.
        self.positions.fill_(self.scratch)
        side = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_body(bb, ctx)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._decode_body(bb, ctx)
        self.positions.copy_(saved_pos)
        self.tokens.copy_(saved_tok)
        torch.cuda.synchronize(self.device)
        self._graphs[key] = (graph, out)
        self.capture_s += time.perf_counter() - t0
        return graph, out

    def graphs(self) -> list[tuple[int, int]]:
        """The (batch bucket, context bucket) of every step graph captured."""
        return sorted(self._graphs)

    def batch_buckets(self) -> list[int]:
        """Every batch size a step is captured for (rows are padded up to one)."""
        return sorted({min(b, self.max_batch) for b in _BATCH_BUCKETS})

    def buckets(self, n: int, max_pos: int) -> tuple[int, int]:
        bb = _bucket(n, _BATCH_BUCKETS, self.max_batch)
        ctx = _bucket(max_pos + 1, _CTX_BUCKETS, self.max_len)
        return bb, ctx

    @torch.no_grad()
    def step(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` for rows 0..n-1 given each row's last token
        and its position (the cache index the token is written to). The
        tokens may be a tensor on the device (the sampler's output: the step
        is queued without the CPU reading them)."""
        n = len(tokens)
        bb, ctx = self.buckets(n, max(positions))
        pad = bb - n
        if isinstance(tokens, torch.Tensor):
            self.tokens[:n].copy_(tokens)  # padded rows keep earlier (valid) ids
        else:
            self.tokens[:bb].copy_(torch.tensor(list(tokens) + [0] * pad, dtype=torch.long), non_blocking=True)
        pos = torch.tensor(list(positions) + [self.scratch] * pad, dtype=torch.long)
        self.positions[:bb].copy_(pos, non_blocking=True)
        if self.use_graphs:
            graph, out = self._graph(bb, ctx)
            graph.replay()
            return out[:n]
        return self._decode_body(bb, ctx)[:n]

    def warmup(self, batches: Sequence[int], contexts: Sequence[int]) -> None:
        """Capture the graphs for these batch sizes and context lengths now."""
        if not self.use_graphs:
            return
        with torch.no_grad():
            for n in batches:
                for c in contexts:
                    self._graph(*self.buckets(n, c - 1))

    def warm_next(self) -> bool:
        """Capture one step graph not captured yet, of every (batch bucket,
        context bucket) a step can take, the shortest contexts first (each
        context's every batch size), and return True; False once every one
        is (or without graphs). The decode thread calls it while idle, so
        that a burst does not stop to capture each new shape (0.21 s each at
        80 layers: docs/gpu-notes.md item 43)."""
        if not self.use_graphs:
            return False
        if self._plan is None:
            ctxs = sorted({self.buckets(1, pos)[1] for pos in range(self.scratch)})
            self._plan = [(bb, ctx) for ctx in ctxs for bb in self.batch_buckets()]
        while self._plan:
            key = self._plan.pop(0)
            if key not in self._graphs:
                with torch.no_grad():
                    self._graph(*key)
                return True
        return False

    def warm_prompts(self, lengths: Sequence[int], chunk: int) -> int:
        """Prefill a dummy prompt of each length (and, past ``chunk``, its
        second chunk as chunked prefill runs it) in the last row, then clear
        the row: the products' kernels for prompt shapes load and are picked
        on first use, which cost the first burst after a start ~1.5 s of
        stalls on the GPU (docs/gpu-notes.md item 20). The prompts run."""
        row, done = self.max_batch - 1, 0
        for n in lengths:
            if not 0 < n < self.scratch:
                continue
            ids = [1] * n
            if n > chunk:
                self.prefill(row, ids[:chunk])
                self.prefill(row, ids, start=chunk)
            else:
                self.prefill(row, ids)
            done += 1
        self.clear(row)
        return done

    @torch.no_grad()
    def clear(self, row: int) -> None:
        """Zero a row's cache: attention multiplies masked positions by 0,
        and 0 x NaN left by a failed reply would poison the row's next user."""
        self.k_cache[:, row].zero_()
        self.v_cache[:, row].zero_()

    @torch.no_grad()
    def move(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]
