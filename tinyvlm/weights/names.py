"""Tensor names: the CLIP tower's layout, and llama.cpp's GGUF names (LLM and mmproj) -> the Hugging Face names.

For GGUF LLMs, three things, each following llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel`) and gguf-py's
`TensorNameMap`/`Keys` (style.md b2, b5):
* one declarative table from GGUF tensor names to ours, with {i} standing for the layer index;
* the inverse of the row permutation the converter applies to q_proj and k_proj: LLaMA checkpoints rotate
  head halves (RoPE "rotate half": within a head, row r pairs with r + Dh/2), ggml rotates adjacent rows (2j
  with 2j + 1), so the converter interleaves the two halves of every head; `unpermute_qk` undoes it;
(The TextConfig from `llama.*` metadata keys is built in tinyvlm/config.py.)
For llama.cpp's MobileVLM image encoder (an mmproj file), the table MMPROJ_NAMES and the conv kernels whose
size-1 axes its converter squeezed (UNSQUEEZED); tinyvlm/loading/gguf.py reads it.
"""
from __future__ import annotations

import re
import numpy as np

from tinyvlm.errors import WeightsError

# The CLIP vision tower's tensors (transformers' CLIPVisionModel), relative to the tower.
CLIP_EMBEDDINGS = "vision_model.embeddings."
CLIP_LAYER = "vision_model.encoder.layers.{j}."

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

_LLAMA_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), hf) for g, hf in LLAMA_NAMES.items()]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF LLaMA tensor, or None when the table does not know it."""
    for pattern, hf in _LLAMA_PATTERNS:
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


# mmproj tensor name -> our name ({i}: a layer or block index, {p}: weight or bias). Targets starting with
# `vision_model.` go to VisionTower; the others are named after `model.mm_projector.`, for build_projector.
MMPROJ_NAMES = {
    "v.class_embd": "vision_model.embeddings.class_embedding",
    "v.patch_embd.weight": "vision_model.embeddings.patch_embedding.weight",
    "v.position_embd.weight": "vision_model.embeddings.position_embedding.weight",
    "v.pre_ln.{p}": "vision_model.pre_layrnorm.{p}",
    "v.post_ln.{p}": "vision_model.post_layernorm.{p}",
    "v.blk.{i}.ln1.{p}": "vision_model.encoder.layers.{i}.layer_norm1.{p}",
    "v.blk.{i}.attn_q.{p}": "vision_model.encoder.layers.{i}.self_attn.q_proj.{p}",
    "v.blk.{i}.attn_k.{p}": "vision_model.encoder.layers.{i}.self_attn.k_proj.{p}",
    "v.blk.{i}.attn_v.{p}": "vision_model.encoder.layers.{i}.self_attn.v_proj.{p}",
    "v.blk.{i}.attn_out.{p}": "vision_model.encoder.layers.{i}.self_attn.out_proj.{p}",
    "v.blk.{i}.ln2.{p}": "vision_model.encoder.layers.{i}.layer_norm2.{p}",
    "v.blk.{i}.ffn_down.{p}": "vision_model.encoder.layers.{i}.mlp.fc1.{p}",  # sic: fc1, C -> F
    "v.blk.{i}.ffn_up.{p}": "vision_model.encoder.layers.{i}.mlp.fc2.{p}",  # sic: fc2, F -> C
    # LDP (V1): the checkpoint's `model.mm_projector.model.*` with `model.mm_projector` -> `mm`
    "mm.model.mlp.1.{p}": "model.mlp.1.{p}",
    "mm.model.mlp.3.{p}": "model.mlp.3.{p}",
    "mm.model.mb_block.{i}.block.0.0.weight": "model.mb_block.{i}.block.0.0.weight",
    "mm.model.mb_block.{i}.block.0.1.{p}": "model.mb_block.{i}.block.0.1.{p}",
    "mm.model.mb_block.{i}.block.1.fc1.{p}": "model.mb_block.{i}.block.1.fc1.{p}",
    "mm.model.mb_block.{i}.block.1.fc2.{p}": "model.mb_block.{i}.block.1.fc2.{p}",
    "mm.model.mb_block.{i}.block.2.0.weight": "model.mb_block.{i}.block.2.0.weight",
    "mm.model.mb_block.{i}.block.2.1.{p}": "model.mb_block.{i}.block.2.1.{p}",
    # LDPv2 (V2): `mm.mlp.mlp` and `mm.peg.peg` were rewritten to `mm.model.mlp` and `mm.model.peg`
    "mm.model.mlp.0.{p}": "mlp.mlp.0.{p}",
    "mm.model.mlp.2.{p}": "mlp.mlp.2.{p}",
    "mm.model.peg.0.{p}": "peg.peg.0.{p}",
}
# Conv kernels the converter squeezed, by the end of our name: "dw" (D, 3, 3) -> (D, 1, 3, 3), "1x1" (o, i) ->
# (o, i, 1, 1).
UNSQUEEZED = {
    "block.0.0.weight": "dw",
    "peg.peg.0.weight": "dw",
    "block.1.fc1.weight": "1x1",
    "block.1.fc2.weight": "1x1",
    "block.2.0.weight": "1x1",
}

_MMPROJ_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$"),
     ours)
    for g, ours in MMPROJ_NAMES.items()
]


def mmproj_name(name: str) -> str | None:
    """Our name for an mmproj tensor, or None when the table does not know it."""
    for pattern, ours in _MMPROJ_PATTERNS:
        match = pattern.match(name)
        if match:
            return ours.format(**match.groupdict())
    return None


def unsqueeze(name: str, w: np.ndarray) -> np.ndarray:
    """A projector conv kernel named `name` (ours) with the size-1 axes the mmproj converter squeezed restored."""
    kind = next((k for suffix, k in UNSQUEEZED.items() if name.endswith(suffix)), None)
    if kind == "dw" and w.ndim == 3:
        return w[:, None]  # (D, 3, 3) -> (D, 1, 3, 3)
    if kind == "1x1" and w.ndim == 2:
        return w[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
    return w
