"""Elementwise activations, NumPy reference kernels, each matching its torch.nn.functional counterpart.

silu (LLaMA's SwiGLU), quick_gelu (CLIP), the exact erf-based gelu with its own erf (the LDP projectors' MLP;
NumPy has no erf), hardswish and hardsigmoid (the LDP inverted-residual blocks, torchvision's defaults).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import chebyshev


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x); exp overflows to inf for x < -88, which correctly gives -0."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def quick_gelu(z: np.ndarray) -> np.ndarray:
    """CLIP's activation z * sigmoid(1.702 z), written with tanh so large |z| cannot overflow exp."""
    return np.float32(0.5) * z * (np.float32(1.0) + np.tanh(np.float32(0.851) * z))


def hardswish(z: np.ndarray) -> np.ndarray:
    """z * relu6(z + 3) / 6."""
    return z * np.clip(z + np.float32(3.0), 0.0, 6.0) / np.float32(6.0)


def hardsigmoid(z: np.ndarray) -> np.ndarray:
    """relu6(z + 3) / 6, written as clip(z / 6 + 1/2, 0, 1)."""
    return np.clip(z / np.float32(6.0) + np.float32(0.5), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Exact (erf) GELU. NumPy has no erf, so: erf(x) = x * g(x^2) with g(y) = erf(sqrt y) / sqrt y, an entire function,
# interpolated on y in [0, 16] by a degree-24 Chebyshev series whose coefficients are computed here from the C
# library's double-precision math.erf. For |x| >= 4, erf(x) = sign(x) (1 - erfc(4) = 1 - 1.5e-8, below float32's
# resolution). Evaluated in float64: about 1e-14 relative error inside |x| < 4, so float32 results are correctly
# rounded.

_ERF_Y_MAX = 16.0
_ERF_DEGREE = 24


def _erf_g_coefficients() -> np.ndarray:
    nodes = np.cos(np.pi * (np.arange(_ERF_DEGREE + 1) + 0.5) / (_ERF_DEGREE + 1))  # Chebyshev points in (-1, 1)
    x = np.sqrt((nodes + 1.0) * (_ERF_Y_MAX / 2))  # the matching x in (0, 4)
    g = np.array([math.erf(v) / v for v in x], dtype=np.float64)
    return chebyshev.chebfit(nodes, g, _ERF_DEGREE)


_ERF_G = _erf_g_coefficients()


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, computed in float64, returned in x's floating dtype."""
    x64 = np.asarray(x, dtype=np.float64)
    y = np.minimum(x64 * x64, _ERF_Y_MAX)
    inner = x64 * chebyshev.chebval(y * (2.0 / _ERF_Y_MAX) - 1.0, _ERF_G)
    out = np.where(x64 * x64 < _ERF_Y_MAX, inner, np.sign(x64))
    return out.astype(np.result_type(x, np.float32), copy=False)


def gelu(z: np.ndarray) -> np.ndarray:
    """nn.GELU() default: 0.5 z (1 + erf(z / sqrt 2)), not the tanh approximation. float32 out."""
    z64 = z.astype(np.float64)
    return (0.5 * z64 * (1.0 + erf(z64 * math.sqrt(0.5)))).astype(np.float32)
