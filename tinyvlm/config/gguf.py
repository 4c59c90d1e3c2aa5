"""Configs from GGUF metadata: a LLaMA LLM file's `llama.*` keys, and llama.cpp's mmproj file's `clip.*` keys."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.config import CLIP_MEAN, CLIP_STD, ProjectorConfig, TextConfig, VisionConfig
from tinyvlm.errors import ConfigError

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
