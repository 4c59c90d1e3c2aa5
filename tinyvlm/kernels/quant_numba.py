"""Numba kernels for quantized linear layers: fused-dequantization matvec (decode), tiled matmul (prefill).

Each kernel's test oracle is its NumPy reference in quant.py (matvec_ref, matmul_ref, dequantize).
Plain Numba (no CPU-specific intrinsics), so the same code compiles on x86-64 and ARM64; the one LLVM
intrinsic used, the target-independent llvm.prefetch, lowers to prefetcht0 on x86-64 and prfm on ARM64.
`cache=True`, so a second start loads the machine code from __pycache__ instead of recompiling.

Decode (x is one token): one pass over the weight bytes per output row, dequantization fused into the
dot product. Per group g of row o, with lo/hi the two nibbles of a byte and m the group offset
(q4_0: m = -8 d, q4_1: the stored min):
    y[o] = sum_g d[o,g] * sum_j (lo_j x_j + hi_j x_{j+16}) + sum_g m[o,g] * sum(x in group g)
with sum(x in group g) computed once per call. The nibbles are split in float32 (hi = floor(b / 16),
lo = b - 16 hi) and the scale is looked up per byte (d[o, j >> 4]) in one flat loop over the row: the
form LLVM vectorizes. While row o is multiplied, row o + PREFETCH_ROWS is prefetched. Measured on a 2-core
Sapphire Rapids VM, weights streamed from memory (benchmarks/bench_kernels.py; q4_0, 5632 x 2048):
    this kernel                                     ~9.2 GB/s on 1 thread, ~19.5 on 2  (read ceiling 16 / 32)
    touching each row's lines with loads first      ~7.3 / ~12.8; and 12-15% slower again when loaded from
                                                    numba's cache than freshly compiled (see _numba.py)
    neither touching nor prefetching                ~2.7 on 1 thread
    a per-group inner loop with a sum per group     ~5x slower  (a horizontal add per 32 weights)
    int8 activations + integer dot products in Numba ~2x slower (Numba widens the products to int64: vpmuldq);
                                                    written as LLVM IR instead they are faster: quant_int8.py
    (lo - 8), (hi - 8) in the loop instead of the sum(x) term    ~12% slower
    b x_lo + hi (x_hi - 16 x_lo), one operation fewer per 16 bytes: ~10% faster, not taken: its
        cancellation error is bounded only relative to 255 |d| |x|, not to the weights' magnitudes
Float32 error: the two terms cancel where w' is near 0, so it is bounded relative to
sum |x| (|d q| + |m|) rather than sum |x||w'| (tests/test_kernels_quant.py states it); both are orders of
magnitude below the quantization error itself.

Prefill (T > 1): dequantize a tile of rows into float32 (exact: d is a float16 value, so d*q needs at
most 19 bits), then multiply the tile with BLAS (numpy @), which brings its own threads. The tile's columns
are in nibble order (all low nibbles, then all high ones; x's columns are permuted once to match), so the
dequantization loops are linear and vectorize. One thread, G weights/s (5632 x 2048, 512-row tiles):
    q4_0 1.9 (columns in natural order) -> 3.2 (nibble order) -> 4.8 (integer nibble split, row views,
    cheaper scale expansion); q4_1 2.5 -> 3.6; q8_0 2.7 -> 4.2.
The dequantization runs on one thread on purpose: Numba's OpenMP threads keep spinning after a parallel
loop and starve OpenBLAS's threads. Dequantizing a whole matrix in parallel, then one BLAS call, measured
183 GFLOP/s against 208 for serial 512-row tiles (5632 x 2048, T = 192, 2 threads; dense BLAS: 276).
"""
from __future__ import annotations

import numpy as np

from tinyvlm.kernels import _numba
from tinyvlm.kernels.quant import GROUP, QuantizedMatrix

