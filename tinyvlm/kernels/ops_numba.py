"""Numba kernels for the non-matmul ops: the LLM's RMSNorm, RoPE and SiLU-times-up, decode's one-query
attention; the vision tower's softmax, quick-GELU and LayerNorm; the projector's exact GELU.

Each kernel's test oracle is its NumPy reference: norm.rms_norm, norm.layer_norm, rope.apply_rope,
attention.grouped_attention, attention.softmax, activations.quick_gelu, activations.gelu, activations.silu.
Over a 192-token prompt they also beat NumPy (per call, MobileLLaMA-1.4B shapes: RoPE 0.69 -> 0.22 ms,
RMSNorm 0.48 -> 0.11 ms), since NumPy passes over memory several times and allocates each time. For one token RMSNorm and RoPE do
little arithmetic, and NumPy spends most of their time in per-call overhead (a temporary and a dispatch for
every step); a compiled loop does the same work in one call, on one thread (a parallel launch costs more
than the work). Attention over the cache reads every cached key and value, and runs in parallel over query
heads. The vision ops run over (577, 1024..4096) activations and (16, 577, 577) scores: one pass over memory
each where NumPy makes three to eight, with an exp (_exp) that LLVM can vectorize. They run on one thread:
OpenBLAS's threads run the matmuls between them, and Numba's OpenMP threads, spinning after a parallel
kernel, slowed those matmuls more than the second thread gained (ViT-L/14-336 encode 1.76 s vs 1.93 s).
Plain Numba only (no intrinsics), `cache=True` like quant_numba.py.
"""
from __future__ import annotations

import math

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
    """out[h] = softmax(keys[:length, j] q[h] * scale) @ values[:length, j] for each query head h, j = h // group.

    keys and values are a layer's whole cache (S_max, Hkv, Dh), C-contiguous: Numba types a view cut to
    `length` as non-contiguous and vectorizes its loops poorly (this kernel measured 2.4x slower on views).
    MobileLLaMA-1.4B int4 decode at ~220 cached positions, 2 threads, all 24 layers: 4.2 ms per token here,
    7.5 ms with NumPy (q @ K^T, softmax, @ V: 32 small BLAS calls per layer, each waking OpenBLAS's threads).
    """
    heads, dim = q.shape
    group = heads // keys.shape[1]
    for h in numba.prange(heads):
        j = h // group
        scores = np.empty(length, dtype=np.float32)  # (S,)
        top = np.float32(-np.inf)
        for t in range(length):
            s = np.float32(0)
            for e in range(dim):
                s += q[h, e] * keys[t, j, e]
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
                acc[e] += p * values[t, j, e]
        for e in range(dim):
            out[h, e] = acc[e] / total


def decode_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, scale: float) -> np.ndarray:
    """attention.grouped_attention for one query: q (Hq, Dh) over the first `length` positions of keys and values
    (S_max, Hkv, Dh, C-contiguous float32); returns (Hq, Dh)."""
    out = np.empty(q.shape, dtype=np.float32)  # (Hq, Dh)
    _decode_attention(np.ascontiguousarray(q, dtype=np.float32), keys, values, length, np.float32(scale), out)
    return out


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int, scale: np.float32,
                      out: np.ndarray) -> None:
    """out[h, t] = softmax(keys[j, :pos+t+1] q[h, t] * scale) @ values[j, :pos+t+1], j = h // group: query t (at
    position pos + t) sees the keys up to its own. q (Hq, T, Dh), keys, values (Hkv, S, Dh), all C-contiguous."""
    heads, n_queries, dim = q.shape
    group = heads // keys.shape[0]
    for h in numba.prange(heads):
        j = h // group
        scores = np.empty(keys.shape[1], dtype=np.float32)  # (S,)
        acc = np.empty(dim, dtype=np.float32)  # (Dh,)
        for t in range(n_queries):
            length = pos + t + 1
            top = np.float32(-np.inf)
            for s in range(length):
                dot = np.float32(0)
                for e in range(dim):
                    dot += q[h, t, e] * keys[j, s, e]
                scores[s] = dot * scale
                top = max(top, scores[s])
            total = np.float32(0)
            for s in range(length):
                scores[s] = np.exp(scores[s] - top)
                total += scores[s]
            acc[:] = 0
            for s in range(length):
                for e in range(dim):
                    acc[e] += scores[s] * values[j, s, e]
            for e in range(dim):
                out[h, t, e] = acc[e] / total


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, pos: int) -> np.ndarray:
    """attention.grouped_attention with the causal mask of queries q (Hq, T, Dh) at positions pos .. pos+T-1 over
    keys, values (Hkv, pos+T, Dh); returns (Hq, T, Dh). No BLAS: see backends/numba.py."""
    out = np.empty(q.shape, dtype=np.float32)  # (Hq, T, Dh)
    keys, values = (np.ascontiguousarray(a, dtype=np.float32) for a in (keys, values))
    _causal_attention(np.ascontiguousarray(q, dtype=np.float32), keys, values, pos, np.float32(scale), out)
    return out


