"""Quantized weights on an NVIDIA GPU, as Numba-CUDA kernels: the decode matvec, and the dequantization that
feeds a prefill GEMM (cuBLAS). Each kernel has its NumPy reference here, with the same signature: the test oracle,
and what the CUDA backend's emulated device runs (backends/cuda.py).

Device layout, uploaded once at load (backends/cuda.py, DeviceQuantized): kernels/quant.py's arrays, except
    qs  uint8 (out, row bytes) for every kind: q4 nibbles, q8_0's int8 bytes reinterpreted, q6_k's three planes
    d   float16 (out, in/32), q6_k (out, in/16): the file's scales, as stored (quant.py widens them to float32);
        float32 where they are not float16 values (q6_k's and Q4_K's scales times their sub-scales)
    m   q4_1's mins, like d; the other kinds pass d in its place
so a Q4_0 matrix reads 18 bytes per 32 weights, as in the GGUF file.

Element e of row `row` (quant.py's definitions): g = e // 32, j = e % 32
    q4_0  d[g] (nibble - 8)    q4_1  d[g] nibble + m[g]    (byte 16 g + j % 16; low nibble for j < 16)
    q8_0  d[g] int8(qs[e])
    q6_k  d[e // 16] (q - 32), q's low 4 bits in plane k % 2 (low nibble for k = j // 8 < 2), top 2 from plane 2
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

from tinyvlm.kernels import quant

KIND_CODES = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q6_k": 3}
ROWS = 4  # matvec: weight rows per block of 32 x ROWS threads, one warp a row
THREADS = 256  # dequantize: threads per block, one an element


@cuda.jit(device=True, inline=True)
def weight(code, qs, d, m, row, e):
    """The float32 value of element e of row `row` (module docstring)."""
    g = e // 32
    j = e % 32
    if code == 2:
        b = int32(qs[row, e])
        if b > 127:
            b -= 256
        return float32(d[row, g]) * float32(b)
    if code == 3:
        plane = qs.shape[1] // 3  # bytes per plane
        k = j // 8
        at = 8 * g + j % 8
        byte = int32(qs[row, (k % 2) * plane + at])
        nibble = byte & 15 if k < 2 else byte >> 4
        top = (int32(qs[row, 2 * plane + at]) >> (2 * k)) & 3
        return float32(d[row, e // 16]) * float32(nibble + (top << 4) - 32)
    byte = int32(qs[row, 16 * g + j % 16])
    nibble = byte & 15 if j < 16 else byte >> 4
    if code == 0:
        return float32(d[row, g]) * float32(nibble - 8)
    return float32(d[row, g]) * float32(nibble) + float32(m[row, g])


@cuda.jit
def _matvec(code, qs, d, m, x, y, accumulate):
    """y (out,) = W x for x (in,), or y += W x with `accumulate`: warp row r of a block sums lanes' strided
    products, then a shared-memory tree (no warp shuffles: the simulator that tests this has none)."""
    partial = cuda.shared.array((ROWS, 32), float32)
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.x * ROWS + r
    acc = float32(0)
    if row < y.shape[0]:
        for e in range(lane, x.shape[0], 32):
            acc += weight(code, qs, d, m, row, e) * x[e]
    partial[r, lane] = acc
    cuda.syncthreads()
    width = 16
    while width > 0:
        if lane < width:
            partial[r, lane] += partial[r, lane + width]
        cuda.syncthreads()
        width //= 2
    if lane == 0 and row < y.shape[0]:
        y[row] = y[row] + partial[r, 0] if accumulate else partial[r, 0]


@cuda.jit
def _dequantize(code, qs, d, m, out):
    """out (rows, in) = W, float16 or float32: one thread an element."""
    i = cuda.grid(1)
    n_in = out.shape[1]
    if i < out.shape[0] * n_in:
        row = i // n_in
        out[row, i - row * n_in] = weight(code, qs, d, m, row, i - row * n_in)


def matvec(kind: str, qs, d, m, x, y, accumulate: bool = False) -> None:
    """y (out,) float32 = W x (y += W x with `accumulate`), x (in,) float32: device arrays in the module's layout."""
    _matvec[(y.shape[0] + ROWS - 1) // ROWS, (32, ROWS)](KIND_CODES[kind], qs, d, m, x, y, accumulate)


def dequantize(kind: str, qs, d, m, out) -> None:
    """out (out, in) float16 or float32 = W."""
    _dequantize[max(1, math.ceil(out.size / THREADS)), THREADS](KIND_CODES[kind], qs, d, m, out)


# ---------------------------------------------------------------------------------------------------- references

def as_quantized(kind: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray) -> quant.QuantizedMatrix:
    """Host arrays in the device layout -> the QuantizedMatrix (quant.py's layout) they stand for."""
    n_in = qs.shape[1] * {"q8_0": 1, "q6_k": 4 / 3}.get(kind, 2)
    data = qs.view(np.int8) if kind == "q8_0" else qs
    return quant.QuantizedMatrix(kind, (qs.shape[0], round(n_in)), data, d.astype(np.float32),
                                 m.astype(np.float32) if kind == "q4_1" else None)


def matvec_ref(kind: str, qs, d, m, x, y, accumulate: bool = False) -> None:
    product = quant.matvec_ref(as_quantized(kind, qs, d, m), x)
    if accumulate:
        y += product
    else:
        y[...] = product


def dequantize_ref(kind: str, qs, d, m, out) -> None:
    out[...] = quant.dequantize(as_quantized(kind, qs, d, m))


def device_layout(qm: quant.QuantizedMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A QuantizedMatrix's host arrays in the device layout: (qs uint8, d, m or d), d and m float16 when every
    value is one (no rounding), else float32."""
    qs = qm.qs.view(np.uint8) if qm.kind == "q8_0" else qm.qs
    scales = [v for v in (qm.d, qm.m) if v is not None]
    with np.errstate(over="ignore"):
        exact = all(np.array_equal(v.astype(np.float16).astype(np.float32), v, equal_nan=True) for v in scales)
    d, m = (np.ascontiguousarray(v, dtype=np.float16 if exact else np.float32) for v in (qm.d, scales[-1]))
    return np.ascontiguousarray(qs), d, m