numba = _numba.module()  # raises TinyVLMError, saying why, when numba cannot be used
from tinyvlm.kernels.prefetch import PREFETCH_ROWS, prefetch_row as _prefetch_row  # noqa: E402
# Reassociation lets LLVM vectorize the reductions; no "fast" flags that assume away inf and NaN.
_FAST = {"reassoc", "contract"}
# Rows dequantized per BLAS call in matmul. T = 192, q4_0, 2 threads, GFLOP/s for tiles of 128/256/512/1024/2048
# rows (dense float32 BLAS in brackets): 6144 x 2048: 171/200/204/210/207 (296); 11264 x 2048: 169/192/209/214/218
# (300); 2048 x 5632: 151/175/184/174/153 (289).
TILE_ROWS = 512
_32 = np.float32(32)  # q6_k's offset, subtracted in float32: integer steps in Numba widen to int64 lanes (half as
# many per vector; 0.27 ns instead of 0.16 per weight in _matvec_q6's loops, one core)
ROWS_Q6 = 16  # q6_k float32 matvec: rows per parallel work item (one row buffer each)


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _matvec_q4(qs: np.ndarray, d: np.ndarray, m: np.ndarray, m_scale: np.float32, x_lo: np.ndarray,
               x_hi: np.ndarray, x_sum: np.ndarray, y: np.ndarray) -> None:
    """y[o] = sum_j d[o, j>>4] (lo_j x_lo[j] + hi_j x_hi[j]) + m_scale * sum_g m[o, g] x_sum[g]."""
    out, half = qs.shape
    n_groups = d.shape[1]
    for o in numba.prange(out):
        _prefetch_row(qs, o + PREFETCH_ROWS)
        _prefetch_row(d, o + PREFETCH_ROWS)
        _prefetch_row(m, o + PREFETCH_ROWS)
        acc = np.float32(0)
        for j in range(half):
            b = np.float32(qs[o, j])
            hi = np.floor(b * np.float32(0.0625))
            lo = b - np.float32(16) * hi
            acc += d[o, j >> 4] * (lo * x_lo[j] + hi * x_hi[j])
        offset = np.float32(0)
        for g in range(n_groups):
            offset += m[o, g] * x_sum[g]
        y[o] = acc + m_scale * offset


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _matvec_q8(qs: np.ndarray, d: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y[o] = sum_j d[o, j>>5] q[o, j] x[j]."""
    out, n_in = qs.shape
    for o in numba.prange(out):
        _prefetch_row(qs, o + PREFETCH_ROWS)
        _prefetch_row(d, o + PREFETCH_ROWS)
        acc = np.float32(0)
        for j in range(n_in):
            acc += d[o, j >> 5] * (np.float32(qs[o, j]) * x[j])
        y[o] = acc


@numba.njit(cache=True, error_model="numpy")
def _q6_row(qs: np.ndarray, d: np.ndarray, o: int, scale_low: np.ndarray, scale_high: np.ndarray,
            w: np.ndarray) -> None:
    """w (in,) = row o of a q6_k matrix, d16 * (q - 32), in plane order (see column_order); bit-exact with
    quant.dequantize. Its three byte planes are read linearly, one loop per quarter of the output (elements
    8k + j of every group), with the scales of the groups' first and second halves expanded per byte."""
    n = w.shape[0] // 4
    low, odd, high = qs[o, :n], qs[o, n:2 * n], qs[o, 2 * n:3 * n]  # (in/4,) each
    _expand_scales(d[o, 0::2], 8, scale_low)
    _expand_scales(d[o, 1::2], 8, scale_high)
    w0, w1, w2, w3 = w[:n], w[n:2 * n], w[2 * n:3 * n], w[3 * n:]
    for i in range(n):
        w0[i] = scale_low[i] * (np.float32(np.int32((low[i] & 15) | ((high[i] << 4) & 48))) - _32)
    for i in range(n):
        w1[i] = scale_low[i] * (np.float32(np.int32((odd[i] & 15) | ((high[i] << 2) & 48))) - _32)
    for i in range(n):
        w2[i] = scale_high[i] * (np.float32(np.int32((low[i] >> 4) | (high[i] & 48))) - _32)
    for i in range(n):
        w3[i] = scale_high[i] * (np.float32(np.int32((odd[i] >> 4) | ((high[i] >> 2) & 48))) - _32)


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _matvec_q6(qs: np.ndarray, d: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """y[o] = row o of dequantize(q6_k) . x, x in plane order: _q6_row's four loops, each multiplying its
    quarter of x instead of storing (ROWS_Q6 rows per work item, which share the scale buffers)."""
    out, n = qs.shape[0], x.shape[0] // 4
    x0, x1, x2, x3 = x[:n], x[n:2 * n], x[2 * n:3 * n], x[3 * n:]
    for first in numba.prange((out + ROWS_Q6 - 1) // ROWS_Q6):
        scale_low = np.empty(n, dtype=np.float32)
        scale_high = np.empty(n, dtype=np.float32)
        for o in range(first * ROWS_Q6, min(out, first * ROWS_Q6 + ROWS_Q6)):
            _prefetch_row(qs, o + PREFETCH_ROWS)
            low, odd, high = qs[o, :n], qs[o, n:2 * n], qs[o, 2 * n:3 * n]  # (in/4,) each
            _expand_scales(d[o, 0::2], 8, scale_low)
            _expand_scales(d[o, 1::2], 8, scale_high)
            acc = np.float32(0)
            for i in range(n):
                acc += scale_low[i] * ((np.float32(np.int32((low[i] & 15) | ((high[i] << 4) & 48))) - _32) * x0[i])
            for i in range(n):
                acc += scale_low[i] * ((np.float32(np.int32((odd[i] & 15) | ((high[i] << 2) & 48))) - _32) * x1[i])
            for i in range(n):
                acc += scale_high[i] * ((np.float32(np.int32((low[i] >> 4) | (high[i] & 48))) - _32) * x2[i])
            for i in range(n):
                acc += scale_high[i] * ((np.float32(np.int32((odd[i] >> 4) | ((high[i] >> 2) & 48))) - _32) * x3[i])
            y[o] = acc


@numba.njit(cache=True, error_model="numpy")
def _dequantize_q6(qs: np.ndarray, d: np.ndarray, row0: int, w: np.ndarray) -> None:
    """Rows row0 .. row0 + len(w) of a q6_k matrix into w, columns in plane order."""
    scale_low = np.empty(w.shape[1] // 4, dtype=np.float32)
    scale_high = np.empty(w.shape[1] // 4, dtype=np.float32)
    for r in range(w.shape[0]):
        _q6_row(qs, d, row0 + r, scale_low, scale_high, w[r])


@numba.njit(cache=True, error_model="numpy")
def _expand_scales(d_row: np.ndarray, per: int, scale: np.ndarray) -> None:
    """scale[per * g + j] = d_row[g]: one value per weight, so that the loops below index everything linearly.

    A load d[o, j >> 4] inside a loop that also stores defeats LLVM's vectorizer ("cannot identify array
    bounds": it cannot bound the aliasing of a non-affine index). `per` is an argument on purpose: with a
    constant 16, LLVM unrolls the inner loop and vectorizes the outer one with scatter stores (130 ns per
    2048-wide row instead of 67).
    """
    for g in range(d_row.shape[0]):
        s = d_row[g]
        base = per * g
        for j in range(per):
            scale[base + j] = s


@numba.njit(cache=True, error_model="numpy")
def _dequantize_q4(qs: np.ndarray, d: np.ndarray, m: np.ndarray, has_min: bool, row0: int, w: np.ndarray) -> None:
    """Rows row0 .. row0 + len(w) of a q4 matrix into w in split column order (see column_order): w[r, j] is
    byte j's low nibble, w[r, in/2 + j] its high nibble. Bit-exact with quant.dequantize (signed zeros too):
    q4_0 w = d * (q - 8), q4_1 w = d * q + m (d * q is exact, so a fused multiply-add rounds the same).
    Each half is its own loop over one-dimensional row views: with both stores in one loop LLVM cannot rule
    out that they overlap, and does not vectorize; the nibbles are split with integer and/shift."""
    half = qs.shape[1]
    per = half // d.shape[1]  # bytes per group (16)
    scale = np.empty(half, dtype=np.float32)  # (in/2,): the group scale of each byte
    offset = np.empty(half, dtype=np.float32)  # (in/2,): q4_1's group min of each byte
    for r in range(w.shape[0]):
        o = row0 + r
        q, low, high = qs[o], w[r, :half], w[r, half:]  # (in/2,) each
        _expand_scales(d[o], per, scale)
        if has_min:
            _expand_scales(m[o], per, offset)
            for j in range(half):
                low[j] = scale[j] * np.float32(q[j] & 15) + offset[j]
            for j in range(half):
                high[j] = scale[j] * np.float32(q[j] >> 4) + offset[j]
        else:
            for j in range(half):
                low[j] = scale[j] * np.float32(np.int32(q[j] & 15) - 8)
            for j in range(half):
                high[j] = scale[j] * np.float32(np.int32(q[j] >> 4) - 8)


@numba.njit(cache=True, error_model="numpy")
def _dequantize_q8(qs: np.ndarray, d: np.ndarray, row0: int, w: np.ndarray) -> None:
    """w[r] = d * q for rows row0 .. row0 + len(w) of a q8_0 matrix (columns in their own order)."""
    n_in = qs.shape[1]
    per = n_in // d.shape[1]  # weights per group (32)
    scale = np.empty(n_in, dtype=np.float32)  # (in,): the group scale of each weight
    for r in range(w.shape[0]):
        o = row0 + r
        q, row = qs[o], w[r]  # (in,) each
        _expand_scales(d[o], per, scale)
        for j in range(n_in):
            row[j] = np.float32(q[j]) * scale[j]


@numba.njit(cache=True)
def _split_x(x: np.ndarray, x_lo: np.ndarray, x_hi: np.ndarray, x_sum: np.ndarray) -> None:
    """x (in,) -> the halves of each group of 32 in byte order (x_lo, x_hi, each (in/2,)) and group sums (G,).

    One compiled call instead of four NumPy operations per matvec: decode of small models is bound by such
    per-call costs.
    """
    for g in range(x_sum.shape[0]):
        total = np.float32(0)
        for j in range(16):
            lo, hi = x[32 * g + j], x[32 * g + 16 + j]
            x_lo[16 * g + j], x_hi[16 * g + j] = lo, hi
            total += lo + hi
        x_sum[g] = total


def _offsets(qm: QuantizedMatrix) -> tuple[np.ndarray, np.float32]:
    """The per-group offset array and its factor: q4_0 has m = -8 d, q4_1 stores m."""
    if qm.kind == "q4_1":
        return qm.m, np.float32(1)
    return qm.d, np.float32(-8)


def matvec(qm: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """y = dequantize(qm) @ x for one token: x (in,) -> (out,), float32. Oracle: quant.matvec_ref."""
    out, n_in = qm.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty(out, dtype=np.float32)
    if qm.kind == "q8_0":
        _matvec_q8(qm.qs, qm.d, x, y)
        return y
    if qm.kind == "q6_k":
        _matvec_q6(qm.qs, qm.d, _plane_order(x[None])[0], y)
        return y
    x_lo = np.empty(n_in // 2, dtype=np.float32)  # (in/2,): the element each byte's low nibble multiplies
    x_hi = np.empty(n_in // 2, dtype=np.float32)  # (in/2,): ... and its high nibble
    x_sum = np.empty(n_in // GROUP, dtype=np.float32)  # (G,)
    _split_x(x, x_lo, x_hi, x_sum)
    m, m_scale = _offsets(qm)
    _matvec_q4(qm.qs, qm.d, m, m_scale, x_lo, x_hi, x_sum, y)
    return y


def column_order(qm: QuantizedMatrix) -> np.ndarray:
    """The input columns in the order dequantize_rows writes them: (in,) indices into the natural order.

    q4: the low nibbles of every byte, then the high nibbles (element 32g+j, then 32g+16+j, for byte 16g+j);
    q6_k: plane order, elements 8k + j of every group for k = 0, 1, 2, 3 in turn; q8_0: the natural order.
    matmul permutes x's columns to match once per call, so that the dequantization loops run linearly over bytes
    and columns.
    """
    return _ordered(np.arange(qm.shape[1])[None], qm.kind)[0]


def _ordered(x: np.ndarray, kind: str) -> np.ndarray:
    """x (T, in) with its columns in column_order for `kind`, C-contiguous."""
    if kind == "q8_0":
        return np.ascontiguousarray(x)
    return _plane_order(x) if kind == "q6_k" else _nibble_order(x)


def _plane_order(x: np.ndarray) -> np.ndarray:
    """x (T, in) in q6_k plane order, a new C-contiguous array: columns 8k + j of every group of 32 for each k."""
    T, n_in = x.shape
    return np.ascontiguousarray(x.reshape(T, n_in // GROUP, 4, 8).transpose(0, 2, 1, 3)).reshape(T, n_in)


def _nibble_order(x: np.ndarray) -> np.ndarray:
    """x (T, in) with its columns in q4 nibble order, as a new C-contiguous array: for each group of 32, its
    first 16 columns, then (after all groups) the other 16. A reshape copy: 2-3x faster than fancy indexing
    (192 x 2048: 0.17 ms instead of 0.38)."""
    T, n_in = x.shape
    halves = x.reshape(T, n_in // GROUP, 2, GROUP // 2).transpose(0, 2, 1, 3)  # (T, 2, G, 16) view
    return np.ascontiguousarray(halves).reshape(T, n_in)


def dequantize_rows(qm: QuantizedMatrix, row0: int, w: np.ndarray) -> None:
    """Fill w (R, in) with rows row0 .. row0 + R of dequantize(qm), columns in column_order(qm) (one thread).
    Oracle: quant.dequantize(qm)[row0:row0 + R][:, column_order(qm)], bit-exact."""
    if qm.kind == "q8_0":
        _dequantize_q8(qm.qs, qm.d, row0, w)
    elif qm.kind == "q6_k":
        _dequantize_q6(qm.qs, qm.d, row0, w)
    else:
        m, _ = _offsets(qm)
        _dequantize_q4(qm.qs, qm.d, m, qm.kind == "q4_1", row0, w)


def matmul(x: np.ndarray, qm: QuantizedMatrix, tile_rows: int = TILE_ROWS, y: np.ndarray | None = None
           ) -> np.ndarray:
    """y = x @ dequantize(qm).T: x (T, in) -> (T, out), float32, tile by tile, into `y` when given (a C-contiguous
    float32 (T, out), such as the vision tower's workspace). Oracle: quant.matmul_ref."""
    out, n_in = qm.shape
    x = np.asarray(x, dtype=np.float32)
    x = _ordered(x, qm.kind)  # (T, in) in the tile's column order
    if y is None or y.shape != (x.shape[0], out) or y.dtype != np.float32 or not y.flags.c_contiguous:
        y = np.empty((x.shape[0], out), dtype=np.float32)
    tile = np.empty((min(tile_rows, out), n_in), dtype=np.float32)  # (R, in)
    for row0 in range(0, out, tile_rows):
        w = tile[: min(tile_rows, out - row0)]
        dequantize_rows(qm, row0, w)
        np.matmul(x, w.T, out=y[:, row0 : row0 + w.shape[0]])  # (T, in) @ (in, R) -> (T, R)
    return y


def linear(x: np.ndarray, qm: QuantizedMatrix, out: np.ndarray | None = None) -> np.ndarray:
    """x @ W.T for x (in,) or (T, in): matvec for one token, tiled matmul otherwise (into `out` when it fits)."""
    if x.ndim == 1:
        return matvec(qm, x)
    if x.shape[0] == 1:
        return matvec(qm, x[0])[None]  # (1, in) -> (1, out)
    return matmul(x, qm, y=out)
