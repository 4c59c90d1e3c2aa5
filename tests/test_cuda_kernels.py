"""The CUDA backend's Numba-CUDA kernels against their NumPy references (kernels/cuda_quant.py, cuda_ops.py).

Without a GPU they run in Numba's CUDA simulator (conftest sets NUMBA_ENABLE_CUDASIM=1): one OS thread per GPU
thread, so the shapes are tiny. With TINYVLM_TEST_CUDA_DEVICE=1 the same tests run on the GPU, through CuPy arrays.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyvlm.kernels import quant

pytest.importorskip("numba")
from tinyvlm.kernels import cuda_ops, cuda_quant  # noqa: E402

BACKEND_FREE = True
ON_DEVICE = os.environ.get("TINYVLM_TEST_CUDA_DEVICE") == "1"
RTOL = 1e-5  # float32 sums in another order


def run(launch, *arrays, out_index=-1):
    """Call a launch function on device copies of `arrays` (host arrays in the simulator); returns them on the
    host, in order."""
    if not ON_DEVICE:
        launch(*arrays)
        return arrays
    import cupy

    device = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in arrays]
    launch(*device)
    return [cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a for a in device]


def _matrix(kind: str, rows: int, n_in: int, seed: int) -> quant.QuantizedMatrix:
    rng = np.random.default_rng(seed)
    if kind != "q6_k":
        return quant.quantize(rng.standard_normal((rows, n_in), dtype=np.float32), kind)
    q = rng.integers(0, 64, (rows, n_in // 32, 32), dtype=np.uint8)
    d = (rng.standard_normal((rows, n_in // 16)) * 0.01).astype(np.float32) * np.float32(3)  # not float16 values
    return quant.QuantizedMatrix("q6_k", (rows, n_in), quant.pack_q6(q), d)


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["q4_0", "q4_1", "q8_0", "q6_k"]), rows=st.integers(1, 9), groups=st.integers(1, 3),
       accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_matvec_matches_its_reference(kind, rows, groups, accumulate, seed):
    qm = _matrix(kind, rows, 32 * groups, seed)
    qs, d, m = cuda_quant.device_layout(qm)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal(32 * groups).astype(np.float32)
    start = rng.standard_normal(rows).astype(np.float32) if accumulate else np.full(rows, np.nan, np.float32)
    y, want = start.copy(), start.copy()
    y = run(lambda *a: cuda_quant.matvec(kind, *a, accumulate), qs, d, m, x, y)[-1]
    cuda_quant.matvec_ref(kind, qs, d, m, x, want, accumulate)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=RTOL * np.abs(quant.dequantize(qm)).sum(1).max())
    expected = quant.matvec_ref(qm, x) + (start if accumulate else 0)  # the reference is quant.py's
    np.testing.assert_allclose(want, expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0", "q6_k"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dequantize_matches_its_reference(kind, dtype):
    qm = _matrix(kind, 3, 64, 7)
    qs, d, m = cuda_quant.device_layout(qm)
    assert d.dtype == (np.float32 if kind == "q6_k" else np.float16)  # q6_k's scales are not float16 values
    out, want = np.full((3, 64), np.nan, dtype), np.empty((3, 64), dtype)
    out = run(lambda *a: cuda_quant.dequantize(kind, *a), qs, d, m, out)[-1]
    cuda_quant.dequantize_ref(kind, qs, d, m, want)
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(want.astype(np.float32), quant.dequantize(qm).astype(dtype).astype(np.float32))


def _rows(seed: int, shape=(3, 40)) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 3 + 1).astype(np.float32)


def test_rms_norm_and_layer_norm_match_their_references():
    x, w, b = _rows(0), _rows(1, (40,)), _rows(2, (40,))
    got = run(lambda *a: cuda_ops.rms_norm(a[0], a[1], 1e-6, a[2]), x, w, np.empty_like(x))[-1]
    want = np.empty_like(x)
    cuda_ops.rms_norm_ref(x, w, 1e-6, want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    got = run(lambda *a: cuda_ops.layer_norm(a[0], a[1], a[2], 1e-5, a[3]), x, w, b, np.empty_like(x))[-1]
    cuda_ops.layer_norm_ref(x, w, b, 1e-5, want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)


def test_softmax_rows_in_place_with_masked_entries():
    x = _rows(3, (4, 150))  # more entries than threads in a block
    x[1, 20:] = -np.inf
    want = x.copy()
    cuda_ops.softmax_rows_ref(want)
    got = run(cuda_ops.softmax_rows_, x)[0]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)
    assert (got[1, 20:] == 0).all()


def test_rope_matches_its_reference():
    x = _rows(4, (2, 3, 8))  # (H, T, Dh)
    cos, sin = (v[5:8] for v in quant_free_rope_tables())
    want = np.empty((2, 3, 8), np.float32)
    cuda_ops.rope_ref(x, cos, sin, want)
    got = run(cuda_ops.rope, x, cos, sin, np.empty_like(want))[-1]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def quant_free_rope_tables():
    from tinyvlm.kernels import rope

    return rope.rope_tables(8, 16, 10000.0)


@pytest.mark.parametrize("length", [7, 130])  # one chunk of positions, and two (online softmax)
def test_decode_attention_with_grouped_heads(length):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, 8)).astype(np.float32) * 2  # Hq = 4 over Hkv = 2
    keys, values = (rng.standard_normal((140, 2, 8)).astype(np.float32) for _ in range(2))
    want = np.empty((4, 8), np.float32)
    cuda_ops.decode_attention_ref(q, keys, values, length, 8 ** -0.5, want)
    got = run(lambda *a: cuda_ops.decode_attention(a[0], a[1], a[2], length, 8 ** -0.5, a[3]), q, keys, values,
              np.empty((4, 8), np.float32))[-1]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the simulator's exp(100)
def test_silu_mul_and_gelu_match_their_references():
    gate = np.concatenate([_rows(6, (2, 20)).ravel(), [-100.0, 100.0, 0.0, -1e-3]]).astype(np.float32)
    up = _rows(7, (44,))
    want = np.empty_like(gate)
    cuda_ops.silu_mul_ref(gate, up, want)
    got = run(cuda_ops.silu_mul, gate, up, np.empty_like(gate))[-1]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    z = gate.reshape(4, 11).copy()
    want = z.copy()
    cuda_ops.gelu_ref(want)
    got = run(cuda_ops.gelu_, z)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise3x3_matches_its_reference(stride):
    x, w = _rows(8, (5, 5, 3)), _rows(9, (3, 3, 3))
    side = (5 - 1) // stride + 1
    want = np.empty((side, side, 3), np.float32)
    cuda_ops.depthwise3x3_ref(x, w, stride, want)
    got = run(lambda *a: cuda_ops.depthwise3x3(a[0], a[1], stride, a[2]), x, w, np.empty_like(want))[-1]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
