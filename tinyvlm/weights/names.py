"""GGUF (llama.cpp) names and layout of a LLaMA LLM -> the Hugging Face names and layout tinyvlm uses.

Three things, each following llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel`) and gguf-py's
`TensorNameMap`/`Keys` (style.md b2, b5):
* one declarative table from GGUF tensor names to ours, with {i} standing for the layer index;
* the inverse of the row permutation the converter applies to q_proj and k_proj: LLaMA checkpoints rotate
  head halves (RoPE "rotate half": within a head, row r pairs with r + Dh/2), ggml rotates adjacent rows (2j
  with 2j + 1), so the converter interleaves the two halves of every head; `unpermute_qk` undoes it;
* the TextConfig from `llama.*` metadata keys, through a key table.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from tinyvlm.config import TextConfig
from tinyvlm.errors import ConfigError, WeightsError

# GGUF name -> Hugging Face name. output.weight is absent when the embeddings are tied.
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp may store that tinyvlm recomputes instead (RoPE frequencies).
IGNORED = frozenset({"rope_freqs.weight"})

_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), hf) for g, hf in LLAMA_NAMES.items()]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF LLaMA tensor, or None when the table does not know it."""
    for pattern, hf in _PATTERNS:
        match = pattern.match(gguf_name)
        if match:
            return hf.format(i=int(match.group(1))) if match.groups() else hf
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the converter's q/k row permutation: w (heads*Dh, in) in GGUF row order -> HF row order.

    The converter maps HF rows (head h, half s, j) to GGUF rows (h, j, s), i.e. it reshapes to
    (heads, 2, Dh/2, in) and swaps axes 1 and 2. Pass Hq for q_proj and Hkv for k_proj.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot un-permute a weight with {rows} rows for {n_heads} heads: "
                           f"rows must be a multiple of 2 x heads")
    half = rows // n_heads // 2  # Dh/2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The converter's permutation (HF row order -> GGUF row order), for writing GGUF files in tests and tools."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# TextConfig field -> key under "{arch}." (gguf-py Keys.LLM / Keys.Attention / Keys.Rope), required or not.
_TEXT_KEYS = {
    "hidden_size": ("embedding_length", True),
    "num_hidden_layers": ("block_count", True),
    "num_attention_heads": ("attention.head_count", True),
    "num_key_value_heads": ("attention.head_count_kv", False),
    "intermediate_size": ("feed_forward_length", True),
    "max_position_embeddings": ("context_length", True),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon", False),
    "rope_theta": ("rope.freq_base", False),
    "head_dim": ("attention.key_length", False),
}
_TOKEN_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}


def text_config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str]) -> TextConfig:
    """TextConfig of a LLaMA GGUF file from its metadata; tied embeddings when it has no output.weight.

    The vocabulary size is the length of tokenizer.ggml.tokens ({arch}.vocab_size when there is no vocabulary).
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF general.architecture is {arch!r}; tinyvlm reads 'llama' models only")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"GGUF {arch}.rope.scaling.type is {scaling!r}; tinyvlm supports plain RoPE only")
    values: dict[str, Any] = {}
    for field, (key, required) in _TEXT_KEYS.items():
        full = f"{arch}.{key}"
        if full in metadata:
            values[field] = metadata[full]
        elif required:
            raise ConfigError(f"GGUF metadata lacks {full!r}")
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    for field, key in _TOKEN_KEYS.items():
        if key in metadata:
            values[field] = metadata[key]
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else metadata.get(f"{arch}.vocab_size")
    if vocab is None:
        raise ConfigError(f"GGUF metadata has neither tokenizer.ggml.tokens nor {arch}.vocab_size")
    try:
        fields = {k: float(v) if k in ("rms_norm_eps", "rope_theta") else int(v) for k, v in values.items()}
        return TextConfig(vocab_size=int(vocab), tie_word_embeddings="output.weight" not in set(tensor_names),
                          **fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"GGUF metadata has a bad value ({err})") from None
