"""Configs from Hugging Face files: a checkpoint's config.json, a CLIP tower's config.json, and a vision tower
known only by its tensor shapes and the id it names."""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tinyvlm.config import PROJECTOR_TYPES, ModelConfig, ProjectorConfig, TextConfig, VisionConfig
from tinyvlm.errors import ConfigError
from tinyvlm.weights.names import CLIP_EMBEDDINGS, CLIP_LAYER


def _require(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg:
        raise ConfigError(f"{path}: missing key {key!r}")
    return cfg[key]


def text_config_from_dict(cfg: dict[str, Any], path: Path) -> TextConfig:
    heads = int(_require(cfg, "num_attention_heads", path))
    eos = cfg.get("eos_token_id", 2)
    if isinstance(eos, list):  # some configs list several
        eos = eos[0]
    context = cfg.get("max_sequence_length") or cfg.get("max_position_embeddings") or 2048
    return TextConfig(
        hidden_size=int(_require(cfg, "hidden_size", path)),
        num_hidden_layers=int(_require(cfg, "num_hidden_layers", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        vocab_size=int(_require(cfg, "vocab_size", path)),
        max_position_embeddings=int(context),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=int(cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1),
        eos_token_id=int(eos if eos is not None else 2),
        head_dim=int(cfg.get("head_dim") or 0),
    )


def projector_type_of(name: str, path: Path) -> str:
    """Normalise mm_projector_type by prefix, checking `ldpnetv2` before `ldpnet` as the official code does."""
    for kind in PROJECTOR_TYPES:
        if name.startswith(kind):
            return kind
    raise ConfigError(
        f"{path}: unknown mm_projector_type {name!r} (tinyvlm supports {', '.join(PROJECTOR_TYPES)})"
    )


def vision_config_from_dict(cfg: dict[str, Any], select_layer: int, select_feature: str) -> VisionConfig:
    """From a CLIP config.json: a CLIPConfig (vision_config nested) or a CLIPVisionConfig."""
    v = cfg.get("vision_config", cfg)
    d = VisionConfig()
    return VisionConfig(
        hidden_size=int(v.get("hidden_size", d.hidden_size)),
        num_hidden_layers=int(v.get("num_hidden_layers", d.num_hidden_layers)),
        num_attention_heads=int(v.get("num_attention_heads", d.num_attention_heads)),
        intermediate_size=int(v.get("intermediate_size", d.intermediate_size)),
        image_size=int(v.get("image_size", d.image_size)),
        patch_size=int(v.get("patch_size", d.patch_size)),
        layer_norm_eps=float(v.get("layer_norm_eps", d.layer_norm_eps)),
        hidden_act=str(v.get("hidden_act", d.hidden_act)),
        select_layer=select_layer,
        select_feature=select_feature,
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    """Read `model_dir/config.json`. The vision config is filled in later from the tower's weights."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    try:
        text = text_config_from_dict(cfg, path)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad value ({e})") from None
    if "mm_projector_type" not in cfg:
        return ModelConfig(text=text, raw=cfg)
    kind = projector_type_of(str(cfg["mm_projector_type"]), path)
    tower_type = cfg.get("vision_tower_type", "clip")
    if tower_type != "clip":
        raise ConfigError(f"{path}: unsupported vision_tower_type {tower_type!r} (expected 'clip')")
    mm_hidden = int(cfg.get("mm_hidden_size", 1024))
    return ModelConfig(
        text=text,
        vision=None,
        projector=ProjectorConfig(kind, mm_hidden, text.hidden_size),
        mm_vision_tower=cfg.get("mm_vision_tower"),
        image_aspect_ratio=str(cfg.get("image_aspect_ratio", "pad")),
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
    needed = [CLIP_EMBEDDINGS + "class_embedding", CLIP_EMBEDDINGS + "patch_embedding.weight",
              CLIP_EMBEDDINGS + "position_embedding.weight", CLIP_LAYER.format(j=0) + "mlp.fc1.weight"]
    missing = [n for n in needed if n not in shapes]
    if missing:
        raise ConfigError(f"cannot infer the CLIP vision config: missing tensors {', '.join(missing)}")
    C = int(shapes[needed[0]][0])
    patch = int(shapes[needed[1]][-1])
    positions = int(shapes[needed[2]][0])
    grid = math.isqrt(max(positions - 1, 0))
    if grid * grid != positions - 1:
        raise ConfigError(f"position_embedding has {positions} rows; expected 1 + a square number of patches")
    layer_ids = [int(m.group(1)) for n in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", n))]
    inferred = VisionConfig(hidden_size=C, num_hidden_layers=max(layer_ids) + 1,
                            num_attention_heads=max(C // OPENAI_HEAD_DIM, 1),
                            intermediate_size=int(shapes[needed[3]][0]), image_size=grid * patch, patch_size=patch,
                            select_layer=select_layer, select_feature=select_feature)
    known = KNOWN_CLIP.get(str(tower))
    if known is not None and (known.hidden_size, known.intermediate_size, known.image_size, known.patch_size) == (
            C, inferred.intermediate_size, inferred.image_size, patch):
        return replace(inferred, num_attention_heads=known.num_attention_heads)
    if warn:
        warnings.warn(f"the vision tower's config is not in the checkpoint and {tower!r} is not a CLIP tinyvlm "
                      f"knows with these shapes: assuming {OPENAI_HEAD_DIM}-wide heads ({inferred.num_attention_heads} "
                      f"heads for width {C})", stacklevel=4)
    return inferred
