"""Numba kernels for quantized linear layers on int8 activations: integer dot products, as llama.cpp runs them.

Decode (one token): the activation vector is quantized once per call to int8 per block of 32, with q8_0's
rule (d = max|x| / 127, q = round(x / d), halves away from zero), then every weight row is multiplied in
integers, one int32 sum per block, scaled by d_w d_x in float32 (dot_ir.py: SDOT on ARM64, vpmaddwd /
vpdpwssd on x86-64). Per row o, with s[g] = d_x[g] * sum(q_x of block g) (q8_1's block sum):
    q8_0  y[o] = sum_g d[o,g] d_x[g] sum_j q[o,32g+j] q_x[32g+j]
    q4_0  y[o] = sum_g d[o,g] d_x[g] sum_j (n_j - b) q_x[..] + (b - 8) sum_g d[o,g] s[g]
    q4_1  y[o] = sum_g d[o,g] d_x[g] sum_j (n_j - b) q_x[..] + sum_g (m[o,g] + b d[o,g]) s[g]
with n_j a nibble and b = dot_ir.BIAS (8 on ARM, so q4_0 has no second term there; 0 on x86-64).
The kernels let LLVM reassociate float sums (as quant_numba.py's do): without it the second term's loop over the
blocks stays scalar, 40% of the q4_0 decode (9.3 against 4.0 cycles per block of 32 weights, one thread, a
matrix in cache, on the 2-core Xeon of the benchmarks).

Short inputs (2 .. backends.numpy.INT8_MAX_TOKENS tokens): the same, TOKENS tokens per pass over a weight row (its
bytes split once for all of them) and ROWS rows per work item. Measured on one core, q4_0 5632 x 2048: 33-37
GFLOP/s at 8 to 192 tokens, where dequantized tiles into BLAS (quant_numba.matmul) reach 15 at 8 tokens, 65 at
58 and 115 at 192; longer inputs therefore go to BLAS.

The oracle is quant.matvec_int8_ref, which does the same integer sums in float64, and quant.quantize_activations_ref
this quantizer's. The error against float32 activations is the activations' rounding, up to half a step d_x / 2
per element: tests/test_kernels_int8.py bounds it per matvec, tests/test_int8_activations.py on whole models.
"""
from __future__ import annotations

import functools

import numpy as np

from tinyvlm.kernels import _numba, dot_ir
from tinyvlm.kernels.quant import GROUP, QuantizedMatrix

numba = _numba.module()  # raises TinyVLMError, saying why, when numba cannot be used
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from tinyvlm.kernels.prefetch import PREFETCH_ROWS, prefetch_row as _prefetch_row  # noqa: E402
from tinyvlm.kernels.quant_numba import _FAST  # noqa: E402

FAMILY = dot_ir.target_family()  # the IR form compiled here; cached code is keyed by numba to the CPU
BIAS = dot_ir.BIAS[FAMILY]


def row_dot_intrinsic(kind: str, family: str = FAMILY, tokens: int = 1):
    """A Numba intrinsic dot(qs, d, o, xq, xl, t, y) that sets y[t + k, o] for k < tokens: row o of (qs, d)
    times the int8 activations of tokens t .. t + tokens - 1 (xq (T, in) in activation_order, xl (T, G L) their
    block scales), in the IR form of `family` (the tests compile the other family's form too: both are generic
    IR that runs anywhere). The arrays must be C-contiguous."""

    @intrinsic
    def row_dot(typingctx, qs, d, o, xq, xl, t, y):
        if not all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 2 for a in (qs, d, xq, xl, y)):
            return None
        sig = types.void(qs, d, o, xq, xl, t, y)

        def codegen(context, builder, signature, args):
            qs_t, d_t, o_t, xq_t, xl_t, t_t, y_t = signature.args
            qs_a, d_a, xq_a, xl_a, y_a = (context.make_array(signature.args[i])(context, builder, args[i])
                                          for i in (0, 1, 3, 4, 6))
            row = context.cast(builder, args[2], o_t, types.intp)
            token = context.cast(builder, args[5], t_t, types.intp)
            zero = context.get_constant(types.intp, 0)

            def pointer(ty, a, i, j):
                return cgutils.get_item_pointer(context, builder, ty, a, [i, j], wraparound=False)

            def width(a):
                return cgutils.unpack_tuple(builder, a.shape, 2)[1]

            fn = dot_ir.row_dot(builder.module, kind, family, tokens)
            i8p = dot_ir.I8.as_pointer()
            blocks = builder.sdiv(width(d_a), context.get_constant(types.intp, dot_ir.scales_per_block(kind)))
            builder.call(fn, [builder.bitcast(pointer(qs_t, qs_a, row, zero), i8p), pointer(d_t, d_a, row, zero),
                              builder.bitcast(pointer(xq_t, xq_a, token, zero), i8p), width(xq_a),
                              pointer(xl_t, xl_a, token, zero), width(xl_a),
                              pointer(y_t, y_a, token, row), width(y_a), blocks])
            return context.get_dummy_value()

        return sig, codegen

    return row_dot


