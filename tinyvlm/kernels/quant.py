"""Group-wise quantized linear weights, NumPy reference: formats, (de)quantization, matvec and matmul.

The block semantics are GGUF's (ggml-quants.c, as mirrored bit-exactly by the `gguf` package's Python
quants), so that llama.cpp files load without requantizing. A weight W (out, in) is cut along `in` into
groups of GROUP = 32 values; each group keeps a float16 scale d (and for q4_1 a float16 min m):
    q4_0  w = d * (q - 8)   q in 0..15    d = (the value of largest magnitude) / -8
    q4_1  w = d * q + m     q in 0..15    d = (max - min) / 15, m = min
    q8_0  w = d * q         q in -127..127 d = max|w| / 127, q rounded half away from zero
The quantizer works with the float32 d and stores it rounded to float16, exactly as ggml does. One more kind is
read from GGUF files only (Q6_K: from_gguf_tensor), never made here:
    q6_k  w = d * (q - 32)  q in 0..63     d per 16 values: the file's d * (its int8 sub-scale), exact in float32

In-memory layout (what the Numba kernels read; converted from GGUF blocks once, at load):
    qs  q4: uint8 (out, in/2), GGUF in-block order: byte j of group g holds element 32g+j in the low
            nibble and element 32g+j+16 in the high nibble;  q8: int8 (out, in)
        q6_k: uint8 (out, 3 in/4), three planes of in/4 bytes a row, 8 bytes a group in each: byte j of group g in
            plane 0 holds the low 4 bits of element 32g+j (low nibble) and 32g+16+j (high), in plane 1 those of
            32g+8+j and 32g+24+j, and in plane 2 the top 2 bits of 32g+8k+j at bits 2k..2k+1 (k = 0..3); so
            every kernel reads the three planes linearly
    d   float32 (out, in/32)  the float16 scale, widened;  q6_k: (out, in/16)
    m   float32 (out, in/32)  q4_1 only
Why float32 scales: Numba has no float16 type on the CPU, and the alternative (uint16 bits widened through
a 65536-entry table, per row into a small buffer) was not faster in the decode kernel on the reference VM
(q4_0 5632 x 2048, one thread, from memory: 960-1190 µs with float32 scales, 1030-1370 µs with the
table), despite reading 10% fewer bytes. Files store d and m as float16 (to_arrays / from_arrays), so
nothing is lost or added either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyvlm.errors import WeightsError
from tinyvlm.weights import gguf_quants

GROUP = 32  # weights per block, along `in`
KINDS = ("q4_0", "q4_1", "q8_0")  # what `quantize` makes
FILE_KINDS = ("q6_k",)  # what only a GGUF file holds
# GGUF block: float16 d [, float16 m], then the packed values.
_GGUF_BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 2 + 2 + 16, "q8_0": 2 + 32}


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value; compare fields explicitly
class QuantizedMatrix:
    """A linear weight W (out, in) quantized in groups of 32 along `in`; see the module docstring."""

    kind: str  # "q4_0" | "q4_1" | "q8_0" | "q6_k"
    shape: tuple[int, int]  # (out, in) of the float matrix it stands for
    qs: np.ndarray  # q4: uint8 (out, in/2); q8: int8 (out, in); q6_k: uint8 (out, 3 in/4)
    d: np.ndarray  # float32 (out, in/32); q6_k (out, in/16)
    m: np.ndarray | None = None  # float32 (out, in/32), q4_1 only


def _check_kind_shape(kind: str, shape: tuple[int, int]) -> tuple[int, int]:
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; expected one of {', '.join(KINDS)}")
    out, n_in = (int(s) for s in shape)
    if n_in % GROUP:
        raise ValueError(f"cannot quantize a matrix with {n_in} inputs: not a multiple of the group size {GROUP}")
    return out, n_in


def _to_f16_f32(v: np.ndarray) -> np.ndarray:
    """Round float32 scales to float16 (as stored in GGUF) and widen them back for the kernels."""
    with np.errstate(over="ignore"):  # a scale beyond float16 range becomes inf, as in ggml
        return v.astype(np.float16).astype(np.float32)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """roundf(): nearest integer, ties away from zero (np.round would round ties to even)."""
    a = np.abs(v)
    fa = np.floor(a)
    return np.sign(v) * (fa + (a - fa >= np.float32(0.5)))  # a - fa is exact, so no double rounding


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(out, G, 32) values 0..15 -> (out, G*16) bytes: element j low nibble, element j+16 high nibble."""
    out = q.shape[0]
    return (q[..., :16] | (q[..., 16:] << np.uint8(4))).reshape(out, -1)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(out, in/2) bytes -> (out, in/32, 32) values 0..15 in element order."""
    b = qs.reshape(qs.shape[0], -1, 16)  # (out, G, 16)
    return np.concatenate([b & np.uint8(15), b >> np.uint8(4)], axis=-1)  # (out, G, 32)


def quantize(w: np.ndarray, kind: str) -> QuantizedMatrix:
    """Quantize a float32 weight (out, in) group-wise along `in`, bit-exact with ggml's reference quantizer."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {w.shape}")
    out, n_in = _check_kind_shape(kind, w.shape)
    blocks = np.asarray(w, dtype=np.float32).reshape(out, n_in // GROUP, GROUP)  # (out, G, 32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if kind == "q4_0":
            imax = np.abs(blocks).argmax(axis=-1)[..., None]  # first value of largest magnitude, as ggml
            d = np.take_along_axis(blocks, imax, axis=-1) / np.float32(-8)  # (out, G, 1)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            return QuantizedMatrix(kind, (out, n_in), pack_nibbles(q), _to_f16_f32(d[..., 0]))
        if kind == "q4_1":
            lo = blocks.min(axis=-1, keepdims=True)  # (out, G, 1)
            d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
            return QuantizedMatrix(kind, (out, n_in), pack_nibbles(q), _to_f16_f32(d[..., 0]),
                                   _to_f16_f32(lo[..., 0]))
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)  # q8_0
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = _round_half_away(blocks * inv).astype(np.int8).reshape(out, n_in)
        return QuantizedMatrix(kind, (out, n_in), q, _to_f16_f32(d[..., 0]))


