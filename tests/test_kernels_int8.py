"""Int8 activations and integer dot products (kernels/quant_int8.py, kernels/dot_ir.py) against their NumPy
references (quant.quantize_activations_ref, quant.matvec_int8_ref), and the instructions they compile to.

Tolerances (measured maxima in brackets):
  Numba quantize_activations vs quantize_activations_ref    bit-exact (the int8 values, scales and block sums)
  Numba int8 matvec vs matvec_int8_ref (exact integer sums,  |err| <= 1e-5 * sum_j |x'_j| (|d q_j| + |m|), with x'
      float64 across blocks)                                 the dequantized activations (the float kernels' bound)
  int8 activations vs float32 activations                   |err| <= sum_j |w'_j| d_x/2 + the bound above: each
      activation moves by at most half its block's step d_x = max|x| / 127
  1 vs 2 numba threads: identical bits
Codegen (numba's inspect_asm of a fresh compile): on x86-64 the kernels multiply with vpmaddwd, and with AVX-512
VNNI or AVX-VNNI the q4 kernel contains vpdpwssd (or vpdpbusd); on aarch64 cores with the dot-product extension
(NUMBA_CPU_NAME=neoverse-n1 under qemu) both contain sdot.
"""
from __future__ import annotations

import os
import platform
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_kernels_quant import (ALL_KINDS, SETTINGS, assert_close, kernel_cases, kernel_scale, make_case,
                                      make_matrix, make_weight)
from tinyvlm.kernels import _numba, dot_ir, quant

BACKEND_FREE = True  # kernels only
numba = _numba.module()
from tinyvlm.kernels import quant_int8  # noqa: E402  (needs numba)


