"""The in-process engine: transformers ``AutoModelForCausalLM``, as in the seed.

One model, loaded once; generation runs in a single dedicated thread, so the
event loop (Discord heartbeats, Slack acks) keeps running during a reply and
the model is used by one generation at a time.

GPTQ checkpoints load through transformers' GPTQ integration, which uses
GPTQModel (auto-gptq is archived; transformers 5 has no path for it); the
kernel is chosen by ``[model] gptq_backend``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bot.config import EMBEDDED_MODEL, ModelConfig
from bot.engine import embedded
from bot.engine.base import StreamStats
from bot.engine.detok import IncrementalDecoder
from bot.errors import ConfigError, GenerationError
from bot.types import Settings, Turn

log = logging.getLogger(__name__)

class HFPromptTokenizer:
    """A transformers tokenizer, seen as a :class:`~bot.tokenizer.PromptTokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id

    def encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        return list(ids)

    def encode_template(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)


def load_tokenizer(model: ModelConfig) -> HFPromptTokenizer:
    from transformers import AutoTokenizer

    if model.id == EMBEDDED_MODEL:
        return HFPromptTokenizer(embedded.load_tokenizer())
    source = model.tokenizer or model.id
    return HFPromptTokenizer(AutoTokenizer.from_pretrained(source, revision=model.revision))


class _TokenQueue:
    """A transformers streamer that hands new token ids to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self._loop = loop
        self._queue = queue
        self._skipped_prompt = False

    def put(self, value: Any) -> None:
        if not self._skipped_prompt:  # generate() first hands over the prompt
            self._skipped_prompt = True
            return
        for token_id in value.reshape(-1).tolist():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, int(token_id))

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class TransformersEngine:
    """``AutoModelForCausalLM.from_pretrained(id, device_map=...)``, streaming."""

    max_batch = 1

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.context_length = config.context_length
        self.prompt_format = config.prompt_format
        self.last_stats: StreamStats | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.model: Any = None
        self.tokenizer: HFPromptTokenizer
        self._device = "?"
        self._kernel = ""
        # Group size -1 checkpoints with gptq_backend = "marlin" on a GPU: load
        # with the torch kernel, then fuse each layer's products into the row
        # packing (bot/engine/products.py) or, failing that, regroup every
        # module into Marlin (bot/engine/gptq_regroup.py).
        self.regroup_channelwise = True
        self._regrouped = 0
        # The batched engine also wants a kernel for decode steps of several
        # rows ([model] batch_kernel: fused Marlin or the row packing's
        # tensor-core kernel); one conversation at a time does not. With
        # batch_kernel = "auto", kv_reserve says how much free memory its KV
        # cache needs (given the loaded model), which decides whether Marlin's
        # copy of the weights fits beside it.
        self.fuse_for_batches = False
        self.kv_reserve: Callable[[Any], int] = lambda model: 0
        self.layer_products: list[Any] | None = None
        self.probe_logits: Any = None  # the load check's logits (bot/engine/fidelity.py)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.load)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.model = None

    def describe(self) -> dict[str, str]:
        info = {"engine": "transformers", "model": self.config.id, "device": self._device}
        if self._kernel:
            info["gptq kernel"] = self._kernel
            if self._regrouped:
                info["gptq kernel"] += " (group size -1 regrouped into groups of 128)"
        return info

    # -- loading ---------------------------------------------------------
    def load(self) -> None:
        """Load the tokenizer and the model (blocking; :meth:`start` runs it in
        the generation thread). The batched engine loads through this too.

        Standard output belongs to the console chat: libraries that print
        while loading (gptqmodel's banner) are sent to standard error."""
        with contextlib.redirect_stdout(sys.stderr):
            self._load()

    def _load(self) -> None:
        started = time.perf_counter()
        self.tokenizer = load_tokenizer(self.config)
        self.model = self._load_model()
        self.model.eval()
        self._device = str(getattr(self.model, "device", "?"))
        self._kernel = _fused_kernels(self.layer_products) if self.layer_products else _gptq_kernel(self.model)
        self.check()
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            self.config.id, self._device, self.model.dtype, time.perf_counter() - started,
        )

    def _load_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"device_map": self.config.device_map, "dtype": self._dtype()}
        if self.config.id == EMBEDDED_MODEL:
            return embedded.load_model(**kwargs)
        kwargs["revision"] = self.config.revision
        quant = self._gptq_config()
        regroup = quant is not None and quant.backend == "torch" and self.config.gptq_backend == "marlin"
        if quant is not None:
            kwargs["quantization_config"] = quant
        model = AutoModelForCausalLM.from_pretrained(self.config.id, **kwargs)
        if regroup:
            self._channelwise_on_gpu(model)
        return model

    def _channelwise_on_gpu(self, model: Any) -> None:
        """Channelwise GPTQ loaded with the torch kernel: fused row-layout
        products (and fused Marlin for batches), or every module regrouped
        into Marlin where the row kernels cannot be built or the layers are
        not Llama-shaped."""
        from bot.engine import products, rowquant
        from bot.engine.gptq_regroup import REGROUP_SIZE, fused_marlin, marlin_class, regroup_model

        if self.config.row_kernel and products.can_fuse(model) and rowquant.available(model.device):
            marlin = self.fuse_for_batches and self._marlin_copy(model)
            self.layer_products = products.build(model, fused_marlin if marlin else None)
        else:
            self._regrouped = len(regroup_model(model, REGROUP_SIZE, marlin_class()))
        _empty_cuda_cache()

    def _marlin_copy(self, model: Any) -> bool:
        """Whether batches get fused Marlin (a second copy of the weights) or
        the row packing's tensor-core kernel ([model] batch_kernel)."""
        if self.config.batch_kernel != "auto":
            return self.config.batch_kernel == "marlin"
        import torch

        from bot.engine import products
        from bot.engine.gptq_regroup import marlin_copy_bytes

        copy, kv = marlin_copy_bytes(products.modules(model)), self.kv_reserve(model)
        free, _ = torch.cuda.mem_get_info(model.device)
        fits = copy + kv <= free
        log.info(
            "batch_kernel auto: %s (Marlin's copy %.1f GB + the KV cache's %.1f GB %s the %.1f GB free)",
            "marlin" if fits else "mma", copy / 1e9, kv / 1e9, "fit in" if fits else "exceed", free / 1e9,
        )
        return fits

    def check(self) -> None:
        """The load check: one forward of a fixed prompt gives finite logits,
        or loading fails with one sentence saying what to set instead."""
        from bot.engine.fidelity import check_forward, probe_ids

        self.probe_logits = check_forward(
            self.model, probe_ids(self.tokenizer), self.config.id, self._kernel, self.config.gptq_backend
        )

    def _dtype(self) -> Any:
        import torch

        name = self.config.dtype
        if name != "auto":
            return getattr(torch, name)
        if self.config.id == EMBEDDED_MODEL:
            # transformers keeps GGUF weights packed; its kernels compute in float32.
            return torch.float32
        on_cpu = self.config.device_map == "cpu" or not torch.cuda.is_available()
        # GPTQModel's fast CPU kernel runs only in bfloat16; on a GPU, the checkpoint's dtype.
        return torch.bfloat16 if on_cpu else "auto"

    def _gptq_config(self) -> Any:
        """A GPTQConfig that picks the kernel, for GPTQ checkpoints only."""
        if self.config.gptq_backend == "auto":
            return None
        from transformers import AutoConfig, GPTQConfig

        hf_config = AutoConfig.from_pretrained(self.config.id, revision=self.config.revision)
        quant = getattr(hf_config, "quantization_config", None) or {}
        if not isinstance(quant, dict):
            quant = quant.to_dict()
        if quant.get("quant_method") != "gptq":
            return None
        backend = gptq_load_backend(self.config, quant, self.regroup_channelwise)
        return GPTQConfig(bits=quant.get("bits", 4), backend=backend)

    # -- generation ------------------------------------------------------
    async def stream(self, prompt_ids: list[int], settings: Settings, *,
                     turns: Sequence[Turn] = (), is_dm: bool = False) -> AsyncGenerator[str, None]:
        if self.model is None:
            raise GenerationError("the model is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        stats = StreamStats(prompt_tokens=len(prompt_ids))
        started = time.perf_counter()
        future = loop.run_in_executor(
            self._executor, self._generate, prompt_ids, settings, _TokenQueue(loop, queue), cancel
        )
        decoder = IncrementalDecoder(self.tokenizer.decode)
        try:
            while (token_id := await queue.get()) is not None:
                if stats.new_tokens == 0:
                    stats.first_token_s = time.perf_counter() - started
                stats.new_tokens += 1
                if token_id == self.tokenizer.eos_id:
                    continue
                if piece := decoder.push(token_id):
                    yield piece
            await future  # raises what generate() raised
            if tail := decoder.flush():
                yield tail
        except GenerationError:
            raise
        except Exception as exc:
            log.exception("generation failed")
            raise GenerationError.internal(exc, "generate") from exc
        finally:
            cancel.set()
            stats.total_s = time.perf_counter() - started
            self.last_stats = stats

    def _generate(self, prompt_ids: list[int], settings: Settings, streamer: _TokenQueue,
                  cancel: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        if cancel.is_set():
            streamer.end()
            return
        try:
            inputs = torch.tensor([prompt_ids], device=self.model.device)
            with torch.inference_mode():
                self.model.generate(
                    inputs,
                    attention_mask=torch.ones_like(inputs),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                    **generation_kwargs(settings, self.tokenizer),
                )
        finally:
            streamer.end()


def gptq_load_backend(config: ModelConfig, quant: dict[str, Any], regroup: bool) -> str:
    """The kernel to load a GPTQ checkpoint with, or ConfigError for a pair
    measured wrong (docs/gpu-notes.md, "Fidelity"). Group size -1 with
    "marlin": loaded with "torch", then regrouped into Marlin modules."""
    from bot.engine.gptq_regroup import is_channelwise

    backend = config.gptq_backend
    if backend == "exllama_v2" and (is_channelwise(quant) or quant.get("desc_act")):
        raise ConfigError(
            f"model {config.id} is GPTQ with group size -1 or act order, on which the exllama_v2 "
            "kernel decodes wrongly under CUDA graphs: set [model] gptq_backend = \"marlin\" instead"
        )
    if not is_channelwise(quant):
        return backend
    on_gpu = config.device_map != "cpu" and _cuda_available()
    if backend == "marlin" and regroup and on_gpu:
        return "torch"
    return backend


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation_kwargs(settings: Settings, tokenizer: HFPromptTokenizer) -> dict[str, Any]:
    """The seed's sampling arguments, from the settings in force."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.hf.pad_token_id if tokenizer.hf.pad_token_id is not None
        else tokenizer.eos_id,
    }
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                      top_k=settings.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _fused_kernels(layer_products: list[Any]) -> str:
    """What serves a model whose products were fused (bot/engine/products.py)."""
    from bot.engine.products import PROMPT_MIN_TOKENS

    kernels = f"row kernel (channelwise 4-bit: one row, prompts of {PROMPT_MIN_TOKENS}+ tokens)"
    batch = layer_products[0].qkv.batch
    if batch is not None:
        kernels += f" + {type(batch).__name__} fused (batches; group size -1 regrouped into groups of 128)"
    else:
        kernels += " + its tensor-core kernel (batches)"
    return kernels


def _gptq_kernel(model: Any) -> str:
    """The class of the first GPTQ layer (``MarlinLinear``, ``TorchAtenLinear``...),
    or "" for a model that is not GPTQ-quantized. Loading a GPTQ checkpoint
    imports gptqmodel; for any other model it is not imported here either (its
    import prints a banner and changes the process environment)."""
    if "gptqmodel" not in sys.modules:
        return ""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            return type(module).__name__
    return ""
