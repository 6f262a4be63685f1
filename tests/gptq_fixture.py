"""A tiny GPTQ 4-bit checkpoint, made locally: no download.

A random 2-layer Llama (hidden 128) with the tests' small Llama-style
tokenizer (tests/llama_tokenizer.py, trained on the spot) is quantized to
4-bit GPTQ (group size 32) by optimum's ``GPTQQuantizer`` (GPTQModel
underneath, on the CPU) and saved with its tokenizer, so ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` (what the engine does) both work.

:func:`tiny_gptq_checkpoint` caches the result in a folder keyed by the
recipe and the versions of torch, transformers, optimum, gptqmodel and
tokenizers, so reruns skip quantization (tests/test_gptq_cpu.py passes
``$XWIN_TEST_CACHE`` or pytest's cache folder; the default here is
``~/.cache/xwin-bot-tests``).

Run as a script to build one and print timings:
``python tests/gptq_fixture.py [DEST]``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# Recipe: change RECIPE_VERSION when the recipe below changes.
RECIPE_VERSION = 1
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
GROUP_SIZE = 32  # in_features 128 and 256 divide by it; every CPU kernel takes 32
SEED = 0

CALIBRATION = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "USER: Hi! ASSISTANT: Hello. How can I help you today?",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Self-hosted language models answer questions on a single GPU.",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "Quantization stores each weight in four bits with a scale per group.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]

GPTQ_ENV = {
    # The C++ CPU kernels use this many threads; the CI machine has 2 cores.
    "GPTQMODEL_CPU_WORKERS": "2",
    # Pack in Python: the C++ packer is JIT-compiled on first use (85 s on
    # 2 cores), while packing this tiny model in Python takes well under a second.
    "GPTQMODEL_DISABLE_PACK_EXT": "1",
}


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "optimum", "gptqmodel", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def cache_key() -> str:
    recipe = {
        "recipe": RECIPE_VERSION,
        "hidden": HIDDEN,
        "intermediate": INTERMEDIATE,
        "layers": LAYERS,
        "heads": HEADS,
        "kv": KV_HEADS,
        "group": GROUP_SIZE,
        "seed": SEED,
        "tokenizer": hashlib.sha256(Path(__file__).with_name("llama_tokenizer.py").read_bytes()).hexdigest(),
        "versions": versions(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("XWIN_TEST_CACHE") or Path.home() / ".cache" / "xwin-bot-tests")


def build_tokenizer() -> Any:
    """The tests' own Llama-style tokenizer (tests/llama_tokenizer.py: BPE
    with byte fallback, <s>/</s>, as Xwin's), so the checkpoint tokenizes
    like a real Llama one."""
    from tests.llama_tokenizer import build_llama_tokenizer

    tokenizer = build_llama_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_float_model(dest: Path) -> Any:
    """A random tiny Llama and its tokenizer, saved to ``dest``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return tokenizer


def quantize(float_dir: Path, dest: Path) -> dict[str, float]:
    """GPTQ 4-bit with optimum's GPTQQuantizer (GPTQModel underneath), on the CPU.

    optimum's ``save`` writes GPTQ v1 (``checkpoint_format: gptq``), the format
    of real checkpoints such as TheBloke's; ``save_pretrained`` after
    ``from_pretrained(quantization_config=GPTQConfig(...))`` would leave
    GPTQModel's internal ``gptq_v2`` instead.
    """
    import torch
    from optimum.gptq import GPTQQuantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for key, value in GPTQ_ENV.items():
        os.environ.setdefault(key, value)
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, device_map="cpu", dtype=torch.float16)
    quantizer = GPTQQuantizer(
        bits=4,
        group_size=GROUP_SIZE,
        desc_act=False,
        sym=True,
        dataset=list(CALIBRATION),
        model_seqlen=128,
    )
    started = time.perf_counter()
    model = quantizer.quantize_model(model, tokenizer)
    quantized_s = time.perf_counter() - started
    quantizer.save(model, str(dest))
    tokenizer.save_pretrained(dest)
    _fix_config_format(dest)
    return {"quantize_s": quantized_s}


def _fix_config_format(dest: Path) -> None:
    """Make config.json's quantization_config say what the weights are.

    optimum 2.3.0's ``GPTQQuantizer.save`` converts the weights to GPTQ v1 and
    says so in quantize_config.json, but config.json keeps ``format:
    gptq_v2`` from before the conversion; transformers reads config.json and
    would then skip the v1 -> v2 zero-point conversion (every weight off by one
    quantization step). Real checkpoints (TheBloke's) carry v1 in both.
    """
    quant = json.loads((dest / "quantize_config.json").read_text())
    quant.pop("dataset", None)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quant
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def build(dest: Path) -> dict[str, Any]:
    """Build ``dest/float`` (the random model) and ``dest/gptq`` (its GPTQ
    4-bit checkpoint); ``dest/gptq`` must not exist."""
    started = time.perf_counter()
    build_float_model(dest / "float")
    timings = quantize(dest / "float", dest / "gptq")
    timings["total_s"] = time.perf_counter() - started
    return timings


def tiny_gptq_checkpoint(cache: Path | None = None) -> Path:
    """The cached tiny model folder (``float/`` and ``gptq/`` inside), built on
    first use (about 20 s on 2 cores) and reused while the recipe and the
    library versions stay the same."""
    root = cache or cache_root()
    final = root / f"tiny-llama-gptq-{cache_key()}"
    if (final / "build.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        timings = build(staging / "model")
        info = {"timings": timings, "versions": versions()}
        (staging / "model" / "build.json").write_text(json.dumps(info, indent=2))
        try:
            (staging / "model").rename(final)
        except OSError:  # another process won the race
            if not (final / "build.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        print(json.dumps(build(target), indent=2))
    else:
        path = tiny_gptq_checkpoint()
        print(path)
        print((path / "build.json").read_text())
