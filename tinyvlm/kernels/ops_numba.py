"""Numba kernels for the small per-token ops of decode: RMSNorm and rotate-half RoPE.

Each kernel's test oracle is its NumPy reference: norm.rms_norm and rope.apply_rope. For one token these ops
do little arithmetic, and NumPy spends most of their time in per-call overhead (a temporary and a dispatch
for every step); a compiled loop does the same work in one call. They run on one thread: a parallel launch
costs more than the work. Plain Numba only (no intrinsics), `cache=True` like quant_numba.py.
"""
from __future__ import annotations

import numpy as np

from tinyvlm.kernels import _numba

numba = _numba.module()
# Reassociation lets LLVM vectorize the reductions; no "fast" flags that assume away inf and NaN.
_FAST = {"reassoc", "contract"}


@numba.njit(fastmath=_FAST, cache=True)
def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32, out: np.ndarray) -> None:
    """out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps) for each row r of x (R, D)."""
    rows, dim = x.shape
    for r in range(rows):
        acc = np.float32(0)
        for j in range(dim):
            acc += x[r, j] * x[r, j]
        inv_rms = np.float32(1) / np.sqrt(acc / np.float32(dim) + eps)
        for j in range(dim):
            out[r, j] = weight[j] * (x[r, j] * inv_rms)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """norm.rms_norm for float32 x (..., D) and weight (D,)."""
    rows = x.reshape(-1, x.shape[-1])  # (..., D) -> (R, D)
    out = np.empty(rows.shape, dtype=np.float32)
    _rms_norm(rows, weight, np.float32(eps), out)
    return out.reshape(x.shape)


@numba.njit(cache=True)
def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, out: np.ndarray) -> None:
    """out = [x1 cos - x2 sin | x2 cos + x1 sin] for x (H, T, Dh) = [x1 | x2], cos/sin (T, Dh/2)."""
    heads, steps, dim = x.shape
    half = dim // 2
    for h in range(heads):
        for t in range(steps):
            for j in range(half):
                x1, x2 = x[h, t, j], x[h, t, j + half]
                out[h, t, j] = x1 * cos[t, j] - x2 * sin[t, j]
                out[h, t, j + half] = x2 * cos[t, j] + x1 * sin[t, j]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rope.apply_rope for float32 x (H, T, Dh) and cos/sin (T, Dh/2)."""
    out = np.empty(x.shape, dtype=np.float32)  # (H, T, Dh)
    _apply_rope(x, cos, sin, out)
    return out

# Not here: attention of one query over the cache. A Numba version measured 18.5 us against NumPy/BLAS's
# 15-17 us (150 cached positions, 9 query heads, 3 kv heads, Dh 64) and made SmolLM2 decode slower, so
# decode attention stays on NumPy.