TOKENS = 4  # tokens a weight row is multiplied with per pass over it (prefill): its bytes are split once for all
ROWS = 16  # rows per parallel work item: a tile of rows meets each tile of tokens while both are in cache
_dot_q4, _dot_q4_tile = row_dot_intrinsic("q4"), row_dot_intrinsic("q4", tokens=TOKENS)
_dot_q8, _dot_q8_tile = row_dot_intrinsic("q8_0"), row_dot_intrinsic("q8_0", tokens=TOKENS)
_dot_q6, _dot_q6_tile = row_dot_intrinsic("q6_k"), row_dot_intrinsic("q6_k", tokens=TOKENS)


@numba.njit(cache=True, error_model="numpy", inline="always")
def _quantize_block(x: np.ndarray, q: np.ndarray) -> tuple[np.float32, int]:
    """One block of 32 activations x to int8 q with q8_0's rule; returns (its scale d, the sum of q)."""
    amax = np.float32(0)
    for j in range(GROUP):
        amax = max(amax, abs(x[j]))
    d = amax / np.float32(127)
    inv = np.float32(1) / d if d != 0 else np.float32(0)
    total = 0
    for j in range(GROUP):
        v = x[j] * inv
        a = abs(v)
        r = np.floor(a)
        r += np.float32(1) if a - r >= np.float32(0.5) else np.float32(0)  # round half away from zero
        q[j] = np.int32(r) if v >= 0 else -np.int32(r)
        total += q[j]
    return d, total


@numba.njit(cache=True, error_model="numpy")
def _quantize_activations(x: np.ndarray, where: np.ndarray, xq: np.ndarray, xl: np.ndarray, xs: np.ndarray) -> None:
    """x (T, in) float32 -> xq (T, in) int8 with element k at where[k], xl (T, G L) each block's scale L times,
    xs (T, G) = scale * sum(xq) per block."""
    per = xl.shape[1] // xs.shape[1]
    q = np.empty(GROUP, dtype=np.int8)
    for t in range(x.shape[0]):
        for g in range(xs.shape[1]):
            d, total = _quantize_block(x[t, GROUP * g:GROUP * g + GROUP], q)
            for j in range(GROUP):
                xq[t, where[GROUP * g + j]] = q[j]
            xl[t, per * g:per * g + per] = d
            xs[t, g] = d * np.float32(total)


