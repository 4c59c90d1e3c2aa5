"""Prefill on int8 activations: quantized weights times many tokens with integer multiply-adds (gemm_ir.py).

    y (T, out) = q8(x) (T, in) W'^T, W' a q4_0 / q4_1 / q8_0 / q6_k matrix

Per call: the tokens are quantized to int8 per block of 32 (q8_0's rule, as for decode) and laid out as int16
panels of 16 tokens (gemm_ir's layout, zero tokens padding the last). Per work item of ROWS weight rows: the rows
are expanded once into int16 (gemm_ir's integers, in its column order: q4 nibble order, q6_k plane order), then
multiplied with every panel, PANELS at a time, in registers. Nothing as large as the weights is written: a row's
expansion is 2 bytes a weight, in the cache, against the float32 tiles of quant_numba.matmul.

Oracle: quant.matvec_int8_ref per token (exact integer block sums in float64).
"""
from __future__ import annotations

import functools

import numpy as np

from tinyvlm.kernels import _numba, gemm_ir
from tinyvlm.kernels.quant import GROUP, QuantizedMatrix

numba = _numba.module()  # raises TinyVLMError, saying why, when numba cannot be used
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from tinyvlm.kernels.quant_int8 import _quantize_block  # noqa: E402
from tinyvlm.kernels.quant_numba import _ordered  # noqa: E402

ROWS, PANELS = 6, 2  # the register tile: weight rows x panels of 16 tokens (28 of the 32 vector registers)
LANES = gemm_ir.LANES
BLOCK_BYTES = 1 << 20  # token panels met by each weight row group in one pass: half a core's L2 cache


TILES = ((ROWS, PANELS), (ROWS, 1), (1, 1))  # the register tiles a call chooses from, by index


def tile_intrinsic(kind: str):
    """A Numba intrinsic tile(which, w, d, m, o, xp, xd, xs, p, out): with (rows, panels) = TILES[which],
    out (rows * panels * 16,) = rows 0 .. rows - 1 of the expanded w (int16, (rows or more, in)), scaled by d and
    m rows o .., times panels p .. p + panels - 1. The arrays must be C-contiguous."""

    @intrinsic
    def tile(typingctx, which, w, d, m, o, xp, xd, xs, p, out):
        sig = types.void(which, w, d, m, o, xp, xd, xs, p, out)

        def codegen(context, builder, signature, args):
            arrays = {i: context.make_array(signature.args[i])(context, builder, args[i])
                      for i in (1, 2, 3, 5, 6, 7, 9)}
            choice = context.cast(builder, args[0], signature.args[0], types.intp)
            row = context.cast(builder, args[4], signature.args[4], types.intp)
            panel = context.cast(builder, args[8], signature.args[8], types.intp)
            zero = context.get_constant(types.intp, 0)

            def pointer(i, *index):
                return cgutils.get_item_pointer(context, builder, signature.args[i], arrays[i], list(index),
                                                wraparound=False)

            def width(i):
                return cgutils.unpack_tuple(builder, arrays[i].shape, arrays[i].shape.type.count)[-1]

            operands = [pointer(1, zero, zero), width(1), pointer(2, row, zero), width(2), pointer(3, row, zero),
                        pointer(5, panel, zero), width(5), pointer(6, panel, zero), width(6), pointer(7, panel, zero),
                        pointer(9, zero), width(1)]
            done = builder.append_basic_block("tile.done")
            switch = builder.switch(choice, done)
            for index, (rows, panels) in enumerate(TILES):
                case = builder.append_basic_block(f"tile.{index}")
                switch.add_case(context.get_constant(types.intp, index), case)
                builder.position_at_end(case)
                builder.call(gemm_ir.gemm_tile(builder.module, kind, rows, panels), operands)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_TILE_Q4_0, _TILE_Q4_1, _TILE_Q8_0, _TILE_Q6_K = (tile_intrinsic(k) for k in ("q4_0", "q4_1", "q8_0", "q6_k"))
KIND_CODES = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q6_k": 3}


@numba.njit(cache=True, inline="always")
def _expand_q4(qs: np.ndarray, o: int, bias: int, w: np.ndarray) -> None:
    """Row o of a q4 matrix into w (in,) int16 in nibble order: low nibbles, then high ones, less bias."""
    half = qs.shape[1]
    q, low, high = qs[o], w[:half], w[half:]
    for j in range(half):
        low[j] = np.int16(q[j] & 15) - bias
    for j in range(half):
        high[j] = np.int16(q[j] >> 4) - bias


