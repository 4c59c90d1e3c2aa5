"""The CUDA backend's own kernels besides the quantized ones (cuda_quant.py), as Numba-CUDA kernels: RMSNorm,
LayerNorm, row softmax, RoPE, decode attention, SwiGLU's silu(gate) * up, the erf GELU and the depthwise 3x3 conv.
Everything else the backend does is CuPy array code (cuBLAS GEMMs, elementwise and reduction kernels).

Each kernel has its NumPy reference here, with the same signature (writes into `out`): the test oracle, and what
the backend's emulated device runs. The references call the CPU's own references (norm.py, rope.py, ...).
Reductions over a row use one block of THREADS threads and a shared-memory tree: the simulator that tests these
has no warp shuffles.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from tinyvlm.kernels import activations, attention, conv, norm
from tinyvlm.kernels.rope import apply_rope

THREADS = 128  # a row's block (reductions), or threads per block of an elementwise kernel


def _blocks(n: int) -> int:
    return max(1, (n + THREADS - 1) // THREADS)


@cuda.jit(device=True, inline=True)
def _block_reduce(buf, value, take_max):
    """The sum (or max) of `value` over the block's THREADS threads, returned to every thread."""
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if t < width:
            buf[t] = max(buf[t], buf[t + width]) if take_max else buf[t] + buf[t + width]
        cuda.syncthreads()
        width //= 2
    total = buf[0]
    cuda.syncthreads()  # every thread has read buf[0] before the next reduction writes it
    return total


