"""tinyvlm.vision against transformers' CLIPVisionModel (float32, random weights, eager attention).

Tiny tower with the real geometry (336 px, patch 14: 576 patches + CLS) but narrow: hidden 128, 2 heads of 64,
MLP 256, 3 layers. initializer_range 0.08 keeps activations O(1), so the comparison is not trivially small.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from tinyvlm.backends import Backend
from tinyvlm.config import VisionConfig
from tinyvlm.errors import ConfigError, ImageError, WeightsError
from tinyvlm.vision import VisionTower, vision_expected_shapes, vision_needed_names

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

REL_TOL = 1e-4  # max |ours - ref| / max |ref|; measured about 8e-7
Clip = tuple["CLIPVisionConfig", dict[str, np.ndarray], np.ndarray, tuple[np.ndarray, ...]]


@pytest.fixture(scope="module")
def clip() -> Clip:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf_cfg = CLIPVisionConfig(
        hidden_size=128, num_attention_heads=2, intermediate_size=256, num_hidden_layers=3,
        image_size=336, patch_size=14, initializer_range=0.08, initializer_factor=1.0,
        attn_implementation="eager",
    )
    model = CLIPVisionModel(hf_cfg).eval()
    with torch.no_grad():  # default LayerNorm init is (1, 0): perturb it so a swapped weight/bias would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    # transformers 5.x drops the `vision_model.` prefix from CLIPVisionModel's state_dict (and save_pretrained);
    # the published checkpoints (and tinyvlm) keep it.
    weights = {"vision_model." + k: v.detach().numpy() for k, v in model.state_dict().items()}
    pixels = np.random.default_rng(0).standard_normal((3, 336, 336)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels)[None], output_hidden_states=True)
    hidden = tuple(h[0].numpy() for h in out.hidden_states)
    return hf_cfg, weights, pixels, hidden


def ours_config(hf_cfg: CLIPVisionConfig, select_layer: int = -2, select_feature: str = "patch") -> VisionConfig:
    return VisionConfig(
        hidden_size=hf_cfg.hidden_size, num_hidden_layers=hf_cfg.num_hidden_layers,
        num_attention_heads=hf_cfg.num_attention_heads, intermediate_size=hf_cfg.intermediate_size,
        image_size=hf_cfg.image_size, patch_size=hf_cfg.patch_size, layer_norm_eps=hf_cfg.layer_norm_eps,
        hidden_act=hf_cfg.hidden_act, select_layer=select_layer, select_feature=select_feature,
    )


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_select_layer_minus_2_patch(clip: Clip, backend: Backend) -> None:
    hf_cfg, weights, pixels, hidden = clip
    tower = VisionTower(ours_config(hf_cfg), weights, backend)
    assert len(tower.layers) == 2  # 3 layers, the last never runs
    feats = tower.features(pixels)
    assert feats.shape == (576, 128) and feats.dtype == np.float32
    ref = hidden[-2][1:]
    assert np.abs(ref).max() > 1.0
    assert rel_err(feats, ref) <= REL_TOL


def test_select_layer_minus_1_and_cls_patch(clip: Clip, backend: Backend) -> None:
    hf_cfg, weights, pixels, hidden = clip
    feats = VisionTower(ours_config(hf_cfg, -1, "cls_patch"), weights, backend).features(pixels)
    assert feats.shape == (577, 128)
    assert rel_err(feats, hidden[-1]) <= REL_TOL
    assert rel_err(VisionTower(ours_config(hf_cfg, -1), weights, backend).features(pixels), hidden[-1][1:]) <= REL_TOL


def test_embeddings(clip: Clip, backend: Backend) -> None:
    hf_cfg, weights, pixels, hidden = clip
    assert rel_err(VisionTower(ours_config(hf_cfg), weights, backend).embed(pixels), hidden[0]) <= REL_TOL


def test_reads_only_needed_layers(clip: Clip, backend: Backend) -> None:
    hf_cfg, weights, pixels, hidden = clip
    cfg = ours_config(hf_cfg)
    needed = vision_needed_names(cfg)
    assert not any(".layers.2." in n for n in needed)
    assert "vision_model.post_layernorm.weight" not in needed
    subset = {n: weights[n] for n in needed}
    assert rel_err(VisionTower(cfg, subset, backend).features(pixels), hidden[-2][1:]) <= REL_TOL


def test_expected_shapes_match_transformers(clip: Clip) -> None:
    hf_cfg, weights, _, _ = clip
    published = {k: tuple(v.shape) for k, v in weights.items() if not k.endswith("position_ids")}
    assert vision_expected_shapes(ours_config(hf_cfg)) == published


def test_expected_shapes_vit_l() -> None:
    shapes = vision_expected_shapes(VisionConfig())
    assert len(shapes) == 5 + 24 * 16 + 2
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (577, 1024)
    assert shapes["vision_model.encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert len(vision_needed_names(VisionConfig())) == 5 + 23 * 16


def test_bad_inputs(clip: Clip, backend: Backend) -> None:
    hf_cfg, weights, pixels, _ = clip
    cfg = ours_config(hf_cfg)
    tower = VisionTower(cfg, weights, backend)
    with pytest.raises(ImageError, match=r"\(3, 224, 224\).*\(3, 336, 336\)"):
        tower.features(np.zeros((3, 224, 224), np.float32))
    with pytest.raises(ImageError, match="expected"):
        tower.features(pixels[None])
    broken = dict(weights)
    del broken["vision_model.encoder.layers.1.mlp.fc2.bias"]
    broken["vision_model.pre_layrnorm.weight"] = np.zeros(64, np.float32)
    with pytest.raises(WeightsError, match=r"missing \(1\): .*layers\.1\.mlp\.fc2\.bias.*pre_layrnorm\.weight \(file \[64\]"):
        VisionTower(cfg, broken, backend)
    with pytest.raises(ConfigError, match="select_feature"):
        VisionTower(ours_config(hf_cfg, select_feature="cls"), weights, backend)
