"""A tiny byte-level tokenizer for the remote engine's tests and benchmark."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bot.engine.transformers import HFPromptTokenizer


def byte_tokenizer() -> HFPromptTokenizer:
    """A tiny byte-level tokenizer with ``<s>``/``</s>`` specials (Llama's ids 1, 2)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = "{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}"
    return HFPromptTokenizer(hf)
