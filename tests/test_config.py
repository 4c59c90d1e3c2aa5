"""tinyvlm.config: every *Config, from config.json, from a vision tower's shapes, and (tests/test_weights_gguf.py,
tests/test_loading_gguf.py) from GGUF metadata."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tinyvlm.config import GenerationConfig, ProjectorConfig, TextConfig, VisionConfig
from tinyvlm.config.hf import KNOWN_CLIP, load_config, vision_config_from_dict, vision_config_from_shapes
from tinyvlm.errors import ConfigError, PromptError
from tinyvlm.vision import vision_expected_shapes

BACKEND_FREE = True

TEXT = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 5632,
        "vocab_size": 32000, "max_position_embeddings": 2048}


def write(tmp_path: Path, cfg: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_text_only_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {**TEXT, "n_head": 1, "eos_token_id": [2, 7], "tie_word_embeddings": True}))
    assert cfg.projector is None and not cfg.is_multimodal
    t = cfg.text
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (16, 16, 128)  # n_head ignored
    assert t.eos_token_id == 2 and t.tie_word_embeddings and t.rope_theta == 10000.0


def test_mobilevlm_v2_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {**TEXT, "mm_projector_type": "ldpnetv2", "mm_hidden_size": 1024,
                                       "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    assert cfg.projector == ProjectorConfig("ldpnetv2", 1024, 2048)
    assert cfg.mm_vision_tower == "openai/clip-vit-large-patch14-336" and cfg.image_aspect_ratio == "pad"
    assert load_config(write(tmp_path, {**TEXT, "mm_projector_type": "ldpnet"})).projector.projector_type == "ldpnet"


@pytest.mark.parametrize("change, message", [
    ({"mm_projector_type": "mlp2x_gelu"}, "unknown mm_projector_type 'mlp2x_gelu'"),
    ({"mm_projector_type": "ldpnet", "vision_tower_type": "siglip"}, "unsupported vision_tower_type 'siglip'"),
    ({"hidden_size": None}, "bad value"),
    ({"num_attention_heads": 16, "num_key_value_heads": 3}, "not a multiple of"),
])
def test_bad_configs(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**TEXT, **change}))
    with pytest.raises(ConfigError, match="missing key 'vocab_size'"):
        load_config(write(tmp_path, {k: v for k, v in TEXT.items() if k != "vocab_size"}))


def test_clip_config_json() -> None:
    nested = {"vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "image_size": 336}}
    assert vision_config_from_dict(nested, -2, "patch") == VisionConfig()
    assert vision_config_from_dict({"hidden_size": 64, "num_attention_heads": 2}, -1, "cls_patch").hidden_size == 64


def test_vision_config_from_shapes_uses_the_known_clip() -> None:
    shapes = vision_expected_shapes(VisionConfig(num_attention_heads=4))  # head count is not in the shapes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the known tower: no warning
        cfg = vision_config_from_shapes(shapes, "openai/clip-vit-large-patch14-336", select_layer=-1,
                                        select_feature="cls_patch")
    assert cfg == VisionConfig(select_layer=-1, select_feature="cls_patch")  # 16 heads, from KNOWN_CLIP
    assert KNOWN_CLIP["openai/clip-vit-large-patch14-336"].num_attention_heads == 16


@pytest.mark.parametrize("tower", ["someone/other-clip", None, "openai/clip-vit-large-patch14"])
def test_vision_config_from_shapes_warns_when_it_guesses(tower: str | None) -> None:
    """An unknown tower, or a known id whose shapes disagree (224 px here against 336), gets 64-wide heads and
    a warning that says so."""
    shapes = vision_expected_shapes(VisionConfig(hidden_size=128, num_attention_heads=1, intermediate_size=256,
                                                 num_hidden_layers=3))
    with pytest.warns(UserWarning, match=r"assuming 64-wide heads \(2 heads for width 128\)"):
        cfg = vision_config_from_shapes(shapes, tower)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 2, 3, 256)
    with pytest.raises(ConfigError, match="class_embedding"):
        vision_config_from_shapes({}, tower)


def test_generation_config_is_checked_when_made() -> None:
    assert GenerationConfig().max_new_tokens == 256
    with pytest.raises(PromptError, match="top_p must be in"):
        GenerationConfig(top_p=0.0)


def test_text_config_head_dim() -> None:
    assert TextConfig(576, 30, 9, 3, 1536, 49152, 2048).head_dim == 64
    assert TextConfig(576, 30, 9, 3, 1536, 49152, 2048, head_dim=32).head_dim == 32
