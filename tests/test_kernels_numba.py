"""The Numba per-token ops (tinyvlm/kernels/ops_numba.py) against their NumPy references, and the backends'
agreement on a whole decoder.

Tolerances (float32; measured maxima on these cases were ~1e-6 relative or below):
  rms_norm          rtol 1e-5 + atol 1e-6 * max|weight|   (a sum of squares in a different order)
  apply_rope        rtol 1e-6, atol 1e-6 * max|x|            (the same two products per element; contraction)
  decode_attention  atol (2e-6 + 8 eps32 * max_hs sum_e |q_he k_se| Dh^-0.5) * max|v|   (a convex combination
                                                              of v's rows, summed in another order; the second
                                                              term is the scores' own rounding, which softmax
                                                              carries into the weights; measured <= 4e-7 with
                                                              numba 0.68, 1.1e-5 with numba 0.59 at scores ~100)
  causal_attention  the decode_attention bound, per query row over the keys it sees
  _exp              rtol 2e-7 on [-87.3, 88.3]                (Taylor to r^7 and float32 rounding; measured 7.5e-8)
  softmax_          atol 1e-6, rtol 1e-5                      (probabilities; the exp above, another sum order)
  quick_gelu_       atol 1e-6 * max(1, max|z|), rtol 1e-5     (exp-and-divide form vs the reference's tanh form)
  gelu_             rtol 2e-7, atol 5e-8                      (both float64 inside, rounded once to float32; for
                                                              z < -5.6 the reference's erf is exactly -1, the C
                                                              library's keeps the tail: |gelu| < 5e-8 there)
  silu_mul_, swiglu_ rtol 1e-5, atol 1e-6 * max|silu(g) up|    (the exp above; below g = -88 -4e-37 * up, not -0)
  layer_norm        rtol 1e-5 + atol 4 eps32 * max|x|/std * max|weight| + 2e-6 max|bias|   (x - mean cancels)
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import examples
from tinyvlm.kernels import activations, attention, norm, ops_numba, rope

BACKEND_FREE = True  # no model runs here: kernels, files and text only

SETTINGS = settings(derandomize=True, deadline=None, max_examples=examples(25))


def rand(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@SETTINGS
@given(rows=st.integers(1, 5), dim=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_rms_norm_matches_reference(rows: int, dim: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (rows, dim), scale), rand(rng, (dim,))
    got, ref = ops_numba.rms_norm(x, w, 1e-6), norm.rms_norm(x, w, 1e-6)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(w).max())
    one = ops_numba.rms_norm(x[0], w, 1e-6)  # a single (D,) vector
    np.testing.assert_allclose(one, ref[0], rtol=1e-5, atol=1e-6 * np.abs(w).max())


@SETTINGS
@given(heads=st.integers(1, 9), steps=st.integers(1, 4), half=st.integers(1, 40), pos=st.integers(0, 2000),
       seed=st.integers(0, 2**16))
def test_apply_rope_matches_reference(heads: int, steps: int, half: int, pos: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cos, sin = rope.rope_tables(2 * half, pos + steps, 10000.0)
    cos, sin = cos[pos:], sin[pos:]  # (T, Dh/2)
    x = rand(rng, (steps, heads, 2 * half)).transpose(1, 0, 2)  # non-contiguous (H, T, Dh), as in the model
    got, ref = ops_numba.apply_rope(x, cos, sin), rope.apply_rope(x, cos, sin)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(x).max())


@SETTINGS
@given(kv=st.integers(1, 3), group=st.integers(1, 4), length=st.integers(1, 70), spare=st.integers(0, 5),
       dim=st.integers(1, 80), scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_decode_attention_matches_reference(kv: int, group: int, length: int, spare: int, dim: int, scale: float,
                                            seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys, values = rand(rng, (length + spare, kv, dim), scale), rand(rng, (length + spare, kv, dim))
    keys[length:] = np.nan  # positions past `length` must never be read
    q = rand(rng, (kv * group, 2 * dim))[:, ::2]  # non-contiguous (Hq, Dh)
    got = ops_numba.decode_attention(q, keys, values, length, dim ** -0.5)
    k, v = keys[:length].transpose(1, 0, 2), values[:length].transpose(1, 0, 2)  # (Hkv, S, Dh)
    ref = attention.grouped_attention(q[:, None], k, v, dim ** -0.5)[:, 0]
    assert got.shape == (kv * group, dim) and got.dtype == np.float32
    # A float32 score s = q.k * scale carries a rounding error of a few eps * sum_e |q_e k_e| * scale, and
    # softmax turns a score error into the same relative error of its probability: with scale 30 the scores
    # reach the hundreds, and the two summation orders then differ by ~1e-5 * max|v| (numba 0.59, LLVM 14).
    magnitude = np.einsum("hd,shd->hs", np.abs(q), np.abs(np.repeat(keys[:length], group, axis=1))) * dim ** -0.5
    atol = np.abs(values).max() * (2e-6 + 8 * np.finfo(np.float32).eps * magnitude.max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    # Extreme scores (scale 30: |q.k| * scale in the hundreds) must not overflow: the max is subtracted first.
    assert np.all(np.isfinite(got))


@SETTINGS
@given(kv=st.integers(1, 3), group=st.integers(1, 4), queries=st.integers(2, 20), pos=st.integers(0, 30),
       dim=st.integers(1, 80), scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_causal_attention_matches_reference(kv: int, group: int, queries: int, pos: int, dim: int, scale: float,
                                            seed: int) -> None:
    """A prompt chunk of `queries` tokens after `pos` cached positions, each query seeing the keys up to its own."""
    rng = np.random.default_rng(seed)
    keys, values = rand(rng, (kv, pos + queries, dim), scale), rand(rng, (kv, pos + queries, dim))
    q = rand(rng, (kv * group, queries, 2 * dim))[:, :, ::2]  # non-contiguous (Hq, T, Dh)
    got = ops_numba.causal_attention(q, keys.transpose(1, 0, 2).copy().transpose(1, 0, 2), values, dim ** -0.5, pos)
    mask = np.triu(np.full((queries, pos + queries), -np.inf, dtype=np.float32), k=pos + 1)
    ref = attention.grouped_attention(q, keys, values, dim ** -0.5, mask)
    assert got.shape == (kv * group, queries, dim) and got.dtype == np.float32
    magnitude = np.einsum("htd,jsd->hts", np.abs(q), np.abs(keys)).max() * dim ** -0.5  # over all pairs: a bound
    atol = np.abs(values).max() * (2e-6 + 8 * np.finfo(np.float32).eps * magnitude)
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    assert np.all(np.isfinite(got))


def test_exp_is_close_to_float64_exp_and_clamps() -> None:
    x = np.concatenate([np.linspace(-87.3, 88.3, 200_001, dtype=np.float32), np.float32([0, -0.0, 1e-30, -1e-30])])
    got = np.array([ops_numba._exp(v) for v in x[::97]] + [ops_numba._exp(v) for v in x[-4:]], dtype=np.float64)
    ref = np.exp(np.concatenate([x[::97], x[-4:]]).astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2e-7
    assert ops_numba._exp(np.float32(0)) == 1.0
    assert 0 < ops_numba._exp(np.float32(-np.inf)) < 2e-38  # clamped below, never a NaN
    assert np.isfinite(ops_numba._exp(np.float32(np.inf)))  # clamped above


@SETTINGS
@given(rows=st.integers(1, 6), n=st.integers(1, 700), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       seed=st.integers(0, 2**16))
def test_softmax_in_place_matches_reference(rows: int, n: int, scale: float, seed: int) -> None:
    x = rand(np.random.default_rng(seed), (2, rows, n), scale)
    ref = attention.softmax(x.copy())
    got = ops_numba.softmax_(x)
    assert got is x
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)


# name: (kernel, reference, rtol, atol as a function of the reference's largest magnitude); see the table above
ACTIVATIONS = {
    "quick_gelu_": (ops_numba.quick_gelu_, activations.quick_gelu, 1e-5, lambda top: 1e-6 * max(1.0, top)),
    "gelu_": (ops_numba.gelu_, activations.gelu, 2e-7, lambda top: 5e-8),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
@SETTINGS
@given(rows=st.integers(1, 6), n=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_activation_in_place_matches_reference(name: str, rows: int, n: int, scale: float, seed: int) -> None:
    kernel, reference, rtol, atol = ACTIVATIONS[name]
    z = rand(np.random.default_rng(seed), (rows, n), scale)
    ref = reference(z)
    got = kernel(z)
    assert got is z
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol(float(np.abs(ref).max())))


@SETTINGS
@given(rows=st.integers(1, 6), n=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_silu_mul_in_place_matches_reference(rows: int, n: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    both = rand(rng, (rows, 2 * n), scale)  # [gate | up], as a stacked gate_up matrix gives them
    ref = activations.silu(both[:, :n]) * both[:, n:]
    tol = {"rtol": 1e-5, "atol": 1e-6 * max(1.0, float(np.abs(ref).max()))}
    gate, up = both[:, :n].copy(), both[:, n:].copy()  # contiguous copies: both stays as it is
    got = ops_numba.silu_mul_(gate, up)
    assert got is gate
    np.testing.assert_allclose(got, ref, **tol)
    stacked = ops_numba.swiglu_(both)
    assert stacked.base is both and stacked.shape == (rows, n)  # written over the gate half
    np.testing.assert_allclose(stacked, ref, **tol)


@SETTINGS
@given(rows=st.integers(1, 6), dim=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       offset=st.sampled_from([0.0, 100.0]), seed=st.integers(0, 2**16))
def test_layer_norm_matches_reference(rows: int, dim: int, scale: float, offset: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rand(rng, (rows, dim), scale) + np.float32(offset * scale)  # a large mean, as LayerNorm inputs can have
    w, b = rand(rng, (dim,)), rand(rng, (dim,))
    out = np.empty_like(x)
    got = ops_numba.layer_norm(x, w, b, 1e-5, out)
    assert got is out
    ref = norm.layer_norm(x, w, b, 1e-5)
    # x - mean loses the bits of |x| beyond the spread: float32 error grows with max|x| / std (the condition).
    cond = float(np.max(np.abs(x) / (x.std(axis=-1, keepdims=True) + 1e-3)))
    atol = 4 * np.finfo(np.float32).eps * max(cond, 1.0) * np.abs(w).max() + 2e-6 * np.abs(b).max()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol)
