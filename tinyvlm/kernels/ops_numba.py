"""Numba kernels for the per-token ops of decode: RMSNorm, rotate-half RoPE, and attention of one query.

Each kernel's test oracle is its NumPy reference: norm.rms_norm, rope.apply_rope, attention.grouped_attention. For one
token RMSNorm and RoPE do little arithmetic, and NumPy spends most of their time in per-call overhead (a
temporary and a dispatch for every step); a compiled loop does the same work in one call, on one thread (a
parallel launch costs more than the work). Attention over the cache reads every cached key and value, and
runs in parallel over query heads. Plain Numba only (no intrinsics), `cache=True` like quant_numba.py.
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


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _decode_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, scale: np.float32,
                      out: np.ndarray) -> None:
    """out[h] = softmax(keys[j, :length] q[h] * scale) @ values[j, :length] for each query head h, j = h // group.

    keys and values are a layer's whole cache (Hkv, S_max, Dh), C-contiguous: a view cut to `length` would
    be strided, and Numba vectorizes strided loops poorly (this kernel measured 2.4x slower on such views).
    """
    heads, dim = q.shape
    group = heads // keys.shape[0]
    for h in numba.prange(heads):
        j = h // group
        scores = np.empty(length, dtype=np.float32)  # (S,)
        top = np.float32(-np.inf)
        for t in range(length):
            s = np.float32(0)
            for e in range(dim):
                s += q[h, e] * keys[j, t, e]
            s *= scale
            scores[t] = s
            top = max(top, s)
        total = np.float32(0)
        for t in range(length):
            p = np.exp(scores[t] - top)
            scores[t] = p
            total += p
        acc = np.zeros(dim, dtype=np.float32)  # (Dh,)
        for t in range(length):
            p = scores[t]
            for e in range(dim):
                acc[e] += p * values[j, t, e]
        for e in range(dim):
            out[h, e] = acc[e] / total


def decode_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, scale: float) -> np.ndarray:
    """attention.grouped_attention for one query: q (Hq, Dh) over the first `length` positions of keys and values
    (Hkv, S_max, Dh, C-contiguous float32); returns (Hq, Dh)."""
    out = np.empty(q.shape, dtype=np.float32)  # (Hq, Dh)
    _decode_attention(np.ascontiguousarray(q, dtype=np.float32), keys, values, length, np.float32(scale), out)
    return out
