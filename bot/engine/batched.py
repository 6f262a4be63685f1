"""Batched decoding: concurrent replies decoded together, one model step each.

``[model] decode = "batched"`` (GPU path; the wiring is the config's and
``make_engine``'s). Every :meth:`BatchedEngine.stream` call becomes a row of
one batch that a single decode thread advances a token at a time, so 32
conversations cost about one weight read per step instead of 32. Each stream
is still its own async iterator of text: closing it frees its row at the next
step, and text never ends in half a UTF-8 character (``bot.engine.detok``).

The decode loop is our own, over the model's own modules (embedding, norms,
the GPTQ ``q/k/v/o_proj`` and MLP layers, ``lm_head``), not ``generate()``:

- a static KV cache, ``[layers, rows, kv_heads, max_len, head_dim]``; row *i*
  of the batch is slot *i* (finished rows are compacted by moving the last
  row into the hole), so attention reads plain slices, never gathers;
- each decode step for a (batch bucket, context bucket of 256) pair is
  captured once as a CUDA graph and replayed: eager ``generate()`` on an
  80-layer model is bound by the CPU launching ~3,000 kernels a step;
- the small element-wise work between the GPTQ products (rope, softmax,
  residual + RMSNorm, SiLU x up) is fused by ``torch.compile`` on the GPU;
- a prompt is prefilled alone, eagerly (its matrix products are large enough
  to hide the launches), between two decode steps; long prompts go through
  prompt-time twins of the quantized modules where the loader kept them
  (``DecodeCore.set_prefill_twins``); while other rows decode, a prompt
  longer than ``[model] prefill_chunk`` is prefilled a chunk at a time with a
  decode step between chunks (``BatchScheduler``), so it stalls no one;
- a finished reply's cache row is parked for a follow-up, which then
  prefills only its new tokens (``bot.engine.prefix_cache``);
- a row whose logits are not finite fails that reply alone (nothing is
  sampled from them) and its cache row is zeroed.

Measured on an H100 with a Xwin-70B-shaped GPTQ model (docs/benchmarks.md,
docs/gpu-notes.md): 21.6 ms/step at 1 conversation (eager ``generate()``:
56-70 ms), 37.3 ms/step at 32.

Llama-family models only (Llama, Mistral, Xwin): the loop needs
``model.model.{embed_tokens,layers,norm,rotary_emb}`` and ``model.lm_head``.
On the CPU it runs the same code without graphs or compiling (tests use a
tiny Llama).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bot.config import ModelConfig
from bot.engine.base import PromptTokenizer, StreamStats
from bot.engine.detok import IncrementalDecoder
from bot.engine.prefix_cache import PrefixCache
from bot.errors import GenerationError
from bot.types import Settings, Turn

log = logging.getLogger(__name__)

# What a chat user sees when the model fails mid-reply (details go to the log).
MSG_NON_FINITE = "the model produced invalid numbers (NaN) and this reply was stopped"

# Prompts this long or longer are prefilled through the prompt-time twins
# (GPTQModel's torch kernel: dequantize + cuBLAS). H200, 8 Xwin-70B layers,
# ms twin / Marlin: 64 tokens 19 / 11, 256: 19 / 13, 512: 22 / 22, 1,000: 33 / 47.
TWIN_MIN_TOKENS = 512
# While other rows decode, longer prompts are prefilled this many tokens at a
# time with a decode step between chunks ([model] prefill_chunk; issue 14).
# 512 = the twins' crossover, so full chunks still go through the twins.
PREFILL_CHUNK = 512
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
_CTX_BUCKETS = tuple(range(256, 32768 + 1, 256))  # attention reads at most 255 extra positions


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


def _glue_probs(s: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(s.float() * scale + bias, dim=-1).to(s.dtype)


def _glue_add_norm(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + y
    xf = x.float()
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return x, w * h.to(x.dtype)


def _glue_silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


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
        self.ctx_range = torch.arange(max_len, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self.capture_s = 0.0
        # Prompt-time twins: id(quantized module) -> the same weights in another
        # kernel's packing, used for prompts of twin_min_tokens or more.
        self.prefill_twins: dict[int, Any] = {}
        self.twin_min_tokens = TWIN_MIN_TOKENS

    def set_prefill_twins(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        """(module, twin) pairs (``TransformersEngine.prefill_twins``): long
        prompts go through the twins, decode steps through the modules."""
        self.prefill_twins = {id(module): twin for module, twin in pairs}

    def set_compiled_glue(self, on: bool) -> None:
        """Fuse the small element-wise work around the GPTQ products (rope,
        softmax, residual + RMSNorm, SiLU x up) with ``torch.compile``: a
        decode step is ~30 small kernels a layer otherwise."""
        self.reset_graphs()
        if not on:
            self.glue = None
            return
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        fns = {
            "rope_qk": _glue_rope_qk,
            "probs": _glue_probs,
            "add_norm": _glue_add_norm,
            "silu_mul": _glue_silu_mul,
        }
        self.glue = {k: torch.compile(f, fullgraph=True) for k, f in fns.items()}  # type: ignore[call-overload]

    def reset_graphs(self) -> None:
        """Drop the captured graphs and their memory pool (a pool whose graphs
        are all gone must not be captured into again)."""
        self._graphs = {}
        self._pool = None

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
        visible = self.ctx_range[:ctx][None, :] <= pos[:, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=self.device)
        bias = bias.masked_fill(~visible, float("-inf"))[:, None, None, :]
        hd, nkv, g = self.head_dim, self.n_kv, self.group
        if self.glue is not None:
            return self._decode_body_glued(bb, ctx, x, cos, sin, bias, rows, pos)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = self._rope(attn.q_proj(h).view(bb, self.n_heads, hd), cos, sin)
            k = self._rope(attn.k_proj(h).view(bb, nkv, hd), cos, sin)
            v = attn.v_proj(h).view(bb, nkv, hd)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            qg = q.view(bb, nkv, g, hd)
            s = torch.matmul(qg, kc[:bb, :, :ctx].transpose(-1, -2)).float() * self.scale + bias
            p = torch.softmax(s, dim=-1).to(self.dtype)
            o = torch.matmul(p, vc[:bb, :, :ctx]).reshape(bb, self.n_heads * hd)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        out: torch.Tensor = self.lm_head(self._norm(self.norm, x))
        return out

    def _decode_body_glued(
        self,
        bb: int,
        ctx: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        rows: torch.Tensor,
        pos: torch.Tensor,
    ) -> torch.Tensor:
        assert self.glue is not None
        rope_qk, probs, add_norm, silu_mul = (
            self.glue["rope_qk"], self.glue["probs"], self.glue["add_norm"], self.glue["silu_mul"]
        )
        hd, nkv, g = self.head_dim, self.n_kv, self.group
        zero = torch.zeros_like(x)
        first = self.layers[0].input_layernorm
        x, h = add_norm(x, zero, first.weight, _eps(first))
        for li, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k = rope_qk(
                attn.q_proj(h).view(bb, self.n_heads, hd), attn.k_proj(h).view(bb, nkv, hd), cos, sin
            )
            v = attn.v_proj(h).view(bb, nkv, hd)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            s = torch.matmul(q.view(bb, nkv, g, hd), kc[:bb, :, :ctx].transpose(-1, -2))
            o = torch.matmul(probs(s, bias, self.scale), vc[:bb, :, :ctx]).reshape(bb, self.n_heads * hd)
            post = layer.post_attention_layernorm
            x, h = add_norm(x, attn.o_proj(o), post.weight, _eps(post))
            m = mlp.down_proj(silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
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
        n = len(ids)
        self.check_fits(n)
        if not 0 <= start < n:
            raise ValueError(f"start {start} outside a prompt of {n} tokens")
        hd, nkv = self.head_dim, self.n_kv
        m = n - start
        t = torch.tensor(ids[start:], dtype=torch.long, device=self.device)
        x = self.embed(t)[None]  # [1, m, D]
        cos = self.cos[start:n][None, None]
        sin = self.sin[start:n][None, None]
        mask = None
        if start:  # new token i sees cache positions 0..start+i
            mask = self.ctx_range[:n][None, :] <= (start + self.ctx_range[:m])[:, None]
        twins = self.prefill_twins if m >= self.twin_min_tokens else {}

        def proj(module: Any, inp: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = twins.get(id(module), module)(inp)
            return out

        gqa = nkv != self.n_heads
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rope(proj(attn.q_proj, h).view(1, m, self.n_heads, hd).transpose(1, 2), cos, sin)
            k = self._rope(proj(attn.k_proj, h).view(1, m, nkv, hd).transpose(1, 2), cos, sin)
            v = proj(attn.v_proj, h).view(1, m, nkv, hd).transpose(1, 2)
            self.k_cache[li, row, :, start:n] = k[0]
            self.v_cache[li, row, :, start:n] = v[0]
            if mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                kc = self.k_cache[li, row, :, :n][None]
                vc = self.v_cache[li, row, :, :n][None]
                o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=gqa)
            x = x + proj(attn.o_proj, o.transpose(1, 2).reshape(1, m, self.n_heads * hd))
            h = layer.post_attention_layernorm(x)
            if twins:
                mlp = layer.mlp
                x = x + proj(mlp.down_proj, mlp.act_fn(proj(mlp.gate_proj, h)) * proj(mlp.up_proj, h))
            else:
                x = x + layer.mlp(h)
        out: torch.Tensor = self.lm_head(self.norm(x[:, -1]))[0]
        return out

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

    def buckets(self, n: int, max_pos: int) -> tuple[int, int]:
        bb = _bucket(n, _BATCH_BUCKETS, self.max_batch)
        ctx = _bucket(max_pos + 1, _CTX_BUCKETS, self.max_len)
        return bb, ctx

    @torch.no_grad()
    def step(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits ``[n, vocab]`` for rows 0..n-1 given each row's last token
        and its position (the cache index the token is written to)."""
        n = len(tokens)
        bb, ctx = self.buckets(n, max(positions))
        pad = bb - n
        tok = torch.tensor(list(tokens) + [0] * pad, dtype=torch.long)
        pos = torch.tensor(list(positions) + [self.scratch] * pad, dtype=torch.long)
        self.tokens[:bb].copy_(tok, non_blocking=True)
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

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, settings: Sequence[Settings], row0: int = 0) -> list[int]:
        """Next token of rows ``row0..row0+n-1`` from their logits ``[n, vocab]``."""
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
        out: list[int] = nxt.tolist()
        return out


