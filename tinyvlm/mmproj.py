"""Read llama.cpp's MobileVLM image encoder (an "mmproj" GGUF file: CLIP vision tower plus LDP / LDPv2 projector).

Follows what llama.cpp's examples/llava/llava_surgery.py and convert_image_encoder_to_gguf.py write
(../shared/design/mobilevlm.md section 3.6):
* metadata `clip.projector_type` ("ldp" for MobileVLM V1, "ldpv2" for V2) and the tower's hyper-parameters under
  `clip.vision.*` (image_size, patch_size, embedding_length, feed_forward_length, attention.head_count,
  attention.layer_norm_epsilon, block_count, image_mean, image_std);
* CLIP tensors renamed `v.*` by a chain of string replacements, in which transformers' `mlp.fc1` (C -> 4C)
  became `ffn_down` and `mlp.fc2` became `ffn_up`;
* projector tensors renamed `mm.model.*` for both versions, with every size-1 axis squeezed away: a depthwise
  kernel (D, 1, 3, 3) is stored as (D, 3, 3), a 1x1 conv (out, in, 1, 1) as (out, in).
MMPROJ_NAMES maps each name back to the names VisionTower and build_projector read; UNSQUEEZED restores the shapes.

Vision layers. For a LLaVA-style mmproj the converter drops the tower's last layer and writes block_count = 23 for
ViT-L: the file holds layers 0..22, which produce exactly hidden_states[-2], the features the official MobileVLM
code selects. tinyvlm runs all `block_count` stored layers. (llama.cpp's own graph stops one layer earlier, so it
runs only 22: section 11, item 1. Its features are therefore not a reference.) A file that names its feature layer
(`clip.vision.feature_layer`, written by later converters that keep every layer) runs up to that hidden state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.config import ProjectorConfig, VisionConfig
from tinyvlm.errors import ConfigError, WeightsError
from tinyvlm.processor import CLIP_MEAN, CLIP_STD
from tinyvlm.projector import Projector, build_projector
from tinyvlm.vision import VisionTower, vision_needed_names
from tinyvlm.weights.gguf import read_gguf, to_float32

# llama.cpp's clip.projector_type -> tinyvlm's projector type.
LLAMACPP_PROJECTORS = {"ldp": "ldpnet", "ldpv2": "ldpnetv2"}

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

_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$"),
     ours)
    for g, ours in MMPROJ_NAMES.items()
]


def our_name(mmproj_name: str) -> str | None:
    """Our name for an mmproj tensor, or None when the table does not know it."""
    for pattern, ours in _PATTERNS:
        match = pattern.match(mmproj_name)
        if match:
            return ours.format(**match.groupdict())
    return None


def _unsqueeze(name: str, w: np.ndarray) -> np.ndarray:
    kind = next((k for suffix, k in UNSQUEEZED.items() if name.endswith(suffix)), None)
    if kind == "dw" and w.ndim == 3:
        return w[:, None]  # (D, 3, 3) -> (D, 1, 3, 3)
    if kind == "1x1" and w.ndim == 2:
        return w[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
    return w


@dataclass
class MMProj:
    """What an mmproj file holds, built: the CLIP tower and the projector, with their configs."""

    vision_config: VisionConfig
    projector_config: ProjectorConfig
    vision: VisionTower
    projector: Projector


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ConfigError(f"{path}: mmproj metadata lacks {key!r}")
    return meta[key]


def _vision_config(meta: dict[str, Any], path: Path) -> VisionConfig:
    if meta.get("clip.use_gelu", False):
        raise ConfigError(f"{path}: clip.use_gelu is true; tinyvlm's CLIP tower uses quick_gelu (as ViT-L/14 does)")
    for key, expected in (("clip.vision.image_mean", CLIP_MEAN), ("clip.vision.image_std", CLIP_STD)):
        value = meta.get(key)
        if value is not None and not np.allclose(np.asarray(value, dtype=np.float32), expected, atol=1e-6):
            raise ConfigError(f"{path}: {key} is {value}; tinyvlm normalises with OpenAI CLIP's {expected.tolist()}")
    stored = int(_required(meta, "clip.vision.block_count", path))
    feature_layer = meta.get("clip.vision.feature_layer")
    if feature_layer is None:  # LLaVA-style file: the stored layers are exactly the ones that run
        layers, select = stored + 1, -2
    elif isinstance(feature_layer, list) and len(feature_layer) == 1:
        layers, select = stored, int(feature_layer[0])
    else:
        raise ConfigError(f"{path}: clip.vision.feature_layer is {feature_layer}; expected a single layer")
    try:
        return VisionConfig(
            hidden_size=int(_required(meta, "clip.vision.embedding_length", path)),
            num_hidden_layers=layers,
            num_attention_heads=int(_required(meta, "clip.vision.attention.head_count", path)),
            intermediate_size=int(_required(meta, "clip.vision.feed_forward_length", path)),
            image_size=int(_required(meta, "clip.vision.image_size", path)),
            patch_size=int(_required(meta, "clip.vision.patch_size", path)),
            layer_norm_eps=float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
            select_layer=select,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: bad clip.vision metadata ({err})") from None


def read_mmproj(path: str | Path, hidden_size: int) -> MMProj:
    """Build the vision tower and projector of an mmproj GGUF file for an LLM of width `hidden_size` (D)."""
    path = Path(path)
    f = read_gguf(path)
    meta = f.metadata
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder", False):
        raise WeightsError(f"{path}: not an mmproj file (expected general.architecture 'clip' with a vision "
                           f"encoder; found {meta.get('general.architecture')!r})")
    kind = _required(meta, "clip.projector_type", path)
    if kind not in LLAMACPP_PROJECTORS:
        raise ConfigError(f"{path}: unknown clip.projector_type {kind!r}; tinyvlm reads MobileVLM's "
                          f"{', '.join(repr(k) for k in LLAMACPP_PROJECTORS)}")
    vision_cfg = _vision_config(meta, path)
    projector_cfg = ProjectorConfig(LLAMACPP_PROJECTORS[kind], vision_cfg.hidden_size, hidden_size)

    needed = vision_needed_names(vision_cfg)
    vision_w: dict[str, np.ndarray] = {}
    projector_w: dict[str, np.ndarray] = {}
    unknown = []
    for name, tensor in f.tensors.items():
        ours = our_name(name)
        if ours is None:
            unknown.append(name)
        elif ours.startswith("vision_model."):
            if ours in needed:  # post_ln and layers past the selected one never run
                vision_w[ours] = to_float32(tensor)
        else:
            projector_w[ours] = _unsqueeze(ours, to_float32(tensor))
    if unknown:
        raise WeightsError(f"{path}: tensors the mmproj name table does not know: {', '.join(unknown[:10])}"
                           + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    try:
        vision = VisionTower(vision_cfg, vision_w)
        projector = build_projector(projector_cfg, projector_w)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err} (names after mapping the mmproj names; D = {hidden_size} is the "
                           "LLM's hidden size)") from None
    return MMProj(vision_cfg, projector_cfg, vision, projector)
