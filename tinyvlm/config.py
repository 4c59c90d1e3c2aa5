"""Model configuration: one dataclass per model part, built from a Hugging Face config.json.

Only the Hugging Face keys are read (`num_attention_heads`, never the leftover lit-gpt `n_head` that the
real MobileVLM-3B configs also carry). See ../shared/design/mobilevlm.md sections 1, 2 and 4.2.

Shape glossary, used in comments across the package:
    T   tokens in the current chunk            S   KV-cache length (context)
    D   LLM hidden size                        Hq / Hkv  query / key-value heads
    Dh  head dim (D / Hq)                      F   LLM feed-forward size
    V   vocabulary size                        P   image patches (576 = 24 x 24)
    C   vision hidden size (1024 for ViT-L)    N   image tokens after the projector (144 = 12 x 12)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyvlm.errors import ConfigError

# Projector types tinyvlm implements; the official code matches these by prefix, ldpnetv2 first.
PROJECTOR_TYPES = ("ldpnetv2", "ldpnet")


@dataclass(frozen=True)
class TextConfig:
    """MobileLLaMA / LLaMA decoder."""

    hidden_size: int  # D
    num_hidden_layers: int
    num_attention_heads: int  # Hq
    num_key_value_heads: int  # Hkv
    intermediate_size: int  # F
    vocab_size: int  # V
    max_position_embeddings: int  # S (context length)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    head_dim: int = 0  # Dh; 0 means hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (defaults are ViT-L/14-336)."""

    hidden_size: int = 1024  # C
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2  # index into hidden_states (25 entries for 24 layers)
    select_feature: str = "patch"  # "patch" drops CLS; "cls_patch" keeps it

    @property
    def num_patches(self) -> int:  # P
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_to_run(self) -> int:
        """How many encoder layers produce hidden_states[select_layer] (23 of 24 for select_layer -2)."""
        n = self.select_layer % (self.num_hidden_layers + 1)
        return n


@dataclass(frozen=True)
class ProjectorConfig:
    """LDP (`ldpnet`, MobileVLM V1) or LDPv2 (`ldpnetv2`, MobileVLM V2)."""

    projector_type: str  # "ldpnet" or "ldpnetv2" (normalised from mm_projector_type)
    mm_hidden_size: int  # C, input width
    hidden_size: int  # D, output width


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: the LLM, and for a VLM also the vision tower and projector."""

    text: TextConfig
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    mm_vision_tower: str | None = None  # HF id or path of the CLIP tower (V1 loads it from there)
    image_aspect_ratio: str = "pad"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_multimodal(self) -> bool:
        return self.projector is not None


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
