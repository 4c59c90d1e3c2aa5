"""MobileVLM projectors in NumPy float32: LDP (`ldpnet`, V1) and LDPv2 (`ldpnetv2`, V2), 576 -> 144 tokens.

Follows mobilevlm.md sections 3.2, 3.3 and 5 (the official LDPNetProjector / LDPNetV2Projector built from
torchvision's InvertedResidual and SqueezeExcitation). Weight names are the checkpoint's, after `model.mm_projector.`.

The feature map is kept channels-last, [G, G, D] with F[row, col] = token row * G + col: the same numbers as the
reference's [D, G, G] (F[c, r, k] = Y[r * G + k, c]) but LayerNorm over channels and the pointwise conv then act on
the contiguous last axis. G = sqrt(P) is the grid side (24 for P = 576).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from tinyvlm.config import ProjectorConfig
from tinyvlm.errors import ConfigError
from tinyvlm.backend import gelu_
from tinyvlm.kernels import depthwise3x3, hardsigmoid, hardswish, layer_norm
from tinyvlm.weights.checked import read_checked

LN_EPS = 1e-5  # timm LayerNormAct2d default, used by both LDP blocks

# ----------------------------------------------------------------------------------------------------------------
# Building blocks on channels-last maps [G, G, D]


def _grid_side(features: np.ndarray, c_in: int) -> int:
    P = features.shape[0] if features.ndim == 2 else -1
    G = math.isqrt(max(P, 0))
    if features.ndim != 2 or features.shape[1] != c_in or G * G != P or G % 2 or G == 0:
        raise ValueError(
            f"projector input has shape {features.shape}; expected (P, {c_in}) with P the square of an even side (576)"
        )
    return G


def _conv1x1(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, :, 0, 0])  # (out, in, 1, 1) -> (out, in)


def _dw_kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))  # (D, 1, 3, 3) -> (3, 3, D)


def _mlp(features: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    h = gelu_(np.asarray(features, dtype=np.float32) @ w1.T + b1)  # (P, C) -> (P, D), activated in place
    return h @ w2.T + b2  # (P, D) -> (P, D)


# ----------------------------------------------------------------------------------------------------------------
# LDP v1


class _InvertedResidual:
    """torchvision InvertedResidual with expand == in: dw3x3 + LN + hardswish, SE, pw1x1 + LN (mobilevlm.md 5.1)."""

    def __init__(self, w: dict[str, np.ndarray], prefix: str, stride: int) -> None:
        p = prefix + "block."
        self.stride = stride
        self.dw = _dw_kernel(w[p + "0.0.weight"])  # (3, 3, D)
        self.ln1 = (w[p + "0.1.weight"], w[p + "0.1.bias"])
        self.fc1, self.fc1_b = _conv1x1(w[p + "1.fc1.weight"]), w[p + "1.fc1.bias"]  # (S, D), (S,)
        self.fc2, self.fc2_b = _conv1x1(w[p + "1.fc2.weight"]), w[p + "1.fc2.bias"]  # (D, S), (D,)
        self.pw = _conv1x1(w[p + "2.0.weight"])  # (D, D)
        self.ln2 = (w[p + "2.1.weight"], w[p + "2.1.bias"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = depthwise3x3(x, self.dw, self.stride)  # (G, G, D) -> (G/stride, G/stride, D)
        h = hardswish(layer_norm(h, *self.ln1, LN_EPS))  # LayerNorm over channels
        s = h.mean(axis=(0, 1))  # squeeze: (g, g, D) -> (D,)
        s = np.maximum(self.fc1 @ s + self.fc1_b, 0.0)  # (D,) -> (S,)
        s = hardsigmoid(self.fc2 @ s + self.fc2_b)  # (S,) -> (D,)
        g, D = h.shape[0], h.shape[2]
        h = ((h * s).reshape(g * g, D) @ self.pw.T).reshape(g, g, D)  # pointwise conv: a matmul over channels
        h = layer_norm(h, *self.ln2, LN_EPS)
        return x + h if self.stride == 1 else h  # residual only where shapes match (block 1)


class LDPProjector:
    """LDP v1: MLP (C -> D, GELU, D -> D), then inverted-residual blocks at stride 1 and 2: [P, C] -> [P/4, D]."""

    def __init__(self, cfg: ProjectorConfig, w: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.mlp = [w[f"model.mlp.{i}.{p}"] for i in (1, 3) for p in ("weight", "bias")]
        self.block1 = _InvertedResidual(w, "model.mb_block.1.", stride=1)
        self.block2 = _InvertedResidual(w, "model.mb_block.2.", stride=2)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        G = _grid_side(features, self.cfg.mm_hidden_size)
        y = _mlp(features, *self.mlp)  # (P, C) -> (P, D)
        x = y.reshape(G, G, -1)  # token row * G + col -> (G, G, D)
        x = self.block2(self.block1(x))  # (G, G, D) -> (G/2, G/2, D)
        return x.reshape(-1, x.shape[2])  # row-major flatten -> (N, D)


# ----------------------------------------------------------------------------------------------------------------
# LDP v2


class LDPv2Projector:
    """LDPv2: MLP (C -> D, GELU, D -> D), 2x2 average pool, PEG (depthwise 3x3 with bias, plus residual)."""

    def __init__(self, cfg: ProjectorConfig, w: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.mlp = [w[f"mlp.mlp.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")]
        self.peg, self.peg_b = _dw_kernel(w["peg.peg.0.weight"]), w["peg.peg.0.bias"]  # (3, 3, D), (D,)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        G = _grid_side(features, self.cfg.mm_hidden_size)
        y = _mlp(features, *self.mlp)  # (P, C) -> (P, D)
        x = y.reshape(G // 2, 2, G // 2, 2, -1).mean(axis=(1, 3))  # AdaptiveAvgPool to G/2: -> (G/2, G/2, D)
        x = x + (depthwise3x3(x, self.peg, stride=1) + self.peg_b)  # PEG adds the pooled map itself
        return x.reshape(-1, x.shape[2])  # row-major flatten -> (N, D)


Projector = LDPProjector | LDPv2Projector


# ----------------------------------------------------------------------------------------------------------------
# Layout and construction


def se_width(d: int) -> int:
    """torchvision _make_divisible(d // 4, 8): the SE squeeze width S (512 for D = 2048, 640 for 2560)."""
    v = d // 4
    s = max(8, int(v + 4) // 8 * 8)
    return s + 8 if s < 0.9 * v else s


def projector_expected_shapes(cfg: ProjectorConfig) -> dict[str, tuple[int, ...]]:
    """Every projector tensor, named relative to `model.mm_projector.`, with its shape."""
    C, D = cfg.mm_hidden_size, cfg.hidden_size
    if cfg.projector_type == "ldpnetv2":
        return {"mlp.mlp.0.weight": (D, C), "mlp.mlp.0.bias": (D,), "mlp.mlp.2.weight": (D, D),
                "mlp.mlp.2.bias": (D,), "peg.peg.0.weight": (D, 1, 3, 3), "peg.peg.0.bias": (D,)}
    if cfg.projector_type != "ldpnet":
        raise ConfigError(f"unknown projector type {cfg.projector_type!r}; expected 'ldpnet' or 'ldpnetv2'")
    S = se_width(D)
    shapes = {"model.mlp.1.weight": (D, C), "model.mlp.1.bias": (D,),
              "model.mlp.3.weight": (D, D), "model.mlp.3.bias": (D,)}
    for k in (1, 2):
        p = f"model.mb_block.{k}.block."
        shapes.update({
            p + "0.0.weight": (D, 1, 3, 3), p + "0.1.weight": (D,), p + "0.1.bias": (D,),
            p + "1.fc1.weight": (S, D, 1, 1), p + "1.fc1.bias": (S,),
            p + "1.fc2.weight": (D, S, 1, 1), p + "1.fc2.bias": (D,),
            p + "2.0.weight": (D, D, 1, 1), p + "2.1.weight": (D,), p + "2.1.bias": (D,),
        })
    return shapes


def build_projector(cfg: ProjectorConfig, weights: Mapping[str, np.ndarray]) -> Projector:
    """The projector for cfg.projector_type, after checking every tensor's presence and shape."""
    w = read_checked(weights, projector_expected_shapes(cfg), f"{cfg.projector_type} projector")
    if cfg.projector_type == "ldpnetv2":
        return LDPv2Projector(cfg, w)
    return LDPProjector(cfg, w)
