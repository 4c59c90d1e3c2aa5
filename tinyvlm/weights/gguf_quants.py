"""GGUF tensor types: the block table and vectorised NumPy dequantizers for the types tinyvlm reads.

The block layouts are ggml's (ggml-common.h, `block_q4_0` ... `block_q6_K`) and the arithmetic is that of its
reference dequantizers (ggml-quants.c, `dequantize_row_*`), step for step in float32, so the results are
bit-exact with the `gguf` package's Python dequantizers (tests/test_weights_gguf.py checks every type on random blocks).
A type is a block of `block_size` values stored in `type_size` bytes; all scales are little-endian float16.

    Q8_0  34 B / 32    d, 32 x int8                         w = d * q
    Q4_0  18 B / 32    d, 16 bytes of nibbles               w = d * (q - 8)
    Q4_1  20 B / 32    d, m, 16 bytes of nibbles            w = d * q + m
    Q5_0  22 B / 32    d, 4 B of fifth bits, 16 B of nibbles  w = d * (q - 16)   (llama.cpp's fallback in K-quant
    Q5_1  24 B / 32    d, m, 4 B of fifth bits, 16 B nibbles  w = d * q + m       files for rows not of 256)
    Q4_K 144 B / 256   d, dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32, 128 B of nibbles
                                                            w = (d * sc) * q - (dmin * mn)
    Q5_K 176 B / 256   as Q4_K plus 32 B holding the fifth bit of each value
    Q6_K 210 B / 256   128 B low nibbles, 64 B high 2-bit pairs, 16 x int8 scales (one per 16 values), d
                                                            w = (d * sc) * (q - 32)
In a 32-value block of Q4_0/Q4_1, byte j holds value j (low nibble) and value j + 16 (high nibble). In the
K-quants, each 64 values share 32 bytes: sub-block 2k takes their low nibbles, sub-block 2k + 1 the high ones.

Q4_K is q4_1 with its group scales and mins quantized against the super-block's d and dmin, so it becomes our q4_1
exactly (q4_k_groups: scale d * sc and min -(dmin * mn), the float32 products ggml's dequantizer forms; the nibbles
re-laid-out), and runs on q4_1's kernels. Q6_K becomes our q6_k (q6_k_groups: the 6-bit values regrouped by 32, d *
sc per 16 values), which has kernels of its own. Q5_K is converted once at load: dequantized, then requantized to
our q8_0 (tinyvlm.kernels.quant), as is Q5_1; Q5_0 is q8_0 exactly (q5_0_values). Measured on Gaussian rows (4096 x
4096, quantized by ggml's own quantizer), relative RMS error against the float weights, had each been requantized:
    Q4_K 0.0714   -> q8_0 0.0715   -> q4_1 0.0842   -> q4_0 0.1099   (as q4_1: nothing added)
    Q5_K 0.0361   -> q8_0 0.0365   -> q4_1 0.0845   -> q4_0 0.0934
    Q6_K 0.0177   -> q8_0 0.0186   -> q4_1 0.0802   -> q4_0 0.0891   (as q6_k: nothing added)
    (float -> q8_0 0.0054, -> q4_1 0.0782, -> q4_0 0.0859 directly)
q8_0 keeps a K-quant's accuracy (it adds an error of 0.0053 RMS, its own step) at about 1.9x the bytes of
Q4_K; q4_0 adds half again to Q4_K's error and q4_1 a sixth.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tinyvlm.errors import WeightsError

QK_K = 256  # values per K-quant super-block
GROUP = 32  # values per group of the kernels' formats (kernels/quant.py)


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: `block_size` values are stored in `type_size` bytes."""

    name: str
    type_id: int
    block_size: int
    type_size: int


