"""A real GGUF file of a tiny random Llama (one layer, 16 wide, a byte vocabulary),
written with gguf-py: transformers loads it through its own GGUF code in well
under a second, where the embedded model's 98 MB file takes about 30 s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
WIDTH, FF, HEADS = 16, 32, 2


def write_tiny_gguf(path: Path, seed: int) -> Path:
    """Different seeds give different weights (and a different file)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(WIDTH)
    writer.add_feed_forward_length(FF)
    writer.add_block_count(1)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_types([2, 3, 3] + [6] * 256)  # unknown, control, control, bytes
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    shapes = {
        "token_embd.weight": (len(TOKENS), WIDTH), "output_norm.weight": (WIDTH,),
        "output.weight": (len(TOKENS), WIDTH), "blk.0.attn_norm.weight": (WIDTH,),
        "blk.0.ffn_norm.weight": (WIDTH,), "blk.0.attn_q.weight": (WIDTH, WIDTH),
        "blk.0.attn_k.weight": (WIDTH, WIDTH), "blk.0.attn_v.weight": (WIDTH, WIDTH),
        "blk.0.attn_output.weight": (WIDTH, WIDTH), "blk.0.ffn_gate.weight": (FF, WIDTH),
        "blk.0.ffn_up.weight": (FF, WIDTH), "blk.0.ffn_down.weight": (WIDTH, FF),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
