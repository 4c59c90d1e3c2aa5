"""The llama hyperparameters (and a tiny vocabulary) of a GGUF file, in the order llama.cpp's convert_hf_to_gguf.py writes them; shared by
the tests that write LLM GGUF files (the key order is part of a file's bytes, which test_golden_logits hashes)."""
from __future__ import annotations

from typing import Any


def add_llama_header(w: Any, name: str, *, context: int, width: int, layers: int, ffn: int, heads: int,
                     kv_heads: int, eps: float, rope_base: float = 10000.0) -> None:
    """general.name and the llama.* keys of a gguf.GGUFWriter `w` (RoPE over whole heads)."""
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(width)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(width // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(rope_base)


def add_tiny_vocab(w: Any, vocab: int) -> None:
    """A byte-level BPE vocabulary of `vocab` tokens: <unk> <s> </s>, printable characters, one merge."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [chr(ord("!") + i) for i in range(vocab - 4)] + ['!"'])
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))  # control, then normal
    w.add_token_merges(['! "'])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
