"""Configs from Hugging Face files: a checkpoint's config.json, a CLIP tower's config.json, and a vision tower
known only by its tensor shapes and the id it names."""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tinyvlm.config import (PROJECTOR_TYPES, ModelConfig, ProjectorConfig, TextConfig, VisionConfig, int_in, is_flag,
                            is_text, real_in)
from tinyvlm.errors import ConfigError
from tinyvlm.limits import (MAX_CONTEXT, MAX_LAYERS, MAX_ROPE_BASE, MAX_VOCAB, MAX_WIDTH, REQUIRED, Check, choices,
                            integer, integers, read_json_object, read_table, short)
from tinyvlm.weights.names import CLIP_EMBEDDINGS, CLIP_LAYER


def _token_ids(value: object, what: str) -> int:
    """eos_token_id: one id, or a list of them (the first is used)."""
    ids = value if isinstance(value, list) and value else [value]
    return [integer(i, what, ConfigError, 0, MAX_VOCAB) for i in ids][0]


# Every key read from a checkpoint's config.json: its check and its default (None: derived from other keys).
_TEXT_KEYS: dict[str, tuple[Check, Any]] = {
    "hidden_size": (int_in(1, MAX_WIDTH), REQUIRED),
    "num_hidden_layers": (int_in(1, MAX_LAYERS), REQUIRED),
    "num_attention_heads": (int_in(1, MAX_WIDTH), REQUIRED),
    "num_key_value_heads": (int_in(1, MAX_WIDTH), None),  # default: num_attention_heads
    "intermediate_size": (int_in(1, MAX_WIDTH), REQUIRED),
    "vocab_size": (int_in(1, MAX_VOCAB), REQUIRED),
    "max_sequence_length": (int_in(1, MAX_CONTEXT), None),  # wins over max_position_embeddings when present
    "max_position_embeddings": (int_in(1, MAX_CONTEXT), 2048),
    "rms_norm_eps": (real_in(0, 1), 1e-6),
    "rope_theta": (real_in(0, MAX_ROPE_BASE), 10000.0),
    "tie_word_embeddings": (is_flag, False),
    "bos_token_id": (_token_ids, 1),
    "eos_token_id": (_token_ids, 2),
    "head_dim": (int_in(1, MAX_WIDTH), None),  # default: hidden_size / num_attention_heads
}
_VLM_KEYS: dict[str, tuple[Check, Any]] = {
    "mm_projector_type": (is_text, REQUIRED),
    "vision_tower_type": (choices(("clip",), ConfigError), "clip"),
    "mm_hidden_size": (int_in(1, MAX_WIDTH), 1024),
    "mm_vision_tower": (is_text, None),
    "image_aspect_ratio": (is_text, "pad"),
    "mm_vision_select_layer": (integers(-MAX_LAYERS - 1, MAX_LAYERS, ConfigError), -2),
    "mm_vision_select_feature": (choices(("patch", "cls_patch"), ConfigError), "patch"),
}
# A CLIP tower's config.json (or its vision_config): defaults are ViT-L/14-336.
_CLIP = VisionConfig()
_CLIP_KEYS: dict[str, tuple[Check, Any]] = {
    "hidden_size": (int_in(1, MAX_WIDTH), _CLIP.hidden_size),
    "num_hidden_layers": (int_in(1, MAX_LAYERS), _CLIP.num_hidden_layers),
    "num_attention_heads": (int_in(1, MAX_WIDTH), _CLIP.num_attention_heads),
    "intermediate_size": (int_in(1, MAX_WIDTH), _CLIP.intermediate_size),
    "image_size": (int_in(1, MAX_WIDTH), _CLIP.image_size),
    "patch_size": (int_in(1, MAX_WIDTH), _CLIP.patch_size),
    "layer_norm_eps": (real_in(0, 1), _CLIP.layer_norm_eps),
    "hidden_act": (choices(("quick_gelu",), ConfigError), "quick_gelu"),  # the only one vision.py runs
}


def text_config_from_dict(cfg: dict[str, Any], path: Path) -> TextConfig:
    v = read_table(cfg, _TEXT_KEYS, str(path), ConfigError)
    context = v.pop("max_sequence_length") or v["max_position_embeddings"]
    try:
        return TextConfig(**{**v, "max_position_embeddings": context,
                             "num_key_value_heads": v["num_key_value_heads"] or v["num_attention_heads"],
                             "head_dim": v["head_dim"] or 0})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def projector_type_of(name: str, path: Path) -> str:
    """Normalise mm_projector_type by prefix, checking `ldpnetv2` before `ldpnet` as the official code does."""
    for kind in PROJECTOR_TYPES:
        if name.startswith(kind):
            return kind
    raise ConfigError(
        f"{path}: unknown mm_projector_type {short(name)} (tinyvlm supports {', '.join(PROJECTOR_TYPES)})"
    )


