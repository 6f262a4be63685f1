"""The async engine: :class:`BatchedEngine`, an :class:`~bot.engine.base.Engine`
whose streams are rows of one batch; what the GPU's memory allows: the cache
size (:func:`kv_cache_len`) and, after it, the dense copies of weights kept for
prompts (:func:`dense_budget`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from bot.config import ModelConfig
from bot.engine import products
from bot.engine.base import PromptTokenizer, StreamStats
from bot.engine.batched.core import DecodeCore
from bot.engine.batched.scheduler import BatchScheduler, Request
from bot.engine.detok import IncrementalDecoder
from bot.errors import ConfigError, GenerationError
from bot.types import Settings, Turn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StepKernel:
    """One of the decode step's own kernels, as the load check names it."""

    what: str
    source: str
    setting: str  # its [model] setting
    plural: bool
    used: Callable[[], bool]
    turn: Callable[[bool], object]


def _step_kernels(core: DecodeCore) -> list[_StepKernel]:
    return [
        _StepKernel("the decode attention kernels", "bot/engine/attention.cu", "attention_kernel", True,
                    lambda: core.attention_kernel, core.set_attention_kernel),
        _StepKernel("the residual add + RMSNorm kernel", "bot/engine/norm.cu", "norm_kernel", False,
                    lambda: core.norm_kernel, core.set_norm_kernel),
        _StepKernel("the dependent launches of the project's kernels", "bot/engine/dependent_launch.cuh",
                    "dependent_launch", True, lambda: core.dependent_launch, core.set_dependent_launch),
    ]


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
        lookahead: bool = True,
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
        self._lookahead = lookahead  # the scheduler's (BatchScheduler)
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
        lookahead: bool = True,
    ) -> BatchedEngine:
        engine = cls(
            config, eos_ids=eos_ids, max_len=max_len, use_graphs=use_graphs, compile_glue=compile_glue,
            lookahead=lookahead,
        )
        engine.tokenizer = tokenizer
        engine._build(model)
        return engine

    def _load(self) -> None:
        from bot.engine.transformers import TransformersEngine

        loader = TransformersEngine(self.config)
        loader.fuse_for_batches = True
        loader.kv_reserve = lambda model: int(
            kv_token_bytes(model) * self.max_batch * (self.context_length + 1) / KV_FREE_FRACTION
        )
        loader.load()  # the same loading code path as the one-at-a-time engine
        self.tokenizer = loader.tokenizer
        self._description = loader.describe()
        self._build(loader.model)
        assert self.core is not None
        self.core.set_products(loader.layer_products)
        # compile the glue and capture the one-conversation graph before the first reply
        self.core.warmup([1], [min(256, self.core.scratch - 1)])
        if self.config.dense_weights:
            self.keep_dense()
        self.verify(loader.probe_logits)  # after keep_dense: the check runs the path that serves
        self.warm_prompts()

    def warm_prompts(self) -> None:
        """Run prompt shapes once before the first reply (short, long, chunked)."""
        assert self.core is not None and self.scheduler is not None
        chunk = self.scheduler.prefill_chunk
        self.core.warm_prompts([64, chunk // 2, chunk, 2 * chunk + 7], chunk)

    def keep_dense(self, free: int | None = None) -> int:
        """Keep as many products' weights dequantized as the GPU's free memory
        (``free``: bytes, default what it has now; kept copies count as free)
        holds after a prompt's working memory (:func:`dense_budget`), for
        ``[model] dense_weights``. Returns the bytes kept."""
        core = self.core
        if core is None or not core.products:
            return 0
        if free is None:
            if core.device.type != "cuda":
                return 0
            free = self.free_memory()
        budget = dense_budget(self.model, core.products, free, core.scratch)
        n, nbytes = products.set_dense(core.products, budget)
        total = 4 * len(core.products)
        self._description["dense weights"] = f"{n} of {total} products ({nbytes / 1e9:.1f} GB)"
        log.info("dense weights: %d of %d products kept dequantized for prompts (%.1f GB of %.1f GB free)",
                 n, total, nbytes / 1e9, free / 1e9)
        return nbytes

    def free_memory(self) -> int:
        """The GPU's free bytes after the caching allocator gives back what it
        holds unused, the dense copies kept now (:meth:`keep_dense`) counted
        as free."""
        assert self.core is not None
        torch.cuda.empty_cache()
        kept = products.dense_kept(self.core.products) if self.core.products else 0
        return int(torch.cuda.mem_get_info(self.core.device)[0]) + kept

    def verify(self, reference: Any = None) -> tuple[float, float]:
        """The load check of the batched path (bot/engine/fidelity.py): its
        prefill and graph-replayed decode step against transformers' forward
        (``reference``: the forward's logits of the probe prompt, computed
        here when not given). Raises ConfigError; returns the two errors. A
        failure with the project's step kernels on (attention, residual add +
        RMSNorm) is checked again without them, then with each alone, so that
        the sentence names the part at fault and the setting that avoids it."""
        from bot.engine.fidelity import check_decode_path, check_forward, probe_ids

        assert self.core is not None
        core = self.core
        ids = probe_ids(self.tokenizer)
        kernel = self._description.get("gptq kernel", "")
        if reference is None:
            reference = check_forward(self.model, ids, self.config.id, kernel, self.config.gptq_backend)
        check = partial(check_decode_path, core, ids, reference, self.config.id, kernel, self.config.gptq_backend)
        try:
            return check()
        except ConfigError:
            on = [k for k in _step_kernels(core) if k.used()]
            if not on:
                raise
        for k in on:
            k.turn(False)
        check()  # fails too: the products' fault, said as check_decode_path says it
        at_fault = []
        for k in on:  # correct without them all: which one is wrong alone
            k.turn(True)
            try:
                check()
            except ConfigError:
                at_fault.append(k)
            k.turn(False)
        at_fault = at_fault or on  # wrong only together
        raise ConfigError(
            f"model {self.config.id} decodes wrongly with "
            + " and ".join(f"{k.what} ({k.source})" for k in at_fault)
            + f" and correctly without {'them' if len(at_fault) > 1 or at_fault[0].plural else 'it'}: set "
            + " and ".join(f"[model] {k.setting} = false" for k in at_fault)
            + " instead"
        )

    def _build(self, model: Any) -> None:
        self.model = model
        cache_len = self._max_len or kv_cache_len(model, self.max_batch, self.context_length)
        on_gpu = model.model.embed_tokens.weight.device.type == "cuda"
        glue = on_gpu if self._compile_glue is None else self._compile_glue
        self.core = DecodeCore(
            model, self.max_batch, cache_len, use_graphs=self._use_graphs, compile_glue=glue,
            attention_kernel=self.config.attention_kernel, norm_kernel=self.config.norm_kernel,
            dependent_launch=self.config.dependent_launch,
        )
        eos = list(self._eos_ids) if self._eos_ids is not None else []
        if self._eos_ids is None and self.tokenizer.eos_id is not None:
            eos = [self.tokenizer.eos_id]
        self.scheduler = BatchScheduler(
            self.core, eos, on_finish=self._record, prefill_chunk=self.config.prefill_chunk,
            prefix_cache=self.config.prefix_cache, lookahead=self._lookahead, mixed=self.config.mixed_prefill,
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
        req = Request(list(prompt_ids), settings, loop, asyncio.Queue())
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


# The KV cache takes at most this share of the GPU's free memory.
KV_FREE_FRACTION = 0.9
# Bytes :func:`dense_budget` leaves free beyond a prompt's working memory
# (cuBLAS's workspace, captured graphs, the caching allocator's slack).
DENSE_SPARE = 2 << 30


def kv_token_bytes(model: Any) -> int:
    """Bytes of keys and values one cache position of one row takes, all layers."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(2 * cfg.num_hidden_layers * kv * hd * model.model.embed_tokens.weight.element_size())


def kv_cache_len(model: Any, max_batch: int, context_length: int, fraction: float = KV_FREE_FRACTION) -> int:
    """Cache positions per row: the context, or less if the GPU's free memory
    cannot hold ``max_batch`` rows of it (plus one scratch position)."""
    want = context_length + 1
    dev = model.model.embed_tokens.weight.device
    if dev.type != "cuda":
        return want
    free, _ = torch.cuda.mem_get_info(dev)
    fit = int(free * fraction) // (kv_token_bytes(model) * max_batch)
    if fit >= want:
        return want
    return int(max(256, fit // 256 * 256))


def dense_budget(model: Any, layer_products: Sequence[products.LayerProducts], free: int, tokens: int) -> int:
    """Bytes of dense weight copies (``products.set_dense``) that ``free``
    bytes hold, leaving a forward of ``tokens`` prompt tokens what it holds at
    once: per token ~8 hidden-size and 3 intermediate-size vectors (hidden
    states, residual, norm, q/k/v, attention, o; gate/up and SiLU x up), one
    product dequantized (the largest), and :data:`DENSE_SPARE`."""
    cfg = model.config
    elt = int(model.model.embed_tokens.weight.element_size())
    activations = tokens * (8 * cfg.hidden_size + 3 * cfg.intermediate_size) * elt
    largest = max((p.row.dense_nbytes() for layer in layer_products for p in layer.each()), default=0)
    return int(max(0, free - activations - largest - DENSE_SPARE))
