"""CLIP ViT vision tower in NumPy float32 (MobileVLM uses openai/clip-vit-large-patch14-336).

Follows mobilevlm.md sections 3.4, 4.2 and 4.3, i.e. transformers' CLIPVisionModel: patch conv (no bias), CLS token,
learned positions, `pre_layrnorm`, pre-LN encoder layers (MHA with biases and no mask, quick_gelu MLP), then
`hidden_states[select_layer]` without `post_layernorm`, CLS dropped for `select_feature = "patch"`. Only the layers
that produce the selected hidden state are read and run (23 of 24 for select_layer -2).
Weight names are the checkpoint's own, relative to the tower (`vision_model.…`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from tinyvlm.config import VisionConfig
from tinyvlm.errors import ConfigError, WeightsError
from tinyvlm.backend import layer_norm, quick_gelu_, softmax_
from tinyvlm.weights.checked import read_checked

_EMB = "vision_model.embeddings."
_LAYER = "vision_model.encoder.layers.{j}."
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_NORMS = ("layer_norm1", "layer_norm2")
OPENAI_HEAD_DIM = 64  # every OpenAI CLIP ViT uses 64-wide heads


# ----------------------------------------------------------------------------------------------------------------
# Layout: names and shapes


def _layer_shapes(cfg: VisionConfig, j: int) -> dict[str, tuple[int, ...]]:
    C, F = cfg.hidden_size, cfg.intermediate_size
    out_in = {"self_attn.q_proj": (C, C), "self_attn.k_proj": (C, C), "self_attn.v_proj": (C, C),
              "self_attn.out_proj": (C, C), "mlp.fc1": (F, C), "mlp.fc2": (C, F)}
    prefix = _LAYER.format(j=j)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in _NORMS:
        shapes[f"{prefix}{name}.weight"] = (C,)
        shapes[f"{prefix}{name}.bias"] = (C,)
    for name, (n_out, n_in) in out_in.items():
        shapes[f"{prefix}{name}.weight"] = (n_out, n_in)
        shapes[f"{prefix}{name}.bias"] = (n_out,)
    return shapes


def _stem_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    C, p = cfg.hidden_size, cfg.patch_size
    return {
        _EMB + "class_embedding": (C,),
        _EMB + "patch_embedding.weight": (C, 3, p, p),
        _EMB + "position_embedding.weight": (cfg.num_patches + 1, C),
        "vision_model.pre_layrnorm.weight": (C,),
        "vision_model.pre_layrnorm.bias": (C,),
    }


def vision_expected_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published CLIP vision layout (all layers, post_layernorm; not position_ids)."""
    shapes = _stem_shapes(cfg)
    for j in range(cfg.num_hidden_layers):
        shapes.update(_layer_shapes(cfg, j))
    shapes["vision_model.post_layernorm.weight"] = (cfg.hidden_size,)
    shapes["vision_model.post_layernorm.bias"] = (cfg.hidden_size,)
    return shapes


def _needed_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    shapes = _stem_shapes(cfg)
    for j in range(cfg.layers_to_run):
        shapes.update(_layer_shapes(cfg, j))
    return shapes


def vision_needed_names(cfg: VisionConfig) -> set[str]:
    """The tensors VisionTower actually reads: the stem and the layers that run."""
    return set(_needed_shapes(cfg))


