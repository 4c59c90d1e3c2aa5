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

from tinyvlm.backends import Array, Backend
from tinyvlm.config import ProjectorConfig
from tinyvlm.errors import ConfigError
from tinyvlm.weights.checked import read_checked

LN_EPS = 1e-5  # timm LayerNormAct2d default, used by both LDP blocks

# ----------------------------------------------------------------------------------------------------------------
# Building blocks on channels-last maps [G, G, D]


def _grid_side(features: Array, c_in: int) -> int:
    P = features.shape[0] if features.ndim == 2 else -1
    G = math.isqrt(max(P, 0))
    if features.ndim != 2 or features.shape[1] != c_in or G * G != P or G % 2 or G == 0:
        raise ValueError(
            f"projector input has shape {features.shape}; expected (P, {c_in}) with P the square of an even side (576)"
        )
    return G


def _conv1x1(w: Array) -> Array:
    return w[:, :, 0, 0]  # (out, in, 1, 1) -> (out, in)


def _dw_kernel(w: Array) -> Array:
    return w[:, 0].transpose(1, 2, 0)  # (D, 1, 3, 3) -> (3, 3, D)


class _MLP:
    """Linear C -> D, exact GELU, linear D -> D: (P, C) -> (P, D)."""

    def __init__(self, w: Mapping[str, Array], prefix: str, first: int, backend: Backend) -> None:
        self.bk = backend
        self.w1, self.b1, self.w2, self.b2 = (backend.dense(w[f"{prefix}{i}.{p}"])
                                              for i in (first, first + 2) for p in ("weight", "bias"))

    def __call__(self, features: Array) -> Array:
        bk = self.bk
        h = bk.gelu_(bk.linear(bk.asarray(features), self.w1, self.b1))  # (P, C) -> (P, D), activated in place
        return bk.linear(h, self.w2, self.b2)  # (P, D) -> (P, D)


# ----------------------------------------------------------------------------------------------------------------
# LDP v1


class _InvertedResidual:
    """torchvision InvertedResidual with expand == in: dw3x3 + LN + hardswish, SE, pw1x1 + LN (mobilevlm.md 5.1)."""

    def __init__(self, w: Mapping[str, Array], prefix: str, stride: int, backend: Backend) -> None:
        p, dense = prefix + "block.", backend.dense
        self.bk, self.stride = backend, stride
        self.dw = dense(_dw_kernel(w[p + "0.0.weight"]))  # (3, 3, D)
        self.ln1 = (dense(w[p + "0.1.weight"]), dense(w[p + "0.1.bias"]))
        self.fc1, self.fc1_b = dense(_conv1x1(w[p + "1.fc1.weight"])), dense(w[p + "1.fc1.bias"])  # (S, D), (S,)
        self.fc2, self.fc2_b = dense(_conv1x1(w[p + "1.fc2.weight"])), dense(w[p + "1.fc2.bias"])  # (D, S), (D,)
        self.pw = dense(_conv1x1(w[p + "2.0.weight"]))  # (D, D)
        self.ln2 = (dense(w[p + "2.1.weight"]), dense(w[p + "2.1.bias"]))

    def __call__(self, x: Array) -> Array:
        bk = self.bk
        h = bk.depthwise3x3(x, self.dw, self.stride)  # (G, G, D) -> (g, g, D), g = G / stride
        h = bk.hardswish(bk.layer_norm(h, *self.ln1, LN_EPS))  # LayerNorm over channels
        s = h.mean(axis=(0, 1))  # squeeze: (g, g, D) -> (D,)
        s = bk.relu(bk.linear(s, self.fc1, self.fc1_b))  # (D,) -> (S,)
        s = bk.hardsigmoid(bk.linear(s, self.fc2, self.fc2_b))  # (S,) -> (D,)
        g, D = h.shape[0], h.shape[2]
        h = bk.linear((h * s).reshape(g * g, D), self.pw).reshape(g, g, D)  # pointwise conv: a matmul over channels
        h = bk.layer_norm(h, *self.ln2, LN_EPS)
        return x + h if self.stride == 1 else h  # residual only where shapes match (block 1)


class LDPProjector:
    """LDP v1: MLP (C -> D, GELU, D -> D), then inverted-residual blocks at stride 1 and 2: [P, C] -> [P/4, D]."""

    def __init__(self, cfg: ProjectorConfig, w: Mapping[str, Array], backend: Backend) -> None:
        self.cfg, self.bk = cfg, backend
        self.mlp = _MLP(w, "model.mlp.", 1, backend)
        self.block1 = _InvertedResidual(w, "model.mb_block.1.", 1, backend)
        self.block2 = _InvertedResidual(w, "model.mb_block.2.", 2, backend)

    def __call__(self, features: Array) -> Array:
        G = _grid_side(features, self.cfg.mm_hidden_size)
        self.bk.activate()
        x = self.mlp(features).reshape(G, G, -1)  # (P, C) -> (P, D), token row * G + col -> (G, G, D)
        x = self.block2(self.block1(x))  # (G, G, D) -> (G/2, G/2, D)
        return x.reshape(-1, x.shape[2])  # row-major flatten -> (N, D)


# ----------------------------------------------------------------------------------------------------------------
# LDP v2


class LDPv2Projector:
    """LDPv2: MLP (C -> D, GELU, D -> D), 2x2 average pool, PEG (depthwise 3x3 with bias, plus residual)."""

    def __init__(self, cfg: ProjectorConfig, w: Mapping[str, Array], backend: Backend) -> None:
        self.cfg, self.bk = cfg, backend
        self.mlp = _MLP(w, "mlp.mlp.", 0, backend)
        self.peg = backend.dense(_dw_kernel(w["peg.peg.0.weight"]))  # (3, 3, D)
        self.peg_b = backend.dense(w["peg.peg.0.bias"])  # (D,)

    def __call__(self, features: Array) -> Array:
        bk = self.bk
        G = _grid_side(features, self.cfg.mm_hidden_size)
        bk.activate()
        x = bk.avg_pool2x2(self.mlp(features).reshape(G, G, -1))  # (P, D) -> (G, G, D) -> (G/2, G/2, D)
        x = x + (bk.depthwise3x3(x, self.peg, stride=1) + self.peg_b)  # PEG adds the pooled map itself
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


def build_projector(cfg: ProjectorConfig, weights: Mapping[str, Array], backend: Backend) -> Projector:
    """The projector for cfg.projector_type, after checking every tensor's presence and shape."""
    w = read_checked(weights, projector_expected_shapes(cfg), f"{cfg.projector_type} projector")
    if cfg.projector_type == "ldpnetv2":
        return LDPv2Projector(cfg, w, backend)
    return LDPProjector(cfg, w, backend)
