"""Quantized weights and kernels: formats bit-exact with the gguf package's ggml quants, Numba kernels
against the NumPy references in tinyvlm/kernels/quant.py (the backends that call them: tests/test_backends.py).

Tolerances (measured maxima in brackets, over 486 cases like this suite's):
  quantize / dequantize / from_gguf_blocks vs gguf.quants   bit-exact
  Numba dequantize_rows vs quant.dequantize                 bit-exact (d*q needs at most 19 bits)
  dequantize(quantize(w)) vs w                              half a step |d|/2 per group, plus the float16
      rounding of the stored scale (and min) times the largest |q|, plus 4 float32 ulps of |w|; for q4_0
      values beyond +7.5 steps (the side opposite the largest magnitude; the grid is -8..7) the rounding
      step is clipped, so up to (k - 7)|d| there, at most one step
  Numba matvec / matmul vs x @ dequantize(q).T              |err| <= 1e-5 * sum_j |x_j| (|d q_j| + |m|) per
      output (q8_0: 1e-5 * sum |x||w'|; q4_0: m = -8 d); see kernel_scale
      [matvec 4.4e-7; matmul 1.1e-7, and <= 1.1e-7 of sum |x||w'| too, as it runs BLAS on exact tiles]
  1 vs all numba threads: identical bits
"""
from __future__ import annotations

import weakref

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import examples
from tinyvlm.errors import TinyVLMError, WeightsError
from tinyvlm.kernels import _numba, packing, quant, quant_numba
from tinyvlm.kernels.quant import GROUP, QuantizedMatrix

BACKEND_FREE = True  # no model runs here: kernels, files and text only

GGUF_TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
PATTERNS = ("normal", "zeros", "one_huge", "negative", "constant", "tiny", "mixed_scales")
KERNEL_TOL = 1e-5  # relative to kernel_scale
SETTINGS = settings(derandomize=True, deadline=None, max_examples=examples(30))


def make_weight(pattern: str, out: int, n_in: int, seed: int) -> np.ndarray:
    """A float32 (out, in) weight in one of the PATTERNS, including the blocks that trip quantizers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    if pattern == "zeros":
        w[:] = 0
    elif pattern == "one_huge":  # one value dominates its block; the scale still fits float16
        w[rng.integers(out), rng.integers(n_in)] = np.float32(3e5) * rng.choice([-1, 1])
    elif pattern == "negative":
        w = -np.abs(w) - np.float32(0.5)
    elif pattern == "constant":
        w[:] = np.float32(rng.standard_normal())
    elif pattern == "tiny":  # scales below float16's normal range: subnormal or zero when stored
        w *= np.float32(1e-7)
    elif pattern == "mixed_scales":
        w *= np.exp(rng.uniform(-8, 8, size=(out, n_in // GROUP, 1))).astype(np.float32).repeat(GROUP, -1).reshape(
            out, n_in)
    return w


def random_q6_k(out: int, n_in: int, rng: np.random.Generator, scale: float = 1.0) -> QuantizedMatrix:
    """A q6_k matrix (the GGUF-only kind) of random values 0..63 and per-16 scales d * sc, d a float16 and sc an
    int8 as in a Q6_K file (quant.from_gguf_tensor; tests/test_weights_gguf.py checks that conversion)."""
    q = rng.integers(0, 64, size=(out, n_in // GROUP, GROUP), dtype=np.uint8)
    d = (rng.standard_normal((out, n_in // 16)) * scale / 1400).astype(np.float16).astype(np.float32)
    sc = rng.integers(-128, 128, d.shape).astype(np.float32)
    return QuantizedMatrix("q6_k", (out, n_in), quant.pack_q6(q), d * sc)


def make_matrix(w: np.ndarray, kind: str, rng: np.random.Generator) -> QuantizedMatrix:
    """w quantized by `kind`; for q6_k, which nothing here quantizes to, a random matrix of w's shape instead."""
    return random_q6_k(*w.shape, rng, float(np.abs(w).max())) if kind == "q6_k" else quant.quantize(w, kind)


