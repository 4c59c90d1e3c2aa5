"""Every configuration: one dataclass per model part and GenerationConfig, built here and nowhere else, from a
Hugging Face config.json, from GGUF metadata (an LLM file or an mmproj file), or from a vision tower's shapes.

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
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.errors import ConfigError, PromptError
from tinyvlm.weights.names import CLIP_EMBEDDINGS, CLIP_LAYER

# Projector types tinyvlm implements; the official code matches these by prefix, ldpnetv2 first.
PROJECTOR_TYPES = ("ldpnetv2", "ldpnet")
# OpenAI CLIP's pixel normalisation (every MobileVLM uses it).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


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


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, checked when made; temperature 0 means greedy. The CLI and the Python API take their
    defaults from here."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages ids already in the history; 1.0 = off
    seed: int | None = None  # None draws a fresh seed from the OS

    def __post_init__(self) -> None:
        """The one place the generation settings are checked: PromptError naming the first invalid value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise PromptError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise PromptError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise PromptError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise PromptError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise PromptError(f"seed must be an integer >= 0 or None, got {self.seed!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return _is_int(x) or (isinstance(x, (float, np.floating)) and not math.isnan(x))


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


# ---------------------------------------------------------------- the vision tower of a V2 checkpoint

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


# ---------------------------------------------------------------- GGUF metadata

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


# llama.cpp's clip.projector_type -> tinyvlm's projector type.
LLAMACPP_PROJECTORS = {"ldp": "ldpnet", "ldpv2": "ldpnetv2"}


def _mmproj_key(meta: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ConfigError(f"{path}: mmproj metadata lacks {key!r}")
    return meta[key]


def vision_configs_from_mmproj(meta: Mapping[str, Any], hidden_size: int,
                               path: Path) -> tuple[VisionConfig, ProjectorConfig]:
    """The CLIP tower's and the projector's configs of llama.cpp's mmproj file, for an LLM of width `hidden_size`.

    A LLaVA-style file stores the layers that produce hidden_states[-2] (block_count = 23 for ViT-L), and they all
    run; a file that names its feature layer (`clip.vision.feature_layer`) runs up to that hidden state.
    """
    kind = _mmproj_key(meta, "clip.projector_type", path)
    if kind not in LLAMACPP_PROJECTORS:
        raise ConfigError(f"{path}: unknown clip.projector_type {kind!r}; tinyvlm reads MobileVLM's "
                          f"{', '.join(repr(k) for k in LLAMACPP_PROJECTORS)}")
    if meta.get("clip.use_gelu", False):
        raise ConfigError(f"{path}: clip.use_gelu is true; tinyvlm's CLIP tower uses quick_gelu (as ViT-L/14 does)")
    for key, expected in (("clip.vision.image_mean", CLIP_MEAN), ("clip.vision.image_std", CLIP_STD)):
        value = meta.get(key)
        if value is not None and not np.allclose(np.asarray(value, dtype=np.float32), expected, atol=1e-6):
            raise ConfigError(f"{path}: {key} is {value}; tinyvlm normalises with OpenAI CLIP's {expected.tolist()}")
    stored = int(_mmproj_key(meta, "clip.vision.block_count", path))
    feature_layer = meta.get("clip.vision.feature_layer")
    if feature_layer is None:  # LLaVA-style file: the stored layers are exactly the ones that run
        layers, select = stored + 1, -2
    elif isinstance(feature_layer, list) and len(feature_layer) == 1:
        layers, select = stored, int(feature_layer[0])
    else:
        raise ConfigError(f"{path}: clip.vision.feature_layer is {feature_layer}; expected a single layer")
    try:
        vision = VisionConfig(
            hidden_size=int(_mmproj_key(meta, "clip.vision.embedding_length", path)),
            num_hidden_layers=layers,
            num_attention_heads=int(_mmproj_key(meta, "clip.vision.attention.head_count", path)),
            intermediate_size=int(_mmproj_key(meta, "clip.vision.feed_forward_length", path)),
            image_size=int(_mmproj_key(meta, "clip.vision.image_size", path)),
            patch_size=int(_mmproj_key(meta, "clip.vision.patch_size", path)),
            layer_norm_eps=float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
            select_layer=select,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: bad clip.vision metadata ({err})") from None
    return vision, ProjectorConfig(LLAMACPP_PROJECTORS[kind], vision.hidden_size, hidden_size)