@numba.njit(cache=True, fastmath=_FAST, inline="always")
def _add_offset(m: np.ndarray, d: np.ndarray, m_scale: np.float32, d_scale: np.float32, xs: np.ndarray, o: int,
                t: int, y: np.ndarray) -> None:
    """y[t, o] += sum_g (m_scale m[o,g] + d_scale d[o,g]) xs[t, g]: the q4 offset times the block sums."""
    offset = np.float32(0)
    for g in range(d.shape[1]):
        offset += (m_scale * m[o, g] + d_scale * d[o, g]) * xs[t, g]
    y[t, o] += offset


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _matmul_q4(qs: np.ndarray, d: np.ndarray, m: np.ndarray, m_scale: np.float32, d_scale: np.float32,
               has_offset: bool, xq: np.ndarray, xl: np.ndarray, xs: np.ndarray, y: np.ndarray) -> None:
    """y[t, o] = dot(row o, token t) + sum_g (m_scale m[o,g] + d_scale d[o,g]) xs[t, g] (the sum when has_offset)."""
    n_tokens, out = xq.shape[0], qs.shape[0]
    tiled = n_tokens - n_tokens % TOKENS
    if n_tokens == 1:  # decode: stream the rows, prefetching ahead
        for o in numba.prange(out):
            _prefetch_row(qs, o + PREFETCH_ROWS)
            _prefetch_row(d, o + PREFETCH_ROWS)
            _dot_q4(qs, d, o, xq, xl, 0, y)
            if has_offset:
                _add_offset(m, d, m_scale, d_scale, xs, o, 0, y)
        return
    for first in numba.prange((out + ROWS - 1) // ROWS):  # ROWS rows at a time: their bytes stay in cache
        rows = range(first * ROWS, min(out, first * ROWS + ROWS))
        for t in range(0, tiled, TOKENS):  # TOKENS tokens at a time: their activations stay in cache
            for o in rows:
                _dot_q4_tile(qs, d, o, xq, xl, t, y)
        for t in range(tiled, n_tokens):
            for o in rows:
                _dot_q4(qs, d, o, xq, xl, t, y)
        if has_offset:
            for o in rows:
                for t in range(n_tokens):
                    _add_offset(m, d, m_scale, d_scale, xs, o, t, y)


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _matmul_q8(qs: np.ndarray, d: np.ndarray, six_bit: bool, xq: np.ndarray, xl: np.ndarray, y: np.ndarray) -> None:
    """y[t, o] = dot(row o, token t) of a q8_0 matrix (q6_k's when six_bit); rows and tokens in tiles as in
    _matmul_q4."""
    n_tokens, out = xq.shape[0], qs.shape[0]
    tiled = n_tokens - n_tokens % TOKENS
    if n_tokens == 1:
        for o in numba.prange(out):
            _prefetch_row(qs, o + PREFETCH_ROWS)
            _prefetch_row(d, o + PREFETCH_ROWS)
            if six_bit:
                _dot_q6(qs, d, o, xq, xl, 0, y)
            else:
                _dot_q8(qs, d, o, xq, xl, 0, y)
        return
    for first in numba.prange((out + ROWS - 1) // ROWS):
        rows = range(first * ROWS, min(out, first * ROWS + ROWS))
        for t in range(0, tiled, TOKENS):
            for o in rows:
                if six_bit:
                    _dot_q6_tile(qs, d, o, xq, xl, t, y)
                else:
                    _dot_q8_tile(qs, d, o, xq, xl, t, y)
        for t in range(tiled, n_tokens):
            for o in rows:
                if six_bit:
                    _dot_q6(qs, d, o, xq, xl, t, y)
                else:
                    _dot_q8(qs, d, o, xq, xl, t, y)


@functools.cache
def where(kind: str, n_in: int, family: str = FAMILY) -> np.ndarray:
    """(in,) int64: where the kernel reads element k of the activations (the inverse of dot_ir.activation_order)."""
    positions = np.empty(n_in, dtype=np.int64)
    positions[dot_ir.activation_order(family, kind, n_in)] = np.arange(n_in)
    return positions


def quantize_activations(x: np.ndarray, kind: str = "q8_0", family: str = FAMILY
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, in) or (in,) -> (xq int8 (T, in) in the order the `kind` kernel reads, xl float32 (T, G L) the
    block scales, each repeated L = dot_ir.lanes_per_block times, xs float32 (T, G) scale * sum per block).
    Oracle: quant.quantize_activations_ref (one token, natural order, one scale a block)."""
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    n_tokens, n_in = x.shape
    xq = np.empty((n_tokens, n_in), dtype=np.int8)
    xs = np.empty((n_tokens, n_in // GROUP), dtype=np.float32)
    xl = np.empty((n_tokens, xs.shape[1] * dot_ir.lanes_per_block(family, kind)), dtype=np.float32)
    _quantize_activations(x, where(kind, n_in, family), xq, xl, xs)
    return xq, xl, xs


def _offset_terms(qm: QuantizedMatrix) -> tuple[np.ndarray, np.float32, np.float32, bool]:
    """(m, m_scale, d_scale, has_offset) for the q4 kernel: the offset coefficient is m_scale m + d_scale d."""
    if qm.kind == "q4_1":
        return qm.m, np.float32(1), np.float32(BIAS), True
    return qm.d, np.float32(0), np.float32(BIAS - 8), BIAS != 8


def matmul_quantized(qm: QuantizedMatrix, xq: np.ndarray, xl: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """y = q8(x) W'^T for activations already quantized: (T, in) int8 -> (T, out) float32.
    Oracle: quant.matvec_int8_ref per token."""
    y = np.empty((xq.shape[0], qm.shape[0]), dtype=np.float32)
    if qm.kind in ("q8_0", "q6_k"):
        _matmul_q8(qm.qs, qm.d, qm.kind == "q6_k", xq, xl, y)
    else:
        m, m_scale, d_scale, has_offset = _offset_terms(qm)
        _matmul_q4(qm.qs, qm.d, m, m_scale, d_scale, has_offset, xq, xl, xs, y)
    return y


def matmul(x: np.ndarray, qm: QuantizedMatrix) -> np.ndarray:
    """y = q8(x) W'^T: x (T, in) float32 -> (T, out), each token quantized to int8 per block of 32 first."""
    return matmul_quantized(qm, *quantize_activations(x, qm.kind))


def matvec(qm: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """y = W' q8(x) for one token: x (in,) float32 -> (out,)."""
    return matmul(x[None], qm)[0]