ALL_KINDS = quant.KINDS + quant.FILE_KINDS
weights = st.tuples(st.sampled_from(PATTERNS), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ---------------------------------------------------------------- formats, bit-exact with ggml via gguf

@pytest.mark.parametrize("kind", quant.KINDS)
@SETTINGS
@given(spec=weights)
def test_quantize_dequantize_bit_exact_with_gguf(kind: str, spec: tuple) -> None:
    pattern, out, groups, seed = spec
    w = make_weight(pattern, out, groups * GROUP, seed)
    raw = gguf.quants.quantize(w, GGUF_TYPES[kind])  # (out, bytes per row)
    qm = quant.quantize(w, kind)
    from_file = quant.from_gguf_blocks(kind, raw, w.shape)
    for name in ("qs", "d", "m"):
        a, b = getattr(qm, name), getattr(from_file, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    expected = gguf.quants.dequantize(raw, GGUF_TYPES[kind])
    assert np.array_equal(bits(quant.dequantize(qm)), bits(expected))
    assert np.array_equal(bits(quant.dequantize(from_file)), bits(expected))


def test_from_gguf_blocks_accepts_bytes_and_refuses_wrong_size() -> None:
    w = make_weight("normal", 3, 64, seed=0)
    raw = gguf.quants.quantize(w, GGUF_TYPES["q4_1"])
    qm = quant.from_gguf_blocks("q4_1", raw.tobytes(), (3, 64))
    assert np.array_equal(quant.dequantize(qm), gguf.quants.dequantize(raw, GGUF_TYPES["q4_1"]))
    with pytest.raises(WeightsError, match="needs 120 bytes"):
        quant.from_gguf_blocks("q4_1", raw.tobytes()[:-1], (3, 64))


@pytest.mark.parametrize("kind", quant.KINDS)
@SETTINGS
@given(spec=weights)
def test_dequantize_quantize_within_half_a_step(kind: str, spec: tuple) -> None:
    pattern, out, groups, seed = spec
    w = make_weight(pattern, out, groups * GROUP, seed)
    qm = quant.quantize(w, kind)
    blocks = w.reshape(out, groups, GROUP)
    # the float32 scale the quantizer works with, before float16 storage
    if kind == "q4_0":
        imax = np.abs(blocks).argmax(axis=-1)[..., None]
        d32 = np.take_along_axis(blocks, imax, axis=-1)[..., 0] / np.float32(-8)
        q_max = 8
    elif kind == "q4_1":
        d32 = (blocks.max(axis=-1) - blocks.min(axis=-1)) / np.float32(15)
        q_max = 15
    else:
        d32 = np.abs(blocks).max(axis=-1) / np.float32(127)
        q_max = 127
    d32 = d32.astype(np.float64)[..., None]  # (out, G, 1)
    step = np.abs(d32) * 0.5
    if kind == "q4_0":  # clipped at q = 15, i.e. 7 steps, on the side opposite the largest magnitude
        k = np.divide(blocks, d32, out=np.zeros(blocks.shape), where=d32 != 0)
        step = np.maximum(step, np.abs(d32) * (k - 7))
    bound = step + q_max * np.abs(qm.d[..., None] - d32)
    if kind == "q4_1":
        bound = bound + np.abs(qm.m[..., None] - blocks.min(axis=-1, keepdims=True).astype(np.float64))
    bound = bound + 4 * np.spacing(np.abs(blocks))
    err = np.abs(quant.dequantize(qm).reshape(blocks.shape).astype(np.float64) - blocks)
    assert np.all(err <= bound), float((err - bound).max())


def test_quantize_refuses_rows_not_multiple_of_group() -> None:
    with pytest.raises(ValueError, match="not a multiple of the group size 32"):
        quant.quantize(np.ones((2, 48), np.float32), "q4_0")
    with pytest.raises(ValueError, match="unknown quantization kind"):
        quant.quantize(np.ones((2, 64), np.float32), "q5_0")


@pytest.mark.parametrize("kind", quant.KINDS)
def test_arrays_round_trip_and_refuse_mismatches(kind: str) -> None:
    qm = quant.quantize(make_weight("normal", 4, 64, seed=1), kind)
    arrays = quant.to_arrays(qm)
    back = quant.from_arrays(kind, (4, 64), arrays)
    assert np.array_equal(quant.dequantize(back), quant.dequantize(qm))
    assert quant.nbytes(back) == quant.nbytes(qm) == qm.qs.nbytes + (8 if kind == "q4_1" else 4) * 4 * 2
    with pytest.raises(WeightsError, match=r"array 'd' should be float16 \(4, 2\), got float32"):
        quant.from_arrays(kind, (4, 64), {**arrays, "d": arrays["d"].astype(np.float32)})
    with pytest.raises(WeightsError, match="array 'qs' should be"):
        quant.from_arrays(kind, (4, 64), {**arrays, "qs": arrays["qs"][:3]})
    with pytest.raises(WeightsError, match="needs arrays"):
        quant.from_arrays(kind, (4, 64), {"qs": arrays["qs"]})
    with pytest.raises(WeightsError, match="not a multiple of the group size"):
        quant.from_arrays(kind, (4, 40), arrays)
    with pytest.raises(WeightsError, match="unknown quantization kind"):
        quant.from_arrays("int4", (4, 64), arrays)


# ---------------------------------------------------------------- Numba kernels vs the NumPy references

kernel_cases = st.tuples(
    st.sampled_from(ALL_KINDS),
    st.sampled_from((1, 2, 3, 17, 33, 70)),  # out: one row, odd sizes
    st.integers(1, 6),  # groups along `in`
    st.sampled_from((1.0, 1e-3, 1e3)),  # weight scale
    st.sampled_from(("normal", "huge", "strided")),  # x
    st.integers(0, 2**31 - 1),
)


def make_case(case: tuple) -> tuple[QuantizedMatrix, np.ndarray, np.random.Generator]:
    kind, out, groups, w_scale, x_kind, seed = case
    rng = np.random.default_rng(seed)
    n_in = groups * GROUP
    qm = make_matrix(rng.standard_normal((out, n_in)).astype(np.float32) * np.float32(w_scale), kind, rng)
    x = rng.standard_normal(2 * n_in).astype(np.float32)
    if x_kind == "huge":
        x[rng.integers(2 * n_in)] = np.float32(1e6)
    x = x[::2] if x_kind == "strided" else x[:n_in]  # non-contiguous or plain (in,)
    return qm, x, rng


def kernel_scale(x: np.ndarray, qm: QuantizedMatrix) -> np.ndarray:
    """sum_j |x_j| (|d q_j| + |m|) per output: the size of the terms the kernels add up.

    For q8_0 and q6_k that is sum |x||w'|. The q4 kernels add d * sum(q x) and m * sum(x) per group (q4_0: q in 0..15,
    m = -8 d), so where w' is near 0 the two terms cancel and the float32 error scales with them.
    """
    if qm.kind in ("q8_0", "q6_k"):
        return np.abs(x) @ np.abs(quant.dequantize(qm)).T
    out, n_in = qm.shape
    q = np.concatenate([qm.qs.reshape(out, -1, 16) & 15, qm.qs.reshape(out, -1, 16) >> 4], axis=-1)  # (out, G, 32)
    m = np.abs(qm.m) if qm.kind == "q4_1" else 8 * np.abs(qm.d)
    terms = np.abs(qm.d)[..., None] * q + m[..., None]  # (out, G, 32)
    return np.abs(x) @ terms.reshape(out, n_in).T


def assert_close(y: np.ndarray, ref: np.ndarray, x: np.ndarray, qm: QuantizedMatrix) -> None:
    scale = kernel_scale(x, qm)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= KERNEL_TOL * scale + 1e-30), float(np.max(np.abs(y - ref) / (scale + 1e-30)))


@SETTINGS
@given(case=kernel_cases)
def test_numba_matvec_matches_reference(case: tuple) -> None:
    qm, x, _ = make_case(case)
    ref = x @ quant.dequantize(qm).T
    assert_close(quant_numba.matvec(qm, x), ref, x, qm)
    assert_close(quant.matvec_ref(qm, x), ref, x, qm)


@SETTINGS
@given(case=kernel_cases, t=st.integers(2, 5), tile=st.sampled_from((1, 16, 256)))
def test_numba_matmul_matches_reference(case: tuple, t: int, tile: int) -> None:
    qm, _, rng = make_case(case)
    xs = rng.standard_normal((t, 2 * qm.shape[1])).astype(np.float32)[:, ::2]  # non-contiguous rows
    ref = quant.matmul_ref(xs, qm)
    y = quant_numba.matmul(xs, qm, tile)
    for row in range(t):
        assert_close(y[row], ref[row], xs[row], qm)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_numba_dequantize_rows_bit_exact(kind: str) -> None:
    qm = make_matrix(make_weight("mixed_scales", 9, 96, seed=3), kind, np.random.default_rng(3))
    w = np.empty((5, 96), np.float32)
    quant_numba.dequantize_rows(qm, 4, w)
    order = quant_numba.column_order(qm)
    assert sorted(order) == list(range(96))  # a permutation of the columns
    assert np.array_equal(bits(w), bits(quant.dequantize(qm)[4:9][:, order]))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_threads_1_and_n_give_identical_results(kind: str) -> None:
    n = _numba.module().config.NUMBA_NUM_THREADS
    qm = make_matrix(make_weight("normal", 301, 256, seed=5), kind, np.random.default_rng(5))
    x = make_weight("normal", 7, 256, seed=6)
    before = _numba.get_threads()
    try:
        _numba.set_threads(1)
        one = quant_numba.matvec(qm, x[0]), quant_numba.matmul(x, qm, 64)
        _numba.set_threads(n)
        many = quant_numba.matvec(qm, x[0]), quant_numba.matmul(x, qm, 64)
    finally:
        _numba.set_threads(before)
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])
    with pytest.raises(TinyVLMError, match="threads must be between 1 and"):
        _numba.check_threads(0)