@cuda.jit
def _rms_norm(x, w, eps, out):
    """out (R, D) = x / sqrt(mean(x^2) + eps) * w: one block a row."""
    buf = cuda.shared.array(THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
    acc = float32(0)
    for i in range(t, n, THREADS):
        acc += x[row, i] * x[row, i]
    inv = float32(1) / math.sqrt(_block_reduce(buf, acc, False) / float32(n) + float32(eps))
    for i in range(t, n, THREADS):
        out[row, i] = w[i] * (x[row, i] * inv)


@cuda.jit
def _layer_norm(x, w, b, eps, out):
    """out (R, D) = (x - mean) / sqrt(var + eps) * w + b, biased variance: one block a row, two passes."""
    buf = cuda.shared.array(THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
    acc = float32(0)
    for i in range(t, n, THREADS):
        acc += x[row, i]
    mean = _block_reduce(buf, acc, False) / float32(n)
    acc = float32(0)
    for i in range(t, n, THREADS):
        acc += (x[row, i] - mean) * (x[row, i] - mean)
    inv = float32(1) / math.sqrt(_block_reduce(buf, acc, False) / float32(n) + float32(eps))
    for i in range(t, n, THREADS):
        out[row, i] = (x[row, i] - mean) * inv * w[i] + b[i]


@cuda.jit
def _softmax_rows(x):
    """x (R, N) = softmax of each row, in place: shifted by the row's max (-inf entries become 0)."""
    buf = cuda.shared.array(THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, x.shape[1]
    top = float32(-math.inf)
    for i in range(t, n, THREADS):
        top = max(top, x[row, i])
    top = _block_reduce(buf, top, True)
    acc = float32(0)
    for i in range(t, n, THREADS):
        e = math.exp(x[row, i] - top)
        x[row, i] = e
        acc += e
    inv = float32(1) / _block_reduce(buf, acc, False)
    for i in range(t, n, THREADS):
        x[row, i] *= inv


@cuda.jit
def _rope(x, cos, sin, out):
    """out (H, T, Dh) = x rotated in the rotate-half layout by cos, sin (T, Dh/2): one thread a pair."""
    i = cuda.grid(1)
    heads, tokens, half = x.shape[0], x.shape[1], x.shape[2] // 2
    if i < heads * tokens * half:
        h, rest = i // (tokens * half), i % (tokens * half)
        t, j = rest // half, rest % half
        x1, x2, c, s = x[h, t, j], x[h, t, j + half], cos[t, j], sin[t, j]
        out[h, t, j] = x1 * c - x2 * s
        out[h, t, j + half] = x2 * c + x1 * s


@cuda.jit
def _decode_attention(q, keys, values, length, scale, out):
    """out (Hq, Dh) = softmax(q . keys * scale) @ values over the first `length` positions of keys, values
    (S, Hkv, Dh), q (Hq, Dh); query head h reads kv head h // (Hq / Hkv). One block a head: THREADS positions at a
    time, one thread a position's score, then each of the first Dh threads updates one output element with an
    online softmax (running max and sum). Dh <= THREADS."""
    probs = cuda.shared.array(THREADS, float32)
    buf = cuda.shared.array(THREADS, float32)
    h, t = cuda.blockIdx.x, cuda.threadIdx.x
    heads, dim = q.shape[0], q.shape[1]
    kv = h // (heads // keys.shape[1])
    running_max, total, acc = float32(-math.inf), float32(0), float32(0)
    for start in range(0, length, THREADS):
        s = start + t
        score = float32(-math.inf)
        if s < length:
            score = float32(0)
            for j in range(dim):
                score += q[h, j] * keys[s, kv, j]
            score *= float32(scale)
        new_max = max(running_max, _block_reduce(buf, score, True))  # finite: position `start` is < length
        p = math.exp(score - new_max) if s < length else float32(0)
        probs[t] = p
        correction = math.exp(running_max - new_max)  # 0 on the first chunk
        total = total * correction + _block_reduce(buf, p, False)  # its syncs also publish probs
        if t < dim:
            acc *= correction
            for i in range(min(THREADS, length - start)):
                acc += probs[i] * values[start + i, kv, t]
        running_max = new_max
        cuda.syncthreads()  # probs is read by all before the next chunk writes it
    if t < dim:
        out[h, t] = acc / total


@cuda.jit
def _silu_mul(gate, up, out):
    """out = gate * sigmoid(gate) * up, flat."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        g = gate[i]
        out[i] = g / (float32(1) + math.exp(-g)) * up[i]


@cuda.jit
def _gelu(z):
    """z = 0.5 z (1 + erf(z / sqrt 2)) in place, flat: nn.GELU's default (erf) form."""
    i = cuda.grid(1)
    if i < z.shape[0]:
        v = z[i]
        z[i] = float32(0.5) * v * (float32(1) + math.erf(v * float32(0.7071067811865476)))


@cuda.jit
def _depthwise3x3(x, w, stride, out):
    """out (Go, Go, D) = the depthwise 3x3 cross-correlation of x (G, G, D) with w (3, 3, D), zero padding 1."""
    i = cuda.grid(1)
    side, width, channels = out.shape[0], x.shape[0], out.shape[2]
    if i < side * side * channels:
        oy, rest = i // (side * channels), i % (side * channels)
        ox, c = rest // channels, rest % channels
        acc = float32(0)
        for u in range(3):
            y = stride * oy + u - 1
            if 0 <= y < width:
                for v in range(3):
                    xx = stride * ox + v - 1
                    if 0 <= xx < width:
                        acc += w[u, v, c] * x[y, xx, c]
        out[oy, ox, c] = acc


# ------------------------------------------------------------------------------------------------- launches

def rms_norm(x, w, eps: float, out) -> None:
    _rms_norm[x.shape[0], THREADS](x, w, np.float32(eps), out)


def layer_norm(x, w, b, eps: float, out) -> None:
    _layer_norm[x.shape[0], THREADS](x, w, b, np.float32(eps), out)


def softmax_rows_(x) -> None:
    _softmax_rows[x.shape[0], THREADS](x)


def rope(x, cos, sin, out) -> None:
    _rope[_blocks(x.shape[0] * x.shape[1] * (x.shape[2] // 2)), THREADS](x, cos, sin, out)


def decode_attention(q, keys, values, length: int, scale: float, out) -> None:
    """out (Hq, Dh) = one query per head over the first `length` positions of keys, values (S, Hkv, Dh)."""
    if q.shape[1] > THREADS:
        raise ValueError(f"decode attention takes heads of at most {THREADS} elements, not {q.shape[1]}")
    _decode_attention[q.shape[0], THREADS](q, keys, values, length, np.float32(scale), out)


def silu_mul(gate, up, out) -> None:
    _silu_mul[_blocks(out.size), THREADS](gate.reshape(-1), up.reshape(-1), out.reshape(-1))


def gelu_(z) -> None:
    _gelu[_blocks(z.size), THREADS](z.reshape(-1))


def depthwise3x3(x, w, stride: int, out) -> None:
    _depthwise3x3[_blocks(out.size), THREADS](x, w, stride, out)


# ---------------------------------------------------------------------------------------------------- references

def rms_norm_ref(x, w, eps: float, out) -> None:
    out[...] = norm.rms_norm(x, w, eps)


def layer_norm_ref(x, w, b, eps: float, out) -> None:
    out[...] = norm.layer_norm(x, w, b, eps)


def softmax_rows_ref(x) -> None:
    attention.softmax(x, out=x)


def rope_ref(x, cos, sin, out) -> None:
    out[...] = apply_rope(x, cos, sin)


def decode_attention_ref(q, keys, values, length: int, scale: float, out) -> None:
    k, v = keys[:length].transpose(1, 0, 2), values[:length].transpose(1, 0, 2)  # (Hkv, length, Dh)
    out[...] = attention.grouped_attention(q[:, None], k, v, scale)[:, 0]


def silu_mul_ref(gate, up, out) -> None:
    out[...] = activations.silu(gate) * up


def gelu_ref(z) -> None:
    z[...] = activations.gelu(z)


def depthwise3x3_ref(x, w, stride: int, out) -> None:
    out[...] = conv.depthwise3x3(x, w, stride)