def vision_config_from_dict(cfg: dict[str, Any], path: Path, select_layer: int, select_feature: str) -> VisionConfig:
    """From a CLIP config.json: a CLIPConfig (vision_config nested) or a CLIPVisionConfig."""
    v = cfg.get("vision_config", cfg)
    if not isinstance(v, dict):
        raise ConfigError(f"{path}: vision_config is {short(v)}; expected an object")
    try:
        return VisionConfig(**read_table(v, _CLIP_KEYS, str(path), ConfigError), select_layer=select_layer,
                            select_feature=select_feature)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(model_dir: Path) -> ModelConfig:
    """Read `model_dir/config.json`. The vision config is filled in later from the tower's weights."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    cfg = read_json_object(path, ConfigError)
    text = text_config_from_dict(cfg, path)
    if "mm_projector_type" not in cfg:
        return ModelConfig(text=text, raw=cfg)
    v = read_table(cfg, _VLM_KEYS, str(path), ConfigError)
    return ModelConfig(
        text=text,
        vision=None,
        projector=ProjectorConfig(projector_type_of(v["mm_projector_type"], path), v["mm_hidden_size"],
                                  text.hidden_size),
        mm_vision_tower=v["mm_vision_tower"],
        image_aspect_ratio=v["image_aspect_ratio"],
        select_layer=v["mm_vision_select_layer"],
        select_feature=v["mm_vision_select_feature"],
        raw=cfg,
    )


# CLIP towers by the id `mm_vision_tower` names: V2 checkpoints carry the tower's weights but not its config, and
# the head count cannot be read off the shapes.
KNOWN_CLIP = {
    "openai/clip-vit-large-patch14-336": VisionConfig(1024, 24, 16, 4096, 336, 14),
    "openai/clip-vit-large-patch14": VisionConfig(1024, 24, 16, 4096, 224, 14),
}
OPENAI_HEAD_DIM = 64  # every OpenAI CLIP ViT uses 64-wide heads: the guess when the tower is not known


def vision_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], tower: str | None, select_layer: int = -2,
                              select_feature: str = "patch", warn: bool = True) -> VisionConfig:
    """The VisionConfig of a tower known only by its tensor shapes and the id it was published under.

    The sizes come from the shapes. The head count comes from KNOWN_CLIP when `tower` is one of its ids and the
    shapes agree with it; otherwise it is inferred from 64-wide heads, with a warning that says so.
    """
    needed = {CLIP_EMBEDDINGS + "class_embedding": 1, CLIP_EMBEDDINGS + "patch_embedding.weight": 4,
              CLIP_EMBEDDINGS + "position_embedding.weight": 2, CLIP_LAYER.format(j=0) + "mlp.fc1.weight": 2}
    missing = [n for n in needed if n not in shapes]
    if missing:
        raise ConfigError(f"cannot infer the CLIP vision config: missing tensors {', '.join(missing)}")
    wrong = [f"{n} {list(shapes[n])}" for n, dims in needed.items() if len(shapes[n]) != dims or 0 in shapes[n]]
    if wrong:
        raise ConfigError(f"cannot infer the CLIP vision config from the shapes of {', '.join(wrong)}")
    class_emb, patch_emb, pos_emb, fc1 = (shapes[n] for n in needed)
    C, patch, positions = class_emb[0], patch_emb[-1], pos_emb[0]
    grid = math.isqrt(max(positions - 1, 0))
    if grid * grid != positions - 1:
        raise ConfigError(f"position_embedding has {positions} rows; expected 1 + a square number of patches")
    layer_ids = {m.group(1) for n in shapes if (m := re.match(r"vision_model\.encoder\.layers\.([^.]+)\.", n))}
    if layer_ids != {str(i) for i in range(len(layer_ids))} or len(layer_ids) > MAX_LAYERS:
        raise ConfigError(f"the vision tower's layers are numbered {short(sorted(layer_ids))}; expected 0 to n - 1 "
                          f"with n at most {MAX_LAYERS}")
    inferred = VisionConfig(hidden_size=C, num_hidden_layers=len(layer_ids),
                            num_attention_heads=max(C // OPENAI_HEAD_DIM, 1),
                            intermediate_size=fc1[0], image_size=grid * patch, patch_size=patch,
                            select_layer=select_layer, select_feature=select_feature)
    known = KNOWN_CLIP.get(str(tower))
    if known is not None and (known.hidden_size, known.intermediate_size, known.image_size, known.patch_size) == (
            C, inferred.intermediate_size, inferred.image_size, patch):
        return replace(inferred, num_attention_heads=known.num_attention_heads)
    if warn:
        warnings.warn(f"the vision tower's config is not in the checkpoint and {short(tower)} is not a CLIP tinyvlm "
                      f"knows with these shapes: assuming {OPENAI_HEAD_DIM}-wide heads ({inferred.num_attention_heads} "
                      f"heads for width {C})", stacklevel=4)
    return inferred