def test_pack_together_keeps_values_in_one_aligned_buffer() -> None:
    mats = [quant.quantize(make_weight("normal", out, n_in, seed=out), kind)
            for out, n_in, kind in ((3, 64, "q4_0"), (5, 32, "q4_1"), (7, 96, "q8_0"), (1, 32, "q4_1"))]
    mats.append(random_q6_k(4, 64, np.random.default_rng(0)))
    packed = packing.pack_together([[qm] for qm in mats])
    assert len(packed) == len(mats)
    arrays = [a for qm in packed for a in (qm.qs, qm.d, qm.m) if a is not None]
    assert len({id(a.base) for a in arrays}) == 1  # views of one buffer
    assert all(a.ctypes.data % 64 == 0 for a in arrays)
    assert min(a.ctypes.data for a in arrays) % packing.HUGE_PAGE == 0
    for old, new in zip(mats, packed):
        assert (new.kind, new.shape) == (old.kind, old.shape)
        assert np.array_equal(bits(quant.dequantize(new)), bits(quant.dequantize(old)))
    copied: list[np.ndarray] = []
    q, k = mats[1], quant.quantize(make_weight("normal", 2, 32, seed=9), "q4_1")
    (stacked,) = packing.pack_together([[q, k]], copied.append)  # rows stacked, as q, k and v are
    assert stacked.shape == (7, 32) and len(copied) == 6  # qs, d and m of both
    assert np.array_equal(bits(quant.dequantize(stacked)),
                          bits(np.concatenate([quant.dequantize(q), quant.dequantize(k)])))
    with pytest.raises(ValueError, match="one kind and one input width"):
        packing.pack_together([[mats[0], mats[1]]])