def q6_values(qs: np.ndarray) -> np.ndarray:
    """q6_k bytes (out, 3 in/4) -> (out, in/32, 32) values 0..63 in element order."""
    out = qs.shape[0]
    low, odd, high = (p.reshape(out, -1, 1, 8) for p in np.split(qs, 3, axis=1))  # (out, G, 1, 8) each
    nibbles = np.concatenate([low & 15, odd & 15, low >> 4, odd >> 4], axis=2)  # (out, G, k, 8): element 8k + j
    top = high >> np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1) & np.uint8(3)  # (out, G, k, 8)
    return (nibbles | (top << np.uint8(4))).reshape(out, -1, 32)


def pack_q6(q: np.ndarray) -> np.ndarray:
    """(out, G, 32) values 0..63 -> q6_k bytes (out, 24 G); inverse of q6_values."""
    out = q.shape[0]
    k = q.reshape(out, -1, 4, 8)  # (out, G, k, 8): element 8k + j
    low = (k[:, :, 0] & 15) | ((k[:, :, 2] & 15) << 4)  # (out, G, 8)
    odd = (k[:, :, 1] & 15) | ((k[:, :, 3] & 15) << 4)
    high = np.bitwise_or.reduce((k >> 4) << np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 4, 1), axis=2)
    return np.concatenate([p.reshape(out, -1) for p in (low, odd, high)], axis=1)


def dequantize(qm: QuantizedMatrix) -> np.ndarray:
    """The float32 matrix (out, in) that qm stands for, with ggml's dequantization arithmetic."""
    out, n_in = qm.shape
    if qm.kind == "q6_k":  # d per 16 values times (q - 32), as ggml's (d * sc) * q
        q = (q6_values(qm.qs).astype(np.int8) - np.int8(32)).astype(np.float32)
        return (qm.d[..., None] * q.reshape(out, -1, 16)).reshape(out, n_in)
    d = qm.d[..., None]  # (out, G, 1)
    if qm.kind == "q8_0":
        w = qm.qs.reshape(out, -1, GROUP).astype(np.float32) * d  # (out, G, 32)
    elif qm.kind == "q4_0":
        w = d * (unpack_nibbles(qm.qs).astype(np.float32) - np.float32(8))
    else:
        w = d * unpack_nibbles(qm.qs).astype(np.float32) + qm.m[..., None]
    return w.reshape(out, n_in)