def infer_vision_config(
    shapes: Mapping[str, tuple[int, ...]], select_layer: int = -2, select_feature: str = "patch"
) -> VisionConfig:
    """Rebuild the VisionConfig from tensor shapes alone (V2 checkpoints carry the tower but not its config)."""
    needed = [_EMB + "class_embedding", _EMB + "patch_embedding.weight", _EMB + "position_embedding.weight",
              _LAYER.format(j=0) + "mlp.fc1.weight"]
    missing = [n for n in needed if n not in shapes]
    if missing:
        raise WeightsError(f"cannot infer the CLIP vision config: missing tensors {', '.join(missing)}")
    C = int(shapes[_EMB + "class_embedding"][0])
    patch = int(shapes[_EMB + "patch_embedding.weight"][-1])
    positions = int(shapes[_EMB + "position_embedding.weight"][0])
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise WeightsError(f"position_embedding has {positions} rows; expected 1 + a square number of patches")
    layer_ids = [int(m.group(1)) for n in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", n))]
    return VisionConfig(
        hidden_size=C,
        num_hidden_layers=max(layer_ids) + 1,
        num_attention_heads=C // OPENAI_HEAD_DIM,
        intermediate_size=int(shapes[_LAYER.format(j=0) + "mlp.fc1.weight"][0]),
        image_size=grid * patch,
        patch_size=patch,
        select_layer=select_layer,
        select_feature=select_feature,
    )


# ----------------------------------------------------------------------------------------------------------------
# Forward


class _Layer:
    """One pre-LN encoder layer's weights (float32, checkpoint layout: linear weights are [out, in])."""

    def __init__(self, w: dict[str, np.ndarray], prefix: str) -> None:
        pair = {name: (w[f"{prefix}{name}.weight"], w[f"{prefix}{name}.bias"]) for name in _NORMS + _LINEARS}
        self.ln1, self.ln2 = pair["layer_norm1"], pair["layer_norm2"]
        self.q, self.k, self.v = pair["self_attn.q_proj"], pair["self_attn.k_proj"], pair["self_attn.v_proj"]
        self.o, self.fc1, self.fc2 = pair["self_attn.out_proj"], pair["mlp.fc1"], pair["mlp.fc2"]


def _linear(x: np.ndarray, wb: tuple[np.ndarray, np.ndarray], out: np.ndarray) -> np.ndarray:
    """out = x @ W.T + b on the [out, in] weight (as fast as a pre-transposed copy with OpenBLAS here)."""
    np.matmul(x, wb[0].T, out=out)
    out += wb[1]
    return out


class _Workspace:
    """The activations of one layer, allocated once per image and reused by all of its layers.

    Fresh arrays of this size (1-9 MB) come from the kernel page by page on first touch; on the reference VM
    those page faults cost as much as the elementwise ops themselves, and a workspace pays them once.
    """

    def __init__(self, T: int, C: int, F: int, H: int) -> None:
        self.h = np.empty((T, C), dtype=np.float32)  # LayerNorm output
        self.q = np.empty((T, C), dtype=np.float32)
        self.k = np.empty((T, C), dtype=np.float32)
        self.v = np.empty((T, C), dtype=np.float32)
        self.scores = np.empty((T, T), dtype=np.float32)  # one head's attention scores, then probabilities
        self.heads = np.empty((T, H, C // H), dtype=np.float32)  # attention output per head, token-major
        self.out = np.empty((T, C), dtype=np.float32)  # out_proj or fc2 output
        self.mlp = np.empty((T, F), dtype=np.float32)  # fc1 output, then its activation


class VisionTower:
    """CLIP ViT forward for one image: pixels [3, H, W] -> features [P, C] (or [P+1, C] for cls_patch)."""

    def __init__(self, cfg: VisionConfig, weights: Mapping[str, np.ndarray]) -> None:
        if cfg.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"mm_vision_select_feature {cfg.select_feature!r}; expected 'patch' or 'cls_patch'")
        self.cfg = cfg
        w = read_checked(weights, _needed_shapes(cfg), "vision tower")
        C, p = cfg.hidden_size, cfg.patch_size
        self.patch_w = w[_EMB + "patch_embedding.weight"].reshape(C, 3 * p * p)  # conv kernel as [C, 3*p*p]
        self.cls = w[_EMB + "class_embedding"]
        self.pos = w[_EMB + "position_embedding.weight"]
        self.pre_ln = (w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"])
        self.layers = [_Layer(w, _LAYER.format(j=j)) for j in range(cfg.layers_to_run)]

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Patch conv as a matmul, CLS, positions, pre_layrnorm: [3, H, W] -> hidden_states[0] [P+1, C]."""
        p, g = self.cfg.patch_size, self.cfg.image_size // self.cfg.patch_size
        patches = pixels.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4)  # (3, H, W) -> (g, g, 3, p, p)
        patches = patches.reshape(g * g, 3 * p * p)  # row-major: patch = row * g + col -> (P, 3*p*p)
        x = patches @ self.patch_w.T  # (P, 3*p*p) -> (P, C)
        x = np.concatenate([self.cls[None, :], x], axis=0) + self.pos  # (P, C) -> (P+1, C)
        return layer_norm(x, *self.pre_ln, self.cfg.layer_norm_eps, out=np.empty_like(x))

    def _attention(self, layer: _Layer, ws: _Workspace) -> np.ndarray:
        """Self-attention of the normalised tokens ws.h (T, C); returns out_proj's output, ws.out (T, C)."""
        T, C = ws.h.shape  # T = P+1 tokens
        H = self.cfg.num_attention_heads
        Dh = C // H
        q = _linear(ws.h, layer.q, ws.q).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, C) -> (H, T, Dh)
        q *= np.float32(Dh**-0.5)
        k = _linear(ws.h, layer.k, ws.k).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, C) -> (H, T, Dh)
        v = _linear(ws.h, layer.v, ws.v).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, C) -> (H, T, Dh)
        # One head at a time: its (T, T) scores stay in cache through the softmax and the second product
        # (7% faster than one batched (H, T, T) pass at ViT-L shapes, and 1.3 MB instead of 21 MB).
        for h in range(H):
            scores = np.matmul(q[h], k[h].T, out=ws.scores)  # (T, Dh) @ (Dh, T) -> (T, T), no mask
            np.matmul(softmax_(scores), v[h], out=ws.heads[:, h])  # (T, T) @ (T, Dh) -> (T, Dh), into (T, H, Dh)
        return _linear(ws.heads.reshape(T, C), layer.o, ws.out)

    def _layer(self, x: np.ndarray, layer: _Layer, ws: _Workspace) -> None:
        """One pre-LN encoder layer, updating the residual stream x (T, C) in place."""
        eps = self.cfg.layer_norm_eps
        layer_norm(x, *layer.ln1, eps, out=ws.h)
        x += self._attention(layer, ws)
        layer_norm(x, *layer.ln2, eps, out=ws.h)
        h = quick_gelu_(_linear(ws.h, layer.fc1, ws.mlp))  # (T, C) -> (T, F), activated in place
        x += _linear(h, layer.fc2, ws.out)  # (T, F) -> (T, C)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """hidden_states[select_layer] for one image, CLS dropped when select_feature is "patch"."""
        size = self.cfg.image_size
        if pixels.shape != (3, size, size):
            raise ValueError(f"pixels have shape {pixels.shape}; expected (3, {size}, {size})")
        x = self.embed(np.asarray(pixels, dtype=np.float32))  # (3, H, W) -> (P+1, C)
        if self.layers:
            F = self.layers[0].fc1[0].shape[0]  # intermediate size
            ws = _Workspace(x.shape[0], x.shape[1], F, self.cfg.num_attention_heads)
            for layer in self.layers:
                self._layer(x, layer, ws)
        return x[1:] if self.cfg.select_feature == "patch" else x  # (P+1, C) -> (P, C)