def natural(xq: np.ndarray, xl: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activations (its read order, scales per lane) back in natural order, one scale a block."""
    return xq[quant_int8.where(kind, xq.shape[0])], xl[:: dot_ir.lanes_per_block(quant_int8.FAMILY, kind)]


def dequantized_activations(x: np.ndarray) -> np.ndarray:
    xq, xd = quant.quantize_activations_ref(x)
    return (xq.reshape(-1, quant.GROUP).astype(np.float32) * xd[:, None]).reshape(-1)


@SETTINGS
@given(case=kernel_cases)
def test_quantize_activations_bit_exact(case: tuple) -> None:
    qm, x, _ = make_case(case)
    xq_ref, xd_ref = quant.quantize_activations_ref(x)
    xq, xl, xs = quant_int8.quantize_activations(x, qm.kind)
    xq, xd = natural(xq[0], xl[0], qm.kind)
    assert xq.dtype == np.int8 and np.array_equal(xq, xq_ref)
    assert np.array_equal(xd.view(np.uint32), xd_ref.view(np.uint32))
    assert np.all(np.abs(xq_ref.astype(np.int32)) <= 127)
    sums = xq_ref.reshape(-1, quant.GROUP).sum(axis=-1, dtype=np.int64)
    assert np.array_equal(xs[0], (xd_ref * sums.astype(np.float32)))


def test_quantize_activations_rounds_halves_away_and_keeps_zero_blocks() -> None:
    x = np.zeros(64, np.float32)
    x[:4] = [127.0, 0.5, -0.5, -1.5]  # d = 1: the halves round away from zero
    xq, xd = quant.quantize_activations_ref(x)
    assert xq[:4].tolist() == [127, 1, -1, -2] and xd.tolist() == [1.0, 0.0] and not xq[32:].any()
    got, xl, _ = quant_int8.quantize_activations(x, "q8_0")
    assert np.array_equal(natural(got[0], xl[0], "q8_0")[0], xq)


@SETTINGS
@given(case=kernel_cases)
def test_int8_matvec_matches_reference(case: tuple) -> None:
    qm, x, _ = make_case(case)
    ref = quant.matvec_int8_ref(qm, x)
    assert_close(quant_int8.matvec(qm, x), ref, dequantized_activations(x), qm)


@SETTINGS
@given(case=kernel_cases, n_tokens=st.integers(2, 9))
def test_int8_matmul_matches_reference_token_by_token(case: tuple, n_tokens: int) -> None:
    """Tiles of TOKENS tokens and the tokens left over: each row of the product is that token's matvec."""
    qm, _, rng = make_case(case)
    x = rng.standard_normal((n_tokens, 2 * qm.shape[1])).astype(np.float32)[:, ::2]  # non-contiguous rows
    y = quant_int8.matmul(x, qm)
    assert y.shape == (n_tokens, qm.shape[0])
    for row, x_t in zip(y, x):
        assert_close(row, quant.matvec_int8_ref(qm, x_t), dequantized_activations(x_t), qm)
        assert np.array_equal(row, quant_int8.matvec(qm, x_t))  # the same bits as one token alone


@SETTINGS
@given(case=kernel_cases)
def test_int8_activations_error_against_float32(case: tuple) -> None:
    """The stated error of int8 activations: at most half a step of each activation's block, times |w'|."""
    qm, x, _ = make_case(case)
    float_ref = x.astype(np.float64) @ quant.dequantize(qm).T.astype(np.float64)
    _, xd = quant.quantize_activations_ref(x)
    half_steps = np.repeat(xd.astype(np.float64) / 2, quant.GROUP)  # (in,)
    bound = np.abs(quant.dequantize(qm)).astype(np.float64) @ half_steps
    err = np.abs(quant_int8.matvec(qm, x) - float_ref)
    slack = 1e-5 * (kernel_scale(x, qm) + kernel_scale(dequantized_activations(x), qm)) + 1e-30
    assert np.all(err <= bound + slack), float(np.max(err - bound - slack))


def same_bits_on_1_and_2_threads(run) -> bool:
    """Whether run() (a float32 array) gives the same bits on 1 and on 2 Numba threads (where 2 exist)."""
    before = _numba.get_threads()
    try:
        results = []
        for threads in (1, 2) if _numba.module().config.NUMBA_NUM_THREADS >= 2 else (1,):
            _numba.set_threads(threads)
            results.append(run().view(np.uint32))
    finally:
        _numba.set_threads(before)
    return all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_threads_give_identical_bits(kind: str) -> None:
    qm = make_matrix(make_weight("mixed_scales", 203, 32 * 7, seed=11), kind, np.random.default_rng(11))
    x = np.random.default_rng(2).standard_normal(32 * 7).astype(np.float32)
    assert same_bits_on_1_and_2_threads(lambda: quant_int8.matvec(qm, x))


def _options(kernel) -> dict:
    """The kernel's own compile options (parallel, fastmath, ...), without numba's on-disk cache."""
    return {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}  # njit implies nopython


@pytest.fixture(scope="module")
def other_family_kernels():
    """The other target family's IR form (x86 here: the ARM form, and the reverse), compiled fresh without cache:
    (family, q4 kernel, q8 kernel). Both forms are generic IR, so each must be right on any CPU."""
    import types as pytypes

    family = "arm" if quant_int8.FAMILY == "x86" else "x86"
    names = {"q4": "q4", "q8": "q8_0", "q6": "q6_k"}
    swapped = {f"_dot_{short}{tile}": quant_int8.row_dot_intrinsic(kind, family, tokens)
               for short, kind in names.items() for tile, tokens in (("", 1), ("_tile", quant_int8.TOKENS))}
    kernels = []
    for kernel in (quant_int8._matmul_q4, quant_int8._matmul_q8):
        f = kernel.py_func
        copy = pytypes.FunctionType(f.__code__, {**f.__globals__, **swapped}, f.__name__, f.__defaults__, f.__closure__)
        kernels.append(numba.njit(**_options(kernel))(copy))
    return family, *kernels


@SETTINGS
@given(case=kernel_cases, n_tokens=st.sampled_from((1, 5)))
def test_other_family_form_matches_reference(other_family_kernels, case: tuple, n_tokens: int) -> None:
    family, q4_kernel, q8_kernel = other_family_kernels
    qm, x, rng = make_case(case)
    xs_in = np.vstack([x] + [rng.standard_normal(x.shape[0]).astype(np.float32) for _ in range(n_tokens - 1)])
    xq, xl, xs = quant_int8.quantize_activations(xs_in, qm.kind, family)
    y = np.empty((n_tokens, qm.shape[0]), np.float32)
    if qm.kind in ("q8_0", "q6_k"):
        q8_kernel(qm.qs, qm.d, qm.kind == "q6_k", xq, xl, y)
    else:
        bias = dot_ir.BIAS[family]
        m, m_scale, d_scale = (qm.m, 1, bias) if qm.kind == "q4_1" else (qm.d, 0, bias - 8)
        q4_kernel(qm.qs, qm.d, m, np.float32(m_scale), np.float32(d_scale), m_scale != 0 or d_scale != 0, xq, xl, xs, y)
    for row, x_t in zip(y, xs_in):
        assert_close(row, quant.matvec_int8_ref(qm, x_t), dequantized_activations(x_t), qm)


def test_activation_order_is_a_permutation() -> None:
    for family in ("x86", "arm"):
        for kind in ALL_KINDS:
            for blocks in (1, 2, 3, 8):
                order = dot_ir.activation_order(family, kind, 32 * blocks)
                assert sorted(order) == list(range(32 * blocks))
    pair_then_tail = list(range(16)) + list(range(32, 48)) + list(range(16, 24))
    assert dot_ir.activation_order("x86", "q4_0", 96)[:40] == pair_then_tail


# ---------------------------------------------------------------- the instructions they compile to

def _fresh_asm(kernel) -> str:
    """The assembly of a fresh (not cached) compile of a parallel kernel, after checking it gives the cached
    kernel's bits."""
    fresh = numba.njit(**_options(kernel))(kernel.py_func)
    rng = np.random.default_rng(0)
    kinds = ("q8_0", "q6_k") if kernel is quant_int8._matmul_q8 else ("q4_1",)
    for kind in kinds:
        qm = make_matrix(rng.standard_normal((8, 96)).astype(np.float32), kind, rng)
        xq, xl, xs = quant_int8.quantize_activations(rng.standard_normal((5, 96)).astype(np.float32), kind)
        y = np.empty((5, 8), np.float32)
        if kind != "q4_1":
            fresh(qm.qs, qm.d, kind == "q6_k", xq, xl, y)
        else:
            fresh(qm.qs, qm.d, qm.m, np.float32(1), np.float32(quant_int8.BIAS), True, xq, xl, xs, y)
        assert np.array_equal(y, quant_int8.matmul_quantized(qm, xq, xl, xs))
    return "\n".join(fresh.inspect_asm().values())


def _cpu_features() -> tuple[str, str]:
    import llvmlite.binding as ll

    name = os.environ.get("NUMBA_CPU_NAME") or ll.get_host_cpu_name()
    features = os.environ.get("NUMBA_CPU_FEATURES") or ll.get_host_cpu_features().flatten()
    return name, features


DOTPROD_CORES = ("neoverse-n1", "neoverse-n2", "neoverse-v1", "neoverse-v2", "cortex-a76", "cortex-a78", "cortex-x1",
                 "cortex-a710", "apple-m1", "apple-m2", "a64fx")


@pytest.mark.parametrize("kernel", ["_matmul_q4", "_matmul_q8"])
def test_compiles_to_integer_dot_products(kernel: str) -> None:
    asm = _fresh_asm(getattr(quant_int8, kernel))
    instructions = set(re.findall(r"(?m)^\s+([a-z][a-z0-9.]*)\s", asm))
    name, features = _cpu_features()
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        if name in DOTPROD_CORES or "+dotprod" in features:
            assert "sdot" in instructions, f"no sdot for {name}"
        else:
            pytest.fail(f"aarch64 core {name!r} without the dot-product extension: set NUMBA_CPU_NAME=neoverse-n1")
    elif machine in ("x86_64", "amd64"):
        assert instructions & {"vpmaddwd", "pmaddwd", "vpdpwssd"}, "no integer multiply-add"
        if kernel == "_matmul_q4" and ("+avx512vnni" in features or "+avxvnni" in features):
            # q4: two products per lane (low and high nibbles) add up, which VNNI fuses; q8_0 has one per lane
            assert instructions & {"vpdpwssd", "vpdpbusd"}, f"no VNNI instruction for {name}"
    else:
        pytest.fail(f"no codegen expectation for {machine}")