# ---------------------------------------------------------------- the vision tower's elementwise ops

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO; _LN2_HI has 9 significant bits, so n * _LN2_HI is exact
_LN2_LO = np.float32(-2.1219444005469057e-4)


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _exp(x: np.float32) -> np.float32:
    """exp(x) in float32, within 1e-7 relative for x in [-87.3, 88.3]; x is clamped to that range.

    numba's np.exp calls the C library one value at a time; this form vectorizes: x = n ln2 + r with
    |r| <= ln2 / 2, e^r by its Taylor series to r^7 (error < 5e-9), 2^n built in the exponent bits.
    Below the range the result is 1e-38 instead of a denormal or 0, above it 2.1e38 instead of up to inf.
    """
    x = min(max(x, np.float32(-87.3)), np.float32(88.3))  # so that 2^n stays a normal float32: n in -126..127
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1 / 5040)
    p = p * r + np.float32(1 / 720)
    p = p * r + np.float32(1 / 120)
    p = p * r + np.float32(1 / 24)
    p = p * r + np.float32(1 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1)
    p = p * r + np.float32(1)
    return p * np.int32((np.int32(n) + 127) << 23).view(np.float32)


@numba.njit(fastmath=_FAST, cache=True)
def _softmax_rows(x: np.ndarray) -> None:
    """x[i] = exp(x[i] - max x[i]) / sum(...) in place for each row of x (R, N).

    The row max runs in 16 lanes: LLVM does not vectorize a running max(top, v) (4.7 ms for 16 x 577 rows of
    577, against 1.5 ms in lanes; the exp pass takes 1.4 ms).
    """
    rows, n = x.shape
    lanes = np.empty(16, dtype=np.float32)
    whole = n - n % 16
    for i in range(rows):
        lanes[:] = -np.inf
        for c in range(0, whole, 16):
            for k in range(16):
                v = x[i, c + k]
                lanes[k] = v if v > lanes[k] else lanes[k]  # a select, not a branch: it vectorizes
        top = np.float32(-np.inf)
        for k in range(16):
            top = max(top, lanes[k])
        for j in range(whole, n):
            top = max(top, x[i, j])
        total = np.float32(0)
        for j in range(n):
            e = _exp(x[i, j] - top)
            x[i, j] = e
            total += e
        inv = np.float32(1) / total
        for j in range(n):
            x[i, j] *= inv


def softmax_(x: np.ndarray) -> np.ndarray:
    """attention.softmax over the last axis of a C-contiguous float32 x, in place; returns x.

    Entries more than 87 below their row's max become 1e-38 / sum rather than 0 (see _exp): no softmax of a
    -inf mask goes through here, only the vision tower's unmasked scores."""
    _softmax_rows(x.reshape(-1, x.shape[-1]))
    return x


@numba.njit(fastmath=_FAST, cache=True, error_model="numpy")
def _quick_gelu_(z: np.ndarray) -> None:
    """z = z * sigmoid(1.702 z) = z / (1 + exp(-1.702 z)) in place, z (R, N).

    error_model="numpy": IEEE division, as in NumPy. Numba's default checks every division for zero to raise
    ZeroDivisionError, and that branch keeps the loop from vectorizing (7.4 ms instead of 0.76 ms for
    (577, 4096) on one thread)."""
    rows, n = z.shape
    for i in range(rows):
        for j in range(n):
            v = z[i, j]
            z[i, j] = v / (np.float32(1) + _exp(np.float32(-1.702) * v))