def from_gguf_blocks(kind: str, raw: bytes | np.ndarray, shape: tuple[int, int]) -> QuantizedMatrix:
    """Convert a GGUF tensor's block bytes (rows of `in/32` blocks) for a weight of `shape` (out, in)."""
    out, n_in = _check_kind_shape(kind, shape)
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    n_groups = n_in // GROUP
    expected = out * n_groups * _GGUF_BLOCK_BYTES[kind]
    if data.dtype != np.uint8 or data.size != expected:
        raise WeightsError(
            f"{kind} tensor of shape {(out, n_in)} needs {expected} bytes of GGUF blocks, "
            f"got {data.size} values of dtype {data.dtype}"
        )
    blocks = np.ascontiguousarray(data).reshape(out, n_groups, _GGUF_BLOCK_BYTES[kind])  # (out, G, bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (out, G)
    if kind == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return QuantizedMatrix(kind, (out, n_in), blocks[..., 4:].reshape(out, n_in // 2), d, m)
    if kind == "q4_0":
        return QuantizedMatrix(kind, (out, n_in), blocks[..., 2:].reshape(out, n_in // 2), d)
    return QuantizedMatrix(kind, (out, n_in), blocks[..., 2:].reshape(out, n_in).view(np.int8), d)


# GGUF type -> the kind of matrix that equals it (from_gguf_tensor)
EXACT_GGUF_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0", "Q4_K": "q4_1", "Q5_0": "q8_0", "Q6_K": "q6_k"}
EXACT_GGUF_TYPES = tuple(EXACT_GGUF_KINDS)


def from_gguf_tensor(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedMatrix:
    """A GGUF tensor of one of EXACT_GGUF_TYPES (raw: its uint8 bytes) as the matrix equal to it: Q4_0 / Q4_1 /
    Q8_0 as themselves, Q4_K as q4_1 (its 6-bit sub-scales and mins multiplied out, as ggml's dequantizer does),
    Q5_0 as q8_0 (values q - 16), Q6_K as q6_k; dequantize gives gguf's values bit for bit."""
    if type_name == "Q4_K":
        q, d, m = gguf_quants.q4_k_groups(raw, shape)
        return QuantizedMatrix("q4_1", tuple(shape), pack_nibbles(q), d, m)  # type: ignore[arg-type]
    if type_name == "Q6_K":
        q, d = gguf_quants.q6_k_groups(raw, shape)
        return QuantizedMatrix("q6_k", tuple(shape), pack_q6(q), d)  # type: ignore[arg-type]
    if type_name == "Q5_0":
        values, d = gguf_quants.q5_0_values(raw, shape)
        return QuantizedMatrix("q8_0", tuple(shape), values, d)  # type: ignore[arg-type]
    return from_gguf_blocks(type_name.lower(), raw, shape)


def _expected_arrays(kind: str, out: int, n_in: int) -> dict[str, tuple[tuple[int, int], type]]:
    """Array name -> (shape, dtype) as stored in a file."""
    spec = {"qs": ((out, n_in // 2), np.uint8) if kind != "q8_0" else ((out, n_in), np.int8),
            "d": ((out, n_in // GROUP), np.float16)}
    if kind == "q4_1":
        spec["m"] = ((out, n_in // GROUP), np.float16)
    return spec


def to_arrays(qm: QuantizedMatrix) -> dict[str, np.ndarray]:
    """The arrays to save for qm (scales as float16, exactly as quantized); inverse of from_arrays."""
    if qm.kind not in KINDS:  # q6_k's scales are not float16 values
        raise ValueError(f"a {qm.kind} matrix is read from GGUF files only; it has no tinyvlm file form")
    arrays = {"qs": qm.qs, "d": qm.d.astype(np.float16)}
    if qm.m is not None:
        arrays["m"] = qm.m.astype(np.float16)
    return arrays


def from_arrays(kind: str, shape: tuple[int, int], arrays: dict[str, np.ndarray]) -> QuantizedMatrix:
    """Rebuild a QuantizedMatrix from saved arrays, refusing any name, shape or dtype that does not fit."""
    try:
        out, n_in = _check_kind_shape(kind, shape)
    except ValueError as e:
        raise WeightsError(f"bad quantized tensor description: {e}") from None
    spec = _expected_arrays(kind, out, n_in)
    if set(arrays) != set(spec):
        raise WeightsError(f"{kind} tensor of shape {(out, n_in)} needs arrays {sorted(spec)}, got {sorted(arrays)}")
    for name, (want_shape, want_dtype) in spec.items():
        a = arrays[name]
        if a.shape != want_shape or a.dtype != want_dtype:
            raise WeightsError(
                f"{kind} tensor of shape {(out, n_in)}: array {name!r} should be {np.dtype(want_dtype)} "
                f"{want_shape}, got {a.dtype} {a.shape}"
            )
    m = arrays["m"].astype(np.float32) if kind == "q4_1" else None
    return QuantizedMatrix(kind, (out, n_in), arrays["qs"], arrays["d"].astype(np.float32), m)


def nbytes(qm: QuantizedMatrix) -> int:
    """Bytes one full pass over the weight reads (packed values plus scales and mins)."""
    return qm.qs.nbytes + qm.d.nbytes + (qm.m.nbytes if qm.m is not None else 0)


def matvec_ref(qm: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """y = W' x with W' = dequantize(qm): x (in,) -> (out,), float32."""
    return dequantize(qm) @ np.asarray(x, dtype=np.float32)  # (in,) -> (out,)


def matmul_ref(x: np.ndarray, qm: QuantizedMatrix) -> np.ndarray:
    """y = x W'^T with W' = dequantize(qm): x (T, in) -> (T, out), float32."""
    return np.asarray(x, dtype=np.float32) @ dequantize(qm).T  # (T, in) -> (T, out)


def quantize_activations_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (in,) float32 -> (xq int8 (in,), xd float32 (G,)) per block of 32, ggml's q8_0 rule: d = max|x| / 127,
    q = round(x / d) with halves away from zero (llama.cpp quantizes activations so for its integer dot products)."""
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, GROUP)  # (G, 32)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)  # (G,)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return _round_half_away(blocks * inv[:, None]).astype(np.int8).reshape(-1), d


def matvec_int8_ref(qm: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """y = W' q8(x): x (in,) quantized by quantize_activations_ref, then each block's integer dot product
    (exact, int64) scaled by d_w d_x, the blocks summed in float64; the offset of q4_0 (q - 8) and q4_1 (m)
    applied through each block's sum of q_x, as the kernels do (q8_1's block sums); q6_k's dot products are per
    16 values, scaled by their own d. (in,) -> (out,), float32."""
    out, n_in = qm.shape
    xq, xd = quantize_activations_ref(x)
    if qm.kind == "q6_k":  # per 16 values: exact dot, scaled by d16 d_x of its block
        q = q6_values(qm.qs).astype(np.int64).reshape(out, -1, 16) - 32  # (out, 2G, 16)
        dots = np.einsum("ohj,hj->oh", q, xq.reshape(-1, 16).astype(np.int64)).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            return (qm.d.astype(np.float64) * np.repeat(xd.astype(np.float64), 2) * dots).sum(-1).astype(np.float32)
    xq = xq.reshape(-1, GROUP).astype(np.int64)  # (G, 32)
    q = (qm.qs.reshape(out, -1, GROUP) if qm.kind == "q8_0" else unpack_nibbles(qm.qs)).astype(np.int64)
    dots = np.einsum("ogj,gj->og", q, xq).astype(np.float64)  # (out, G), exact
    scale = qm.d.astype(np.float64) * xd.astype(np.float64)  # (out, G)
    sums = xq.sum(axis=-1).astype(np.float64) * xd  # (G,): d_x sum(q_x)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (scale * dots).sum(axis=-1)
        if qm.kind == "q4_0":
            y -= 8 * qm.d.astype(np.float64) @ sums
        elif qm.kind == "q4_1":
            y += qm.m.astype(np.float64) @ sums
    return y.astype(np.float32)
