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
    ({"mm_projector_type": "ldpnet", "vision_tower_type": "siglip"}, "vision_tower_type is 'siglip'; expected one "
                                                                      "of 'clip'"),
    ({"hidden_size": None}, "missing key 'hidden_size'"),
    ({"num_attention_heads": 16, "num_key_value_heads": 3}, "not a multiple of"),
])
def test_bad_configs(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**TEXT, **change}))
    with pytest.raises(ConfigError, match="missing key 'vocab_size'"):
        load_config(write(tmp_path, {k: v for k, v in TEXT.items() if k != "vocab_size"}))


def test_clip_config_json() -> None:
    nested = {"vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "image_size": 336}}
    assert vision_config_from_dict(nested, Path("c.json"), -2, "patch") == VisionConfig()
    small = {"hidden_size": 64, "num_attention_heads": 2}
    assert vision_config_from_dict(small, Path("c.json"), -1, "cls_patch").hidden_size == 64


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


V2 = {**TEXT, "mm_projector_type": "ldpnetv2", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, r"num_attention_heads is 0; expected an integer from 1 to 1048576"),
    ({"num_hidden_layers": 2**64}, r"num_hidden_layers is 18446744073709551616; expected an integer from 1 to 4096"),
    ({"max_position_embeddings": 1e30}, r"max_position_embeddings is 1e\+30; expected an integer"),
    ({"max_position_embeddings": 2**40}, r"max_position_embeddings is 1099511627776; expected .* to 16777216"),
    ({"hidden_size": [2048]}, r"hidden_size is \[2048\]; expected an integer"),
    ({"hidden_size": 2048.0}, r"hidden_size is 2048.0; expected an integer"),
    ({"vocab_size": True}, r"vocab_size is True; expected an integer"),
    ({"rms_norm_eps": float("nan")}, r"rms_norm_eps is nan; expected a finite number in \(0, 1\]"),
    ({"rope_theta": 0}, r"rope_theta is 0; expected a finite number in \(0, 1e\+12\]"),
    ({"bos_token_id": float("inf")}, r"bos_token_id is inf; expected an integer"),
    ({"eos_token_id": []}, r"eos_token_id is \[\]; expected an integer"),
    ({"eos_token_id": 32000}, r"eos_token_id 32000 is not a token id \(vocab_size 32000\)"),
    ({"tie_word_embeddings": "yes"}, r"tie_word_embeddings is 'yes'; expected true or false"),
    ({"hidden_size": 2047}, r"hidden_size 2047 is not a multiple of num_attention_heads 16"),
    ({"head_dim": 127}, r"the head size 127 is odd"),
    ({**V2, "mm_hidden_size": [1]}, r"mm_hidden_size is \[1\]; expected an integer"),
    ({**V2, "mm_vision_select_layer": []}, r"mm_vision_select_layer is \[\]; expected an integer"),
    ({**V2, "mm_vision_select_layer": float("inf")}, r"mm_vision_select_layer is inf; expected an integer"),
    ({**V2, "mm_vision_tower": 5}, r"mm_vision_tower is 5; expected a string"),
    ({**V2, "mm_projector_type": ["ldpnetv2"]}, r"mm_projector_type is \['ldpnetv2'\]; expected a string"),
    ({**V2, "mm_vision_select_feature": "all"}, r"mm_vision_select_feature is 'all'; expected one of 'patch'"),
])
def test_config_json_values_are_checked(tmp_path: Path, change: dict, message: str) -> None:
    """Every key read from config.json has a type and a range, checked where it is read: one ConfigError naming
    the file, the key and the value (json.dumps writes NaN and Infinity as Python's json reads them)."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, {**TEXT, **change}))
    assert str(tmp_path / "config.json") in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('{"hidden_size": ' + "9" * 5000 + "}", "an integer of 5000 digits"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
    ("[1]", "expected a JSON object"),
])
def test_config_json_hostile_documents(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"vision_config": 5}, "vision_config is 5; expected an object"),
    ({"patch_size": 0}, "patch_size is 0; expected an integer from 1"),
    ({"num_attention_heads": 3}, "vision hidden_size 1024 is not a multiple of num_attention_heads 3"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'; expected one of 'quick_gelu'"),
    ({"image_size": 7}, "patch_size 14 does not fit image_size 7"),
])
def test_clip_config_values_are_checked(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        vision_config_from_dict(change, Path("clip/config.json"), -2, "patch")
    with pytest.raises(ConfigError, match="mm_vision_select_layer 25 is not a hidden state of a 24-layer tower"):
        vision_config_from_dict({}, Path("clip/config.json"), 25, "patch")


def test_sizes_that_would_allocate_without_bound_are_refused() -> None:
    """Found by review: a tower of 160,000 patches (attention is P x P), heads far wider than the model (the KV cache
    is sized by them), and a tower that does not fit the projector (it fails only at the first image)."""
    from tinyvlm.config import ModelConfig, check_fit

    with pytest.raises(ConfigError, match="160000 patches of an image .400 / 1 squared.; the limit is 4096"):
        VisionConfig(hidden_size=32, num_attention_heads=1, image_size=400, patch_size=1)
    with pytest.raises(ConfigError, match="1 heads of 1048576 are more than 4 times hidden_size 2"):
        TextConfig(hidden_size=2, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                   intermediate_size=2, vocab_size=8, max_position_embeddings=8, head_dim=2**20)
    text = TextConfig(**{k: TEXT[k] for k in TEXT}, num_key_value_heads=16)
    odd = VisionConfig(image_size=42, patch_size=14)  # a 3 x 3 grid
    with pytest.raises(ConfigError, match="gives a 3 x 3 grid"):
        ModelConfig(text, odd, ProjectorConfig("ldpnetv2", 1024, 2048))
    with pytest.raises(ConfigError, match="select_feature 'cls_patch'"):
        check_fit(VisionConfig(select_feature="cls_patch"), ProjectorConfig("ldpnet", 1024, 2048))
    with pytest.raises(ConfigError, match="mm_hidden_size 512 is not the vision tower's width 1024"):
        check_fit(VisionConfig(), ProjectorConfig("ldpnet", 512, 2048))