# ggml_type ids (ggml.h) of the types tinyvlm reads.
SUPPORTED = {
    t.type_id: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("Q4_0", 2, 32, 2 + 16),
        GGMLType("Q4_1", 3, 32, 2 + 2 + 16),
        GGMLType("Q5_0", 6, 32, 2 + 4 + 16),
        GGMLType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
        GGMLType("Q8_0", 8, 32, 2 + 32),
        GGMLType("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),
        GGMLType("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        GGMLType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
        GGMLType("BF16", 30, 1, 2),
    )
}
BY_NAME = {t.name: t for t in SUPPORTED.values()}

# Names of the other ggml_type ids, so that an error can say what a file holds instead of a bare number.
OTHER_TYPE_NAMES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, widened: (n, bytes) -> (n, 1) float32."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """(n, k*width) bytes -> (n, 2k, width): for each run of `width` bytes, its low nibbles then its high ones."""
    runs = qs.reshape(qs.shape[0], -1, 1, width)  # (n, k, 1, width)
    return (runs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1) & np.uint8(15)).reshape(
        qs.shape[0], -1, width
    )  # (n, 2k, width)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of Q4_K/Q5_K scales -> 8 six-bit scales and 8 six-bit mins per block, as float32.

    Bytes 0-3 and 4-7 hold scales 0-3 and mins 0-3 in their low 6 bits; byte 8+j holds the low 4 bits of
    scale 4+j (low nibble) and min 4+j (high nibble), whose top 2 bits are the top bits of bytes j and 4+j.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # (n, 4) each
    scales = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)  # (n, 8)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)  # (n, 8)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)  # (n, 1)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d  # (n, 32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16).reshape(-1, 32)  # (n, 32)
    return d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:], 16).reshape(-1, 32)  # (n, 32)
    return d * q.astype(np.float32) + m


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """Q5_0 / Q5_1: the little-endian 32-bit word at byte `start` holds bit 4 of value i at bit i: (n, 32) 0 or 16."""
    qh = np.ascontiguousarray(blocks[:, start:start + 4]).view("<u4")  # (n, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8) << np.uint8(4)


def _q5_0_values(blocks: np.ndarray) -> np.ndarray:
    """(n, 22) Q5_0 blocks -> (n, 32) int8 values q - 16."""
    q = _nibbles(blocks[:, 6:], 16).reshape(-1, 32) | _fifth_bits(blocks, 2)  # (n, 32) 0..31
    return q.astype(np.int8) - np.int8(16)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * _q5_0_values(blocks).astype(np.float32)


def _blocks_of(raw: np.ndarray, shape: tuple[int, int], type_name: str) -> np.ndarray:
    """A weight's bytes (uint8, rows of whole blocks) for `shape` (out, in) as (blocks, type_size); a WeightsError
    when they do not fit."""
    t = BY_NAME[type_name]
    size = nbytes(type_name, shape[0] * shape[1])
    if shape[1] % t.block_size or raw.dtype != np.uint8 or raw.size != size:
        raise WeightsError(f"{type_name} data for shape {shape} needs {size} bytes in blocks of {t.block_size} "
                           f"inputs, got {raw.size} of dtype {raw.dtype}")
    return np.ascontiguousarray(raw).reshape(-1, t.type_size)


def q5_0_values(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A Q5_0 weight (out, in) from its bytes: (values q - 16, int8 (out, in); d, float32 (out, in/32)), which are
    q8_0's own arrays for the same numbers (kernels/quant.from_gguf_tensor). Q5_0 is what llama.cpp's K-quant files
    hold for rows whose length is not a multiple of 256."""
    out, n_in = shape
    blocks = _blocks_of(raw, shape, "Q5_0")  # (out * in/32, 22)
    return _q5_0_values(blocks).reshape(out, n_in), _f16(blocks, 0).reshape(out, -1)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:], 16).reshape(-1, 32) | _fifth_bits(blocks, 4)  # (n, 32)
    return d * q.astype(np.float32) + m


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:], 32).astype(np.float32)  # (n, 8, 32)
    return ((d * scales)[..., None] * q - (dmin * mins)[..., None]).reshape(n, QK_K)


