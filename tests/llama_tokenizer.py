"""A small Llama-style tokenizer the tests build themselves (no download).

transformers' own ``LlamaTokenizer`` (BPE, Metaspace ``▁``, byte fallback)
with a vocabulary trained here on a little English text. Characters it has
never seen, Japanese among them, are spelled as byte tokens ``<0xE3>``...,
exactly the case that made the seed's reply end in ``��``.
"""

from __future__ import annotations

import json
from typing import Any

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Hi! ASSISTANT: Hello. USER: Who are you? ASSISTANT: I am Xwin-LM.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a Python function that returns the k-th Fibonacci number.",
    "There were 3 apples and 2 oranges. How many fruits were there in total?",
] * 20

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]


def build_llama_tokenizer(*, legacy: bool = True) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    ascii_chars = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS + BYTES,
        initial_alphabet=ascii_chars,
        limit_alphabet=len(ascii_chars),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=legacy)