_Item = list[int] | BaseException | None


@dataclass
class _Request:
    ids: list[int]
    settings: Settings
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[_Item]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: int = 0
    position: int = 0  # cache index the next token goes to
    last_token: int = 0
    first_token_at: float = 0.0
    tokens: list[int] = field(default_factory=list)  # sampled so far
    reused: int = 0  # prompt tokens whose keys and values came from a parked row


def _deliver(batch: list[tuple[_Request, _Item]]) -> None:
    for req, item in batch:
        req.out.put_nowait(item)


def _prefill_error(exc: Exception) -> GenerationError:
    return exc if isinstance(exc, GenerationError) else GenerationError.internal(exc, "prefill")


def _post(req: _Request, item: _Item) -> None:
    """Hand one item to a request's stream, from the decode thread."""
    batch: list[tuple[_Request, _Item]] = [(req, item)]
    req.loop.call_soon_threadsafe(_deliver, batch)


class BatchScheduler:
    """The decode thread: admits requests, steps all live rows, streams ids.

    Chunked prefill: while rows are decoding, a prompt whose remaining
    tokens (after any reused prefix) exceed ``prefill_chunk`` is prefilled
    ``prefill_chunk`` tokens at a time into its own idle row (``_filling``),
    one chunk per loop turn, each followed by a decode step of the live rows:
    their tokens keep flowing instead of waiting for the whole prompt. Only
    the last chunk's logits are sampled. While a prompt is being filled no
    other prompt is admitted (first come, first served). With no row
    decoding, the rest of a prompt is prefilled at once (nobody to wait).
    Shorter prompts arriving together are prefilled up to ``prefill_chunk``
    tokens per decode step too.
    """

    def __init__(
        self,
        core: DecodeCore,
        eos_ids: Sequence[int],
        on_finish: Callable[[StreamStats], None] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be 1 or more, got {prefill_chunk}")
        self.core = core
        self.prefill_chunk = prefill_chunk
        self.sampler = Sampler(core.max_batch, core.vocab, core.device)
        self.eos = set(eos_ids)
        self.on_finish = on_finish
        self.prefix = PrefixCache(core.max_batch)  # finished replies' rows, for follow-ups
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._live: list[_Request] = []
        # The prompt being prefilled chunk by chunk, and its row (an idle row
        # at or above len(self._live), never parked into while it fills).
        self._filling: _Request | None = None
        self._fill_row = 0
        self.prefill_chunks = 0  # chunks that left a prompt unfinished (a decode step came next)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.step_s = 0.0

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="batched-decode", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: _Request) -> None:
        self._inbox.put(req)

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            try:
                if self._filling is not None:
                    self._prefill_chunk()
                else:
                    self._admit(block=not self._live)
                if self._live:
                    self._step()
            except BaseException as exc:  # fail every live stream, keep serving
                self._fail_all(GenerationError.internal(exc, "decode"))
        self._fail_all(GenerationError("engine closed"))

    def _fail_all(self, err: GenerationError) -> None:
        for req in self._live:
            _post(req, err)
        self._live.clear()
        if self._filling is not None:
            _post(self._filling, err)
            self._filling = None

    def _admit(self, block: bool) -> None:
        """Take new requests while rows are free, prefilling each (a long
        one only its first chunk: then admitting pauses until it is done).
        While rows decode, one turn prefills at most ``prefill_chunk`` prompt
        tokens before the next decode step (at least one prompt)."""
        spent = 0
        while self._filling is None and len(self._live) < self.core.max_batch and spent < self.prefill_chunk:
            try:
                req = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if req is None:
                return
            if req.cancelled:
                _post(req, None)
                continue
            row = len(self._live)
            try:
                self.core.check_fits(len(req.ids))
                req.reused = req.position = self._claim(row, req)
            except Exception as exc:
                _post(req, _prefill_error(exc))
                continue
            self._filling, self._fill_row = req, row
            if self._live:
                spent += len(req.ids) - req.reused
            self._prefill_chunk()

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of ``_filling`` (all the rest when no row is
        decoding); after the last one, sample its first token and make it live."""
        req, row = self._filling, self._fill_row
        assert req is not None
        if req.cancelled:
            self._filling = None
            _post(req, None)
            return
        n = len(req.ids)
        end = min(n, req.position + self.prefill_chunk) if self._live else n
        try:
            logits = self.core.prefill(row, req.ids[:end], start=req.position)[None]
            finite = bool(torch.isfinite(logits).all())
            if end < n:
                self.prefill_chunks += 1
                if finite:
                    req.position = end
                    return
                self._filling = None
                self._fail_prefill(req, row, end)
                return
            self._filling = None
            row = self._settle(row, n)
            self.sampler.admit(row, req.ids)
            tok = self.sampler.sample(logits, [req.settings], row0=row)[0]
            if not finite:
                self._fail_prefill(req, row, n)
                return
        except Exception as exc:
            self._filling = None
            _post(req, _prefill_error(exc))
            return
        req.first_token_at = time.perf_counter()
        req.position = n
        self._live.append(req)
        self._emit([(req, tok)])

    def _fail_prefill(self, req: _Request, row: int, tokens: int) -> None:
        log.error("non-finite logits after %d tokens of a prompt of %d; the reply is failed",
                  tokens, len(req.ids))
        self.core.clear(row)
        _post(req, GenerationError(MSG_NON_FINITE))

    def _settle(self, row: int, length: int) -> int:
        """Move a filled row down to the next live row (live rows may have
        left while it filled): the row the new request decodes in."""
        dest = len(self._live)
        if row != dest:
            self.prefix.evict(dest)
            self.core.move(row, dest, length)
        return dest

    def _claim(self, row: int, req: _Request) -> int:
        """Make ``row`` (the next live row) ready for ``req``: the prefix of a
        parked row that ``req.ids`` starts with is moved there (unless it is
        there already); any other parked row there is evicted. The number of
        prompt tokens whose keys and values are in place."""
        hit = self.prefix.lookup(req.ids)
        if hit is not None and hit[0] == row:
            self.prefix.take(row)
        else:
            self.prefix.evict(row)
            if hit is not None:
                self.core.move(hit[0], row, hit[1])
                self.prefix.take(hit[0])
        if hit is not None:
            self.prefix.reused_tokens += hit[1]
            log.debug("prompt of %d tokens: %d reused from a parked row", len(req.ids), hit[1])
        return hit[1] if hit is not None else 0

    def _emit(self, pairs: list[tuple[_Request, int]]) -> None:
        """Deliver one new token per request; retire finished rows."""
        out: dict[asyncio.AbstractEventLoop, list[tuple[_Request, _Item]]] = {}
        done: list[_Request] = []
        for req, tok in pairs:
            req.last_token = tok
            req.tokens.append(tok)
            req.generated += 1
            finished = req.cancelled
            if not finished and tok in self.eos:
                finished = True
            else:
                out.setdefault(req.loop, []).append((req, [tok]))
                if req.generated >= req.settings.max_new_tokens or req.position >= self.core.scratch:
                    finished = True
            if finished:
                out.setdefault(req.loop, []).append((req, None))
                done.append(req)
                self._finished_stats(req)
        for loop, batch in out.items():
            loop.call_soon_threadsafe(_deliver, batch)
        for req in done:
            self._retire(req)

    def _finished_stats(self, req: _Request) -> None:
        if self.on_finish is not None:
            now = time.perf_counter()
            self.on_finish(
                StreamStats(
                    prompt_tokens=len(req.ids),
                    new_tokens=req.generated,
                    first_token_s=req.first_token_at - req.submitted,
                    total_s=now - req.submitted,
                )
            )

    def _retire(self, req: _Request, park: bool = True) -> None:
        row = self._live.index(req)
        last = len(self._live) - 1
        if park:  # keep its keys and values for a follow-up (bot/engine/prefix_cache.py)
            fed = (req.ids + req.tokens)[: req.position]
            busy = (last, self._fill_row) if self._filling is not None else (last,)
            dest = self.prefix.free_row(len(self._live), exclude=busy, evict=row != last)
            dest = row if dest is None and row == last else dest
            if dest is not None:
                if dest != row:
                    self.core.move(row, dest, req.position)
                self.prefix.park(dest, fed)
        if row != last:
            moved = self._live[last]
            self.core.move(last, row, moved.position)
            self.sampler.move(last, row)
            self._live[row] = moved
        self._live.pop()

    def _step(self) -> None:
        for req in [r for r in self._live if r.cancelled]:
            _post(req, None)
            self._retire(req)
        if not self._live:
            return
        t0 = time.perf_counter()
        live = list(self._live)
        logits = self.core.step([r.last_token for r in live], [r.position for r in live])
        finite = torch.isfinite(logits).all(dim=-1)
        toks = self.sampler.sample(logits, [r.settings for r in live])
        self.steps += 1
        self.step_s += time.perf_counter() - t0
        for r in live:
            r.position += 1
        pairs = list(zip(live, toks, strict=True))
        ok: list[bool] = finite.tolist()
        if not all(ok):  # nothing sampled from NaN reaches a reply
            for req, good in zip(live, ok, strict=True):
                if not good:
                    log.error("non-finite logits at position %d (%d rows); the reply is failed",
                              req.position, len(live))
                    _post(req, GenerationError(MSG_NON_FINITE))
                    self._finished_stats(req)
                    self.core.clear(self._live.index(req))
                    self._retire(req, park=False)
            pairs = [p for p, good in zip(pairs, ok, strict=True) if good]
        self._emit(pairs)


class BatchedEngine:
    """An :class:`~bot.engine.base.Engine` whose concurrent streams share decode steps.

    ``BatchedEngine(config)`` loads the model exactly as
    :class:`~bot.engine.transformers.TransformersEngine` does (transformers +
    GPTQModel, ``[model] gptq_backend``) and decodes with :class:`DecodeCore`.
    :meth:`over` wraps a model that is already loaded (tests, the benchmark).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        eos_ids: Sequence[int] | None = None,
        max_len: int | None = None,
        use_graphs: bool | None = None,
        compile_glue: bool | None = None,
    ) -> None:
        self.config = config
        self.context_length = config.context_length
        self.prompt_format = config.prompt_format
        self.max_batch = max(1, config.max_batch)
        self.last_stats: StreamStats | None = None
        self.tokenizer: PromptTokenizer
        self.model: Any = None
        self.core: DecodeCore | None = None
        self.scheduler: BatchScheduler | None = None
        self._eos_ids = eos_ids
        self._max_len = max_len
        self._use_graphs = use_graphs
        self._compile_glue = compile_glue
        self._description: dict[str, str] = {}
        # Called on the decode thread with each finished stream's stats (the
        # benchmark collects them here); must be quick and must not raise.
        self.on_finish: Callable[[StreamStats], None] | None = None

    @classmethod
    def over(
        cls,
        model: Any,
        tokenizer: PromptTokenizer,
        config: ModelConfig,
        *,
        eos_ids: Sequence[int] | None = None,
        max_len: int | None = None,
        use_graphs: bool | None = None,
        compile_glue: bool | None = None,
    ) -> BatchedEngine:
        engine = cls(
            config, eos_ids=eos_ids, max_len=max_len, use_graphs=use_graphs, compile_glue=compile_glue
        )
        engine.tokenizer = tokenizer
        engine._build(model)
        return engine

    def _load(self) -> None:
        from bot.engine.transformers import TransformersEngine

        loader = TransformersEngine(self.config)
        loader.keep_prefill_twins = True
        loader.load()  # the same loading code path as the one-at-a-time engine
        self.tokenizer = loader.tokenizer
        self._description = loader.describe()
        self._build(loader.model)
        assert self.core is not None
        self.core.set_prefill_twins(loader.prefill_twins)
        # compile the glue and capture the one-conversation graph before the first reply
        self.core.warmup([1], [min(256, self.core.scratch - 1)])
        self.verify(loader.probe_logits)

    def verify(self, reference: Any = None) -> tuple[float, float]:
        """The load check of the batched path (bot/engine/fidelity.py): its
        prefill and graph-replayed decode step against transformers' forward
        (``reference``: the forward's logits of the probe prompt, computed
        here when not given). Raises ConfigError; returns the two errors."""
        from bot.engine.fidelity import check_decode_path, check_forward, probe_ids

        assert self.core is not None
        ids = probe_ids(self.tokenizer)
        kernel = self._description.get("gptq kernel", "")
        if reference is None:
            reference = check_forward(self.model, ids, self.config.id, kernel, self.config.gptq_backend)
        return check_decode_path(self.core, ids, reference, self.config.id, kernel, self.config.gptq_backend)

    def _build(self, model: Any) -> None:
        self.model = model
        cache_len = self._max_len or kv_cache_len(model, self.max_batch, self.context_length)
        on_gpu = model.model.embed_tokens.weight.device.type == "cuda"
        glue = on_gpu if self._compile_glue is None else self._compile_glue
        self.core = DecodeCore(
            model, self.max_batch, cache_len, use_graphs=self._use_graphs, compile_glue=glue
        )
        eos = list(self._eos_ids) if self._eos_ids is not None else []
        if self._eos_ids is None and self.tokenizer.eos_id is not None:
            eos = [self.tokenizer.eos_id]
        self.scheduler = BatchScheduler(
            self.core, eos, on_finish=self._record, prefill_chunk=self.config.prefill_chunk
        )
        # The prompt builder must not make prompts the cache cannot hold.
        self.context_length = min(self.context_length, self.core.scratch - 1)

    def _record(self, stats: StreamStats) -> None:
        self.last_stats = stats
        if self.on_finish is not None:
            self.on_finish(stats)

    async def start(self) -> None:
        if self.scheduler is None:
            await asyncio.to_thread(self._load)
        assert self.scheduler is not None
        self.scheduler.start()

    async def close(self) -> None:
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.close)

    def describe(self) -> dict[str, str]:
        d = dict(self._description) or {"engine": "transformers", "model": self.config.id}
        if self.core is not None:
            d["decode"] = (
                "batched, static KV cache"
                + (", CUDA graphs" if self.core.use_graphs else "")
                + (", compiled glue" if self.core.glue is not None else "")
            )
            d["kv cache"] = f"{self.max_batch} x {self.core.max_len - 1} tokens"
        return d

    async def stream_ids(
        self, prompt_ids: list[int], settings: Settings
    ) -> AsyncGenerator[list[int], None]:
        """The reply's token ids as they come (EOS not included); closing cancels."""
        if self.scheduler is None:
            raise GenerationError("the model is not loaded")
        self.scheduler.start()
        loop = asyncio.get_running_loop()
        req = _Request(list(prompt_ids), settings, loop, asyncio.Queue())
        self.scheduler.submit(req)
        try:
            while True:
                item = await req.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled = True

    async def stream(self, prompt_ids: list[int], settings: Settings, *,
                     turns: Sequence[Turn] = (), is_dm: bool = False) -> AsyncGenerator[str, None]:
        decoder = IncrementalDecoder(self.tokenizer.decode)
        ids = self.stream_ids(prompt_ids, settings)
        try:
            async for chunk in ids:
                for token_id in chunk:
                    if piece := decoder.push(token_id):
                        yield piece
            if tail := decoder.flush():
                yield tail
        finally:
            await ids.aclose()


def kv_cache_len(model: Any, max_batch: int, context_length: int, fraction: float = 0.9) -> int:
    """Cache positions per row: the context, or less if the GPU's free memory
    cannot hold ``max_batch`` rows of it (plus one scratch position)."""
    want = context_length + 1
    dev = model.model.embed_tokens.weight.device
    if dev.type != "cuda":
        return want
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_token = 2 * cfg.num_hidden_layers * kv * hd * model.model.embed_tokens.weight.element_size()
    free, _ = torch.cuda.mem_get_info(dev)
    fit = int(free * fraction) // (int(per_token) * max_batch)
    if fit >= want:
        return want
    return int(max(256, fit // 256 * 256))