def test_pack_together_makes_deferred_matrices_one_at_a_time() -> None:
    """A Deferred member is made when its rows are copied and let go before the next is made, so a loader's
    converted copies never all exist at once; the packed values are those of the made matrices."""
    mats = [quant.quantize(make_weight("normal", out, 64, seed=out), "q4_1") for out in (3, 5, 2)]
    mats.append(random_q6_k(4, 64, np.random.default_rng(1)))
    made, alive = [], []

    def maker(i: int):
        def make() -> QuantizedMatrix:
            assert not any(ref() is not None for ref in alive), "the previous matrix is still held"
            qm = QuantizedMatrix(mats[i].kind, mats[i].shape, mats[i].qs.copy(), mats[i].d.copy(),
                                 None if mats[i].m is None else mats[i].m.copy())
            made.append(i)
            alive.append(weakref.ref(qm.qs))
            return qm
        return make

    deferred = [packing.Deferred(qm.kind, qm.shape, maker(i)) for i, qm in enumerate(mats)]
    stacked, alone = packing.pack_together([deferred[:3], [deferred[3]]])
    assert made == [0, 1, 2, 3]
    assert np.array_equal(bits(quant.dequantize(stacked)),
                          bits(np.concatenate([quant.dequantize(qm) for qm in mats[:3]])))
    assert np.array_equal(bits(quant.dequantize(alone)), bits(quant.dequantize(mats[3])))
    wrong = packing.Deferred("q4_0", mats[0].shape, lambda: mats[0])
    with pytest.raises(ValueError, match="made a q4_1 one"):
        packing.pack_together([[wrong]])
