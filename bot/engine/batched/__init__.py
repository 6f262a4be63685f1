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
- a prompt is prefilled eagerly (its matrix products are large enough to
  hide the launches); where the loader fused each layer's products
  (``bot.engine.products``, ``DecodeCore.set_products``) a one-row step goes
  through the row kernel, several rows through fused Marlin, long prompts
  through dequantize + cuBLAS; while other rows decode, a prompt longer than
  ``[model] prefill_chunk`` is prefilled a chunk at a time, and each chunk
  (or short prompt) goes through one forward with the decoding rows' step
  (``DecodeCore.forward``, ``[model] mixed_prefill``), so it stalls no one
  and their tokens ride on its read of the weights;
- a finished reply's cache row is parked for a follow-up, which then
  prefills only its new tokens (``bot.engine.prefix_cache``);
- a row whose logits are not finite fails that reply alone (nothing is
  sampled from them) and its cache row is zeroed.

Measured on an H200 with a GPTQ model of Xwin-70B's shapes and reference
quantization (docs/benchmarks.md, "GPU (H200)"; docs/gpu-notes.md): the
graph-replayed step 10.6-10.8 ms at 1 conversation (the seed's eager
``generate()``: 46-197 ms a token), 27.0-27.1 ms at 32.

Llama-family models only (Llama, Mistral, Xwin): the loop needs
``model.model.{embed_tokens,layers,norm,rotary_emb}`` and ``model.lm_head``.
On the CPU it runs the same code without graphs or compiling (tests use a
tiny Llama).

One module per concept; what the rest of the project uses is re-exported here:

- ``core``: :class:`DecodeCore`, the static KV cache, prefill, the decode
  step and its CUDA graphs, the compiled glue;
- ``sampler``: :class:`Sampler`, every row's own sampling settings at once;
- ``scheduler``: :class:`BatchScheduler`, the decode thread (admission,
  chunked prefill, steps, compaction, parking), its requests and the
  hand-off to each stream's event loop;
- ``engine``: :class:`BatchedEngine`, the async engine (loading, the load
  check, streams), and :func:`kv_cache_len`.
"""

from bot.engine.batched.core import DecodeCore
from bot.engine.batched.engine import BatchedEngine, kv_cache_len
from bot.engine.batched.sampler import Sampler
from bot.engine.batched.scheduler import MSG_NON_FINITE, PREFILL_CHUNK, BatchScheduler

__all__ = [
    "MSG_NON_FINITE", "PREFILL_CHUNK", "BatchScheduler", "BatchedEngine", "DecodeCore",
    "Sampler", "kv_cache_len",
]