def q4_k_groups(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_K weight (out, in) from its bytes, group by group of 32: (q uint8 (out, in/32, 32) 0..15 in value order,
    scale d * sc and min -(dmin * mn), float32 (out, in/32) each): w = scale * q + min, q4_1's own form."""
    out, n_in = shape
    blocks = _blocks_of(raw, shape, "Q4_K")  # (out * in/256, 144)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1) each
    scales, mins = _k_scales(blocks[:, 4:16])  # (n, 8) each
    q = _nibbles(blocks[:, 16:], 32)  # (n, 8, 32)
    return q.reshape(out, -1, GROUP), (d * scales).reshape(out, -1), (-(dmin * mins)).reshape(out, -1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # (n, 32): bit s of byte l is the fifth bit of value l of sub-block s
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)  # (n, 8, 32)
    q = (_nibbles(blocks[:, 48:], 32) | (high << np.uint8(4))).astype(np.float32)  # (n, 8, 32)
    return ((d * scales)[..., None] * q - (dmin * mins)[..., None]).reshape(n, QK_K)


def _q6_k_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 210) Q6_K blocks -> (q (n, 256) uint8 0..63 in value order, d * sc (n, 16) float32, one per 16 values).

    Each half (128 values) has 64 low-nibble bytes and 32 high bytes; its 4 runs of 32 values take (low nibbles of
    bytes 0-31, of 32-63, high nibbles of 0-31, of 32-63) and bit pairs 0, 1, 2, 3 of qh."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 2, 32)  # (n, half, 1, bytes 0-31 | 32-63, 32)
    shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
    low = (ql >> shifts & np.uint8(15)).reshape(n, 2, 4, 32)  # (n, half, run, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)  # (n, 2, 4, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    return (low | (high << np.uint8(4))).reshape(n, QK_K), _f16(blocks, 208) * scales


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    q, scales = _q6_k_parts(blocks)
    values = (q.astype(np.int8) - np.int8(32)).astype(np.float32).reshape(-1, 16, 16)
    return (scales[..., None] * values).reshape(-1, QK_K)


def q6_k_groups(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A Q6_K weight (out, in) from its bytes: (q uint8 (out, in/32, 32) 0..63 in value order, d * sc float32
    (out, in/16), one per 16 values, an exact product): w = (d * sc) * (q - 32)."""
    out, n_in = shape
    q, scales = _q6_k_parts(_blocks_of(raw, shape, "Q6_K"))
    return q.reshape(out, -1, GROUP), scales.reshape(out, -1)


def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32)


def _f16_values(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (blocks.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


_DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _f32, "F16": _f16_values, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
    "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def nbytes(type_name: str, n_values: int) -> int:
    """Bytes that `n_values` values of a type take (n_values must be a whole number of blocks)."""
    t = BY_NAME[type_name]
    return n_values // t.block_size * t.type_size


# Values dequantized per step: a K-quant's NumPy dequantizer holds a few float32 temporaries of its input's size,
# which for a Q4_K_M file's token_embd (32000 x 2048) were 0.8 GB at once, the peak of its whole load.
CHUNK_VALUES = 1 << 20


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of `shape` from a tensor's bytes (uint8, C order, last axis = ggml's ne[0])."""
    t = BY_NAME[type_name]
    n_values = int(np.prod(shape, dtype=np.int64))
    if raw.dtype != np.uint8 or raw.size != nbytes(type_name, n_values) or n_values % t.block_size:
        raise ValueError(f"{type_name} data for shape {shape} needs {nbytes(type_name, n_values)} bytes, "
                         f"got {raw.size} of dtype {raw.dtype}")
    blocks = np.ascontiguousarray(raw).reshape(-1, t.type_size)  # (blocks, type_size)
    values = np.empty(n_values, dtype=np.float32)
    step = max(1, CHUNK_VALUES // t.block_size)  # blocks per chunk
    for first in range(0, blocks.shape[0], step):  # the dequantizers' float temporaries stay a chunk's size
        values[first * t.block_size:(first + step) * t.block_size] = _DEQUANTIZERS[type_name](
            blocks[first:first + step]).reshape(-1)
    return values.reshape(shape)