@numba.njit(cache=True, inline="always")
def _expand_q8(qs: np.ndarray, o: int, w: np.ndarray) -> None:
    q = qs[o]
    for j in range(w.shape[0]):
        w[j] = q[j]


@numba.njit(cache=True, inline="always")
def _expand_q6(qs: np.ndarray, o: int, w: np.ndarray) -> None:
    """Row o of a q6_k matrix into w (in,) int16 in plane order (quarter k of every block in turn), less 32."""
    n = w.shape[0] // 4
    low, odd, high = qs[o, :n], qs[o, n:2 * n], qs[o, 2 * n:]
    q0, q1, q2, q3 = w[:n], w[n:2 * n], w[2 * n:3 * n], w[3 * n:]
    for j in range(n):
        q0[j] = np.int16((low[j] & 15) | ((high[j] & 3) << 4)) - 32
    for j in range(n):
        q1[j] = np.int16((odd[j] & 15) | ((high[j] >> 2 & 3) << 4)) - 32
    for j in range(n):
        q2[j] = np.int16((low[j] >> 4) | ((high[j] >> 4 & 3) << 4)) - 32
    for j in range(n):
        q3[j] = np.int16((odd[j] >> 4) | ((high[j] >> 6) << 4)) - 32


@numba.njit(cache=True, inline="always")
def _expand(code: int, qs: np.ndarray, o: int, w: np.ndarray) -> None:
    if code == 0:
        _expand_q4(qs, o, 8, w)
    elif code == 1:
        _expand_q4(qs, o, 0, w)
    elif code == 2:
        _expand_q8(qs, o, w)
    else:
        _expand_q6(qs, o, w)


@numba.njit(cache=True, inline="always")
def _tile(code: int, which: int, w, d, m, o, xp, xd, xs, p, out) -> None:
    if code == 0:
        _TILE_Q4_0(which, w, d, m, o, xp, xd, xs, p, out)
    elif code == 1:
        _TILE_Q4_1(which, w, d, m, o, xp, xd, xs, p, out)
    elif code == 2:
        _TILE_Q8_0(which, w, d, m, o, xp, xd, xs, p, out)
    else:
        _TILE_Q6_K(which, w, d, m, o, xp, xd, xs, p, out)


