"""Configs from GGUF metadata: a LLaMA LLM file's `llama.*` keys, and llama.cpp's mmproj file's `clip.*` keys."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.config import (CLIP_MEAN, CLIP_STD, ProjectorConfig, TextConfig, VisionConfig, check_fit, int_in, is_flag,
                            real_in)
from tinyvlm.errors import ConfigError
from tinyvlm.limits import (MAX_CONTEXT, MAX_LAYERS, MAX_ROPE_BASE, MAX_VOCAB, MAX_WIDTH, REQUIRED, Check, choices,
                            integer, read_table, short)
from tinyvlm.weights.checked import check_layer_count

# Every GGUF key read for the LLM (gguf-py Keys.LLM / Keys.Attention / Keys.Rope, under "{arch}."): TextConfig
# field -> (key, check, default; None: derived from other keys).
_TEXT_KEYS = {
    "hidden_size": ("embedding_length", int_in(1, MAX_WIDTH), REQUIRED),
    "num_hidden_layers": ("block_count", int_in(1, MAX_LAYERS), REQUIRED),
    "num_attention_heads": ("attention.head_count", int_in(1, MAX_WIDTH), REQUIRED),
    "num_key_value_heads": ("attention.head_count_kv", int_in(1, MAX_WIDTH), None),
    "intermediate_size": ("feed_forward_length", int_in(1, MAX_WIDTH), REQUIRED),
    "max_position_embeddings": ("context_length", int_in(1, MAX_CONTEXT), REQUIRED),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon", real_in(0, 1), 1e-6),
    "rope_theta": ("rope.freq_base", real_in(0, MAX_ROPE_BASE), 10000.0),
    "head_dim": ("attention.key_length", int_in(1, MAX_WIDTH), None),
    "vocab_size": ("vocab_size", int_in(1, MAX_VOCAB), None),  # when there is no tokenizer.ggml.tokens
}
_TOKEN_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}


def _read_fields(metadata: Mapping[str, Any], table: Mapping[str, tuple[str, Check, Any]], where: str) -> dict:
    """{field: checked value} for a table of field -> (GGUF key, check, default)."""
    read = read_table(metadata, {key: (check, default) for key, check, default in table.values()}, where, ConfigError)
    return {field: read[key] for field, (key, _, _) in table.items()}


def text_config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str]) -> TextConfig:
    """TextConfig of a LLaMA GGUF file from its metadata; tied embeddings when it has no output.weight.

    The vocabulary size is the length of tokenizer.ggml.tokens ({arch}.vocab_size when there is no vocabulary).
    The layer count must match the layers whose tensors the file holds (blk.0 ... blk.N-1).
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF general.architecture is {short(arch)}; tinyvlm reads 'llama' models only")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"GGUF {arch}.rope.scaling.type is {short(scaling)}; tinyvlm supports plain RoPE only")
    table = {field: (f"{arch}.{key}", check, default) for field, (key, check, default) in _TEXT_KEYS.items()}
    values = _read_fields(metadata, table, "GGUF metadata")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else values["vocab_size"]
    if vocab is None:
        raise ConfigError(f"GGUF metadata has neither tokenizer.ggml.tokens nor {arch}.vocab_size")
    names = set(tensor_names)
    check_layer_count(names, r"blk\.([^.]+)\.", values["num_hidden_layers"], f"{arch}.block_count", "GGUF metadata")
    for field, key in _TOKEN_KEYS.items():
        values[field] = integer(metadata.get(key, 1 if field == "bos_token_id" else 2), f"GGUF {key}", ConfigError,
                                0, vocab - 1)
    values["num_key_value_heads"] = values["num_key_value_heads"] or values["num_attention_heads"]
    values["head_dim"] = values["head_dim"] or 0
    return TextConfig(**{**values, "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in names})


# llama.cpp's clip.projector_type -> tinyvlm's projector type.
LLAMACPP_PROJECTORS = {"ldp": "ldpnet", "ldpv2": "ldpnetv2"}


# Every key read from an mmproj file: VisionConfig field -> (key, check, default).
_CLIP_KEYS = {
    "hidden_size": ("clip.vision.embedding_length", int_in(1, MAX_WIDTH), REQUIRED),
    "num_hidden_layers": ("clip.vision.block_count", int_in(1, MAX_LAYERS), REQUIRED),
    "num_attention_heads": ("clip.vision.attention.head_count", int_in(1, MAX_WIDTH), REQUIRED),
    "intermediate_size": ("clip.vision.feed_forward_length", int_in(1, MAX_WIDTH), REQUIRED),
    "image_size": ("clip.vision.image_size", int_in(1, MAX_WIDTH), REQUIRED),
    "patch_size": ("clip.vision.patch_size", int_in(1, MAX_WIDTH), REQUIRED),
    "layer_norm_eps": ("clip.vision.attention.layer_norm_epsilon", real_in(0, 1), 1e-5),
}
_MMPROJ_KEYS = {
    "clip.projector_type": (choices(tuple(LLAMACPP_PROJECTORS), ConfigError), REQUIRED),
    "clip.use_gelu": (is_flag, False),
    "clip.vision.image_mean": (lambda v, what: _floats(v, what, CLIP_MEAN), None),
    "clip.vision.image_std": (lambda v, what: _floats(v, what, CLIP_STD), None),
    "clip.vision.feature_layer": (lambda v, what: _floats(v, what, None), None),
}


def _floats(value: object, what: str, expected: np.ndarray | None) -> list[int | float]:
    """A list of numbers; equal to `expected` (within 1e-6) when given."""
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in value):
        raise ConfigError(f"{what} is {short(value)}; expected a list of numbers")
    if expected is not None and (len(value) != len(expected) or not np.allclose(value, expected, atol=1e-6)):
        raise ConfigError(f"{what} is {short(value)}; tinyvlm normalises with OpenAI CLIP's {expected.tolist()}")
    return value


def vision_configs_from_mmproj(meta: Mapping[str, Any], hidden_size: int,
                               path: Path) -> tuple[VisionConfig, ProjectorConfig]:
    """The CLIP tower's and the projector's configs of llama.cpp's mmproj file, for an LLM of width `hidden_size`.

    A LLaVA-style file stores the layers that produce hidden_states[-2] (block_count = 23 for ViT-L), and they all
    run; a file that names its feature layer (`clip.vision.feature_layer`) runs up to that hidden state.
    """
    where = f"{path}: mmproj metadata"
    mm = read_table(meta, _MMPROJ_KEYS, where, ConfigError)
    if mm["clip.use_gelu"]:
        raise ConfigError(f"{path}: clip.use_gelu is true; tinyvlm's CLIP tower uses quick_gelu (as ViT-L/14 does)")
    values = _read_fields(meta, _CLIP_KEYS, where)
    stored = values["num_hidden_layers"]
    feature_layer = mm["clip.vision.feature_layer"]
    if feature_layer is None:  # LLaVA-style file: the stored layers are exactly the ones that run
        values.update(num_hidden_layers=stored + 1, select_layer=-2)
    elif len(feature_layer) == 1 and isinstance(feature_layer[0], int):
        values["select_layer"] = feature_layer[0]
    else:
        raise ConfigError(f"{path}: clip.vision.feature_layer is {short(feature_layer)}; expected a single layer")
    try:
        vision = VisionConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    projector = ProjectorConfig(LLAMACPP_PROJECTORS[mm["clip.projector_type"]], vision.hidden_size, hidden_size)
    try:
        check_fit(vision, projector)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return vision, projector