def quick_gelu_(z: np.ndarray) -> np.ndarray:
    """z = activations.quick_gelu(z) in place for C-contiguous float32 z (..., N); returns z."""
    _quick_gelu_(z.reshape(-1, z.shape[-1]))  # (..., N) -> (R, N), a view
    return z


@numba.njit(fastmath=_FAST, cache=True)
def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: np.float32, out: np.ndarray) -> None:
    """out[i] = (x[i] - mean) / sqrt(var + eps) * weight + bias for each row of x (R, D), biased variance."""
    rows, dim = x.shape
    for i in range(rows):
        total = np.float32(0)
        for j in range(dim):
            total += x[i, j]
        mean = total / np.float32(dim)
        sq = np.float32(0)
        for j in range(dim):
            c = x[i, j] - mean
            sq += c * c
        inv = np.float32(1) / np.sqrt(sq / np.float32(dim) + eps)
        for j in range(dim):
            out[i, j] = (x[i, j] - mean) * inv * weight[j] + bias[j]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """out = norm.layer_norm(x, weight, bias, eps) for C-contiguous float32 x and out (..., D), out not x;
    weight and bias (D,). Returns out."""
    _layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, np.float32(eps), out.reshape(-1, out.shape[-1]))
    return out


@numba.njit(cache=True, error_model="numpy")
def _gelu_(z: np.ndarray) -> None:
    """z = 0.5 z (1 + erf(z / sqrt 2)) in place, z (R, N), each value through the C library's float64 erf."""
    rows, n = z.shape
    for i in range(rows):
        for j in range(n):
            v = np.float64(z[i, j])
            z[i, j] = np.float32(0.5 * v * (1.0 + math.erf(v * 0.7071067811865476)))


def gelu_(z: np.ndarray) -> np.ndarray:
    """z = activations.gelu(z) in place for C-contiguous float32 z (..., N); returns z.

    The NumPy reference evaluates its own erf (NumPy has none) as a degree-24 Chebyshev series in float64:
    94 ms for LDPv2's (576, 2048) activations, 5x its matmuls; the C library's erf, one value at a time, is
    not vectorized but skips the series' passes over memory."""
    _gelu_(z.reshape(-1, z.shape[-1]))  # (..., N) -> (R, N), a view
    return z


@numba.njit(fastmath=_FAST, cache=True, error_model="numpy")
def _silu_mul_(gate: np.ndarray, up: np.ndarray) -> None:
    """gate = gate * sigmoid(gate) * up = gate / (1 + exp(-gate)) * up, in place, gate and up (T, F)."""
    rows, n = gate.shape
    for i in range(rows):
        for j in range(n):
            g = gate[i, j]
            gate[i, j] = g / (np.float32(1) + _exp(-g)) * up[i, j]


@numba.njit(fastmath=_FAST, cache=True, error_model="numpy")
def _swiglu_(y: np.ndarray, n: int) -> None:
    """y[:, :n] = silu(y[:, :n]) * y[:, n:] in place, y (T, 2n) C-contiguous.

    One C-contiguous array rather than its two halves: Numba types a half as strided, and its loop then runs
    scalar (3.1 ms instead of 0.43 ms at (192, 5632))."""
    for i in range(y.shape[0]):
        for j in range(n):
            g = y[i, j]
            y[i, j] = g / (np.float32(1) + _exp(-g)) * y[i, n + j]


def silu_mul_(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate = activations.silu(gate) * up in place for C-contiguous float32 gate and up (T, F); returns gate.
    SwiGLU's elementwise step, one pass instead of NumPy's four."""
    _silu_mul_(gate, up)
    return gate


def swiglu_(y: np.ndarray) -> np.ndarray:
    """silu_mul_ for gate and up stacked in one C-contiguous float32 y (T, 2F) = [gate | up]; the result is
    written over the gate half, which is returned: a (T, F) view of y."""
    n = y.shape[1] // 2
    _swiglu_(y, n)
    return y[:, :n]