@numba.njit(cache=True, inline="always")
def _scatter(tmp: np.ndarray, rows: int, n_p: int, o0: int, p: int, y: np.ndarray) -> None:
    """y[16 (p + q) + t, o0 + r] = tmp[(r n_p + q) 16 + t] for the tokens of y (a tile's results, token-major)."""
    for q in range(n_p):
        for t in range(LANES):
            token = (p + q) * LANES + t
            if token < y.shape[0]:
                for r in range(rows):
                    y[token, o0 + r] = tmp[(r * n_p + q) * LANES + t]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _quantize_tokens(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    """quant_int8's quantizer, in natural column order, the tokens in parallel: xq (T, in) int8, xd (T, G) block
    scales, xs (T, G) scale * block sum."""
    for t in numba.prange(x.shape[0]):
        for g in range(xd.shape[1]):
            d, total = _quantize_block(x[t, GROUP * g:GROUP * g + GROUP], xq[t, GROUP * g:GROUP * g + GROUP])
            xd[t, g] = d
            xs[t, g] = d * np.float32(total)


@numba.njit(parallel=True, cache=True)
def _to_panels(xq: np.ndarray, order: np.ndarray, xp: np.ndarray) -> None:
    """xq (T, in) int8 -> xp (P, in 16) int16: kernel column c = natural column order[c]; column pair kp of token t
    at panel t // 16, 32 kp + 2 (t % 16). Written in order, 16 rows read side by side (token by token, each store
    would touch another cache line)."""
    n_tokens = xq.shape[0]
    for panel in numba.prange(xp.shape[0]):
        out = xp[panel]
        for t in range(panel * LANES, min(n_tokens, panel * LANES + LANES)):
            row, lane = xq[t], 2 * (t - panel * LANES)
            for kp in range(xq.shape[1] // 2):
                out[kp * 2 * LANES + lane] = row[order[2 * kp]]
                out[kp * 2 * LANES + lane + 1] = row[order[2 * kp + 1]]


@numba.njit(parallel=True, cache=True)
def _gemm(code: int, qs: np.ndarray, d: np.ndarray, m: np.ndarray, xp: np.ndarray, xd: np.ndarray, xs: np.ndarray,
          y: np.ndarray, threads: int) -> None:
    """y (T, out) = the weight rows times the token panels (tokens past T, the last panel's padding, dropped).
    One contiguous range of row groups per thread (more, smaller work items measured no faster); each group's rows
    are expanded once per block of panels, then meet every panel of it."""
    out, n_in, n_panels = d.shape[0], xp.shape[1] // LANES, xp.shape[0]
    groups = (out + ROWS - 1) // ROWS
    chunks = min(groups, threads)
    block = max(PANELS, BLOCK_BYTES // (n_in * 2 * LANES) // PANELS * PANELS)  # panels per block
    for c in numba.prange(chunks):
        w = np.zeros((ROWS, n_in), dtype=np.int16)  # (ROWS, in): the group's rows as integers
        tmp = np.empty(ROWS * PANELS * LANES, dtype=np.float32)
        for first in range(0, n_panels, block):  # bounds the panels read per row group for long inputs; at up to
            last = min(n_panels, first + block)  # 577 tokens (1-5 blocks) it measured no faster nor slower
            for group in range(c * groups // chunks, (c + 1) * groups // chunks):
                o0 = group * ROWS
                n_rows = min(ROWS, out - o0)
                for r in range(n_rows):
                    _expand(code, qs, o0 + r, w[r])
                p = first
                while p < last:
                    n_p = PANELS if p + PANELS <= last else 1
                    if n_rows == ROWS:
                        _tile(code, 0 if n_p == PANELS else 1, w, d, m, o0, xp, xd, xs, p, tmp)
                        _scatter(tmp, ROWS, n_p, o0, p, y)
                    else:  # the last rows, one at a time (d and m have no rows past the end)
                        for r in range(n_rows):
                            for q in range(n_p):
                                _tile(code, 2, w[r:r + 1], d, m, o0 + r, xp, xd, xs, p + q, tmp)
                                _scatter(tmp, 1, 1, o0 + r, p + q, y)
                    p += n_p


def _zeros_aligned(shape: tuple[int, int], dtype: type) -> np.ndarray:
    """np.zeros(shape, dtype) starting at a multiple of 64 bytes (NumPy guarantees 16): the kernel's 64-byte
    loads then never straddle two cache lines (16 or 32 bytes off, the kernel measured 7-9% slower)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


@functools.cache
def kernel_order(kind: str, n_in: int) -> np.ndarray:
    """(in,) int64: the natural input column of each kernel column (q4 nibble order, q6_k plane order)."""
    return np.ascontiguousarray(_ordered(np.arange(n_in, dtype=np.int64)[None], kind)[0])


def panels(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, in) float32 -> (xp int16 (P, in 16), xd float32 (P, G 16), xs (P, G 16)): the tokens quantized to
    int8 per block of 32 (quant_int8's quantizer), in the kernel's column order, 16 to a panel (zero tokens after
    the last): gemm_ir's layout."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tokens, n_in = x.shape
    n_panels = -(-n_tokens // LANES)
    blocks = n_in // GROUP
    xq = np.empty((n_tokens, n_in), dtype=np.int8)
    xd = np.zeros((n_panels * LANES, blocks), dtype=np.float32)
    xs = np.zeros((n_panels * LANES, blocks), dtype=np.float32)
    _quantize_tokens(x, xq, xd[:n_tokens], xs[:n_tokens])
    xp = _zeros_aligned((n_panels, n_in * LANES), np.int16)  # each 64-byte load within one cache line
    _to_panels(xq, kernel_order(kind, n_in), xp)

    def lanes(v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(v.reshape(n_panels, LANES, blocks).transpose(0, 2, 1)).reshape(n_panels, -1)

    return xp, lanes(xd), lanes(xs)


def matmul(x: np.ndarray, qm: QuantizedMatrix, y: np.ndarray | None = None) -> np.ndarray:
    """y = q8(x) W'^T: x (T, in) float32 -> (T, out) float32, into `y` when given (a C-contiguous float32 (T, out)).
    Oracle: quant.matvec_int8_ref per token."""
    x = np.atleast_2d(x)
    xp, xd, xs = panels(x, qm.kind)
    if y is None or y.shape != (x.shape[0], qm.shape[0]) or y.dtype != np.float32 or not y.flags.c_contiguous:
        y = np.empty((x.shape[0], qm.shape[0]), dtype=np.float32)
    m = qm.m if qm.m is not None else qm.d
    _gemm(KIND_CODES[qm.kind], qm.qs, qm.d, m, xp, xd, xs, y, numba.get_num_threads())
    return y
