"""The benchmark's synthetic checkpoints: Xwin-LM-70B's shapes, random weights.

:data:`XWIN_70B` is the reference checkpoint's layout (80 layers, hidden 8192,
intermediate 28672, 64/8 heads, vocab 32000, GPTQ 4-bit, group size -1, act
order) and :data:`TINY` a 2-layer float Llama for the CPU. :func:`build_checkpoint`
writes one (random int4 weights scaled so 80 layers stay finite in fp16, GPTQ
v1 format, a Llama-style tokenizer) where the project's loader reads it;
:func:`weight_bytes` and :func:`kv_bytes_per_token` are what a decode step reads.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RECIPE = 4  # bump when the checkpoint recipe changes


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    group: int
    context: int
    gptq: bool
    desc_act: bool = False  # act order: g_idx a permutation's groups (no effect at group -1)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def groups(self, fin: int) -> int:
        """Quantization groups along an input dimension of ``fin`` (1 at group size -1)."""
        return 1 if self.group <= 0 else fin // self.group


# The reference checkpoint, TheBloke/Xwin-LM-70B-V0.1-GPTQ branch main: 4 bits,
# group size -1 (one scale per column), act order, GPTQ v1 zero points, sym.
XWIN_70B = Shape(80, 8192, 28672, 64, 8, 32000, -1, 4096, True, desc_act=True)
# Its branch gptq-4bit-128g-actorder_True: `--group 128`.
TINY = Shape(2, 64, 160, 4, 2, 512, 32, 512, False)


def build_tokenizer(vocab: int) -> Any:
    """A Llama-style tokenizer (``<unk> <s> </s>``, 256 byte tokens, words),
    made here: word ``w{i}`` is one token, decoding uses byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        words[f"<0x{b:02X}>"] = len(words)
    i = 0
    while len(words) < vocab:
        words[f"▁w{i}"] = len(words)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )


def _llama_config(shape: Shape) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


def build_checkpoint(dest: Path, shape: Shape, seed: int = 0) -> float:
    """Write the checkpoint unless one with this recipe is there; seconds spent."""
    marker = dest / "bench-recipe.json"
    want = {"recipe": RECIPE, "shape": shape.__dict__}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    build_tokenizer(shape.vocab).save_pretrained(dest)
    if not shape.gptq:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = _llama_config(shape)
        cfg["torch_dtype"] = "float32"
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        model.save_pretrained(dest)
        marker.write_text(json.dumps(want))
        return time.perf_counter() - t0

    from safetensors.torch import save_file

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, m, kvd = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    projs = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kvd),
        "self_attn.v_proj": (h, kvd),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, m),
        "mlp.up_proj": (h, m),
        "mlp.down_proj": (m, h),
    }
    weight_map: dict[str, str] = {}

    def rand_i32(*size: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31 - 1, size, dtype=torch.int32, device=dev, generator=gen)

    def rand_f16(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(size, device=dev, generator=gen) * std).half()

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(dest / name))
        weight_map.update({k: name for k in tensors})

    for i in range(shape.layers):
        t: dict[str, torch.Tensor] = {}
        for name, (fin, fout) in projs.items():
            p = f"model.layers.{i}.{name}"
            t[p + ".qweight"] = rand_i32(fin // 8, fout)
            # zero point 8 (stored as 7 in the GPTQ v1 format); scale 1/(4 x 4.6 sqrt(in)):
            # each layer adds a quarter of unit variance (80 layers at full scale overflow fp16)
            ng = shape.groups(fin)
            t[p + ".qzeros"] = torch.full((ng, fout // 8), 0x77777777, dtype=torch.int32, device=dev)
            base = 0.25 / (4.6 * math.sqrt(fin))
            t[p + ".scales"] = (
                base * (0.5 + torch.rand((ng, fout), device=dev, generator=gen))
            ).half()
            t[p + ".g_idx"] = _g_idx(fin, ng, shape.desc_act, gen, dev)
        ones = torch.ones(h, dtype=torch.float16, device=dev)
        t[f"model.layers.{i}.input_layernorm.weight"] = ones
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = ones.clone()
        save(f"layer-{i:03d}.safetensors", t)
    save(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": rand_f16(shape.vocab, h, std=1.0),
            "model.norm.weight": torch.ones(h, dtype=torch.float16, device=dev),
            "lm_head.weight": rand_f16(shape.vocab, h, std=1.0 / math.sqrt(h)),
        },
    )
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=0)
    )
    cfg = _llama_config(shape)
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": shape.group,
        "desc_act": shape.desc_act,
        "sym": True,
        "damp_percent": 0.1,
        "checkpoint_format": "gptq",
    }
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    (dest / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )
    marker.write_text(json.dumps(want))
    return time.perf_counter() - t0


def _g_idx(fin: int, groups: int, desc_act: bool, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    """Each input row's group. With act order, GPTQ quantizes the rows in a
    permuted order (largest Hessian diagonal first) and stores the original
    order: a row's group is its rank in the permutation // group size."""
    if groups == 1:
        return torch.zeros(fin, dtype=torch.int32, device=dev)
    rank = torch.arange(fin, device=dev)
    if desc_act:
        rank = torch.argsort(torch.randperm(fin, device=dev, generator=gen))
    return (rank // (fin // groups)).to(torch.int32)



def weight_bytes(shape: Shape) -> float:
    """Bytes of weights one decode step reads (int4 + fp16 scales/zeros, lm_head)."""
    h, m, kvd = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = 0.0
    for fin, fout in ((h, h), (h, kvd), (h, kvd), (h, h), (h, m), (h, m), (m, h)):
        if shape.gptq:
            per_layer += fin * fout / 2 + shape.groups(fin) * fout * (2 + 0.5)
        else:
            per_layer += fin * fout * 4
        per_layer += 2 * h * 2
    head = shape.vocab * h * (2 if shape.gptq else 4)
    return shape.layers * per_layer + head


def kv_bytes_per_token(shape: Shape) -> float:
    return 2.0 * shape.layers * shape.kv_heads * shape.head_dim * (2 if shape.gptq else 4)

