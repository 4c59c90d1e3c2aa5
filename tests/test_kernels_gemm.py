"""The int16 GEMM of prefill (kernels/quant_gemm.py, kernels/gemm_ir.py) against quant.matvec_int8_ref, token by
token, and the instructions it compiles to.

Tolerances (the int8 kernels' own, tests/test_kernels_int8.py): each output within 1e-5 * sum_j |x'_j| (|d q_j| +
|m|) of the reference's exact integer sums, with x' the dequantized activations. 1 vs 2 threads: identical bits.
Codegen: on x86-64 with AVX-512 VNNI the kernel multiplies with vpdpwssd (its inner loop keeps each int32 sum a
phi, or LLVM splits the instruction into vpmaddwd + vpaddd).
"""
from __future__ import annotations

import platform
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_kernels_int8 import _cpu_features, _options, dequantized_activations, same_bits_on_1_and_2_threads
from tests.test_kernels_quant import ALL_KINDS, SETTINGS, assert_close, kernel_cases, make_case, make_matrix
from tinyvlm.kernels import quant

BACKEND_FREE = True  # kernels only

from tinyvlm.kernels import quant_gemm  # noqa: E402  (needs numba)


@SETTINGS
@given(case=kernel_cases, n_tokens=st.sampled_from((1, 10, 16, 17, 33, 50)))
def test_gemm_matches_reference_token_by_token(case: tuple, n_tokens: int) -> None:
    """Whole register tiles, the last rows one at a time, a last lone panel, and padded token lanes."""
    qm, _, rng = make_case(case)
    x = rng.standard_normal((n_tokens, 2 * qm.shape[1])).astype(np.float32)[:, ::2]  # non-contiguous rows
    x[rng.integers(n_tokens), rng.integers(qm.shape[1])] = np.float32(1e6)  # one block dominated by an outlier
    y = quant_gemm.matmul(x, qm)
    assert y.shape == (n_tokens, qm.shape[0]) and y.flags.c_contiguous
    for row, x_t in zip(y, x):
        assert_close(row, quant.matvec_int8_ref(qm, x_t), dequantized_activations(x_t), qm)


def test_zero_tokens_and_zero_blocks() -> None:
    """A token of zeros (scale 0) gives zeros, and so does a zero weight row, beside ordinary ones."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((13, 64)).astype(np.float32)
    w[5] = 0
    x = rng.standard_normal((20, 64)).astype(np.float32)
    x[7] = 0
    for kind in ALL_KINDS:
        qm = make_matrix(w, kind, rng)
        y = quant_gemm.matmul(x, qm)
        assert not y[7].any()
        if kind != "q6_k":  # random_q6_k makes its own rows
            assert not y[:, 5].any()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_threads_give_identical_bits(kind: str) -> None:
    rng = np.random.default_rng(11)
    qm = make_matrix(rng.standard_normal((203, 32 * 5)).astype(np.float32), kind, rng)
    x = rng.standard_normal((40, 32 * 5)).astype(np.float32)
    assert same_bits_on_1_and_2_threads(lambda: quant_gemm.matmul(x, qm))


def test_compiles_to_vnni_on_x86() -> None:
    """A fresh compile (not numba's cache) gives the cached kernel's bits; on x86-64 with VNNI it uses vpdpwssd."""
    import numba

    fresh = numba.njit(**_options(quant_gemm._gemm))(quant_gemm._gemm.py_func)
    rng = np.random.default_rng(0)
    for kind in ALL_KINDS:
        qm = make_matrix(rng.standard_normal((14, 96)).astype(np.float32), kind, rng)
        x = rng.standard_normal((40, 96)).astype(np.float32)
        xp, xd, xs = quant_gemm.panels(x, kind)
        y = np.empty((40, 14), np.float32)
        fresh(quant_gemm.KIND_CODES[kind], qm.qs, qm.d, qm.m if qm.m is not None else qm.d, xp, xd, xs, y, 2)
        assert np.array_equal(y, quant_gemm.matmul(x, qm))
    instructions = set(re.findall(r"(?m)^\s+([a-z][a-z0-9.]*)\s", "\n".join(fresh.inspect_asm().values())))
    name, features = _cpu_features()
    if platform.machine().lower() in ("x86_64", "amd64") and ("+avx512vnni" in features or "+avxvnni" in features):
        assert "vpdpwssd" in instructions, f"no vpdpwssd for {name}"
