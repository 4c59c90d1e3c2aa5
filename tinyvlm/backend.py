"""The seam between model code and kernels: `linear(x, w)` for dense or quantized weights, and the backend choice.

Model code calls `linear` and never checks weight types (style.md (b) 10). Backends:
    "numpy"  NumPy references everywhere (tinyvlm/kernels/quant.py for quantized weights)
    "numba"  the Numba kernels in tinyvlm/kernels/quant_numba.py for quantized weights, and those in
             tinyvlm/kernels/ops_numba.py for the LLM's rms_norm, apply_rope, silu_mul_ / swiglu_ and
             decode_attention,
             the vision tower's softmax_, quick_gelu_ and layer_norm, and the projector's gelu_
The default is "numba" when numba can be imported, else "numpy"; the environment variable
TINYVLM_BACKEND overrides the default, set_backend overrides both. numba is imported on the first
call that needs it, never at import time, so `python -m tinyvlm --help` does not load it.
Dense float32 weights always go to BLAS (numpy @), which is already as fast as a weight read allows.
"""
from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import _numba, activations, attention, norm, quant, rope
from tinyvlm.kernels.quant import QuantizedMatrix

BACKENDS = ("numpy", "numba")
_chosen: dict[str, str] = {}  # "name" -> the backend in use, once resolved or set


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise TinyVLMError(f"unknown backend {name!r} from {source}; expected one of {', '.join(BACKENDS)}")
    if name == "numba" and not _numba.available():
        raise TinyVLMError(f"backend 'numba' from {source} is unavailable: {_numba.why_unavailable()}")
    return name


def set_backend(name: str) -> None:
    """Use "numpy" or "numba" from now on; raises TinyVLMError if unknown or if numba cannot be imported."""
    _chosen["name"] = _check(name, "set_backend")


def get_backend() -> str:
    """The backend in use: set_backend's choice, else TINYVLM_BACKEND, else numba when importable, else numpy."""
    if "name" not in _chosen:
        env = os.environ.get("TINYVLM_BACKEND")
        if env:
            _chosen["name"] = _check(env, "TINYVLM_BACKEND")
        else:
            _chosen["name"] = "numba" if _numba.available() else "numpy"
    return _chosen["name"]


def set_threads(n: int) -> None:
    """Threads for the numba kernels (no effect on the numpy backend, whose BLAS reads OPENBLAS_NUM_THREADS)."""
    if get_backend() == "numba":
        _numba.set_threads(n)
    elif n < 1:
        raise TinyVLMError(f"threads must be at least 1, got {n}")


def linear(x: np.ndarray, w: np.ndarray | QuantizedMatrix) -> np.ndarray:
    """x @ w.T for x (in,) or (T, in) float32 and w a dense (out, in) array or a QuantizedMatrix."""
    if isinstance(w, np.ndarray):
        return x @ w.T  # (T, in) -> (T, out)
    if get_backend() == "numba":
        from tinyvlm.kernels import quant_numba  # compiles (or loads from cache) on first use

        return quant_numba.linear(x, w)
    return quant.matvec_ref(w, x) if x.ndim == 1 else quant.matmul_ref(x, w)


def fuse(parts: list[np.ndarray | QuantizedMatrix]) -> list[np.ndarray | QuantizedMatrix]:
    """Matrices that read the same input (q, k, v; gate, up), stacked into one when they are quantized alike.

    One kernel call then reads x once and pays one thread launch instead of several (decode is dominated by
    such overheads on small models). Dense matrices stay separate: BLAS gains nothing, and stacking would copy
    memory-mapped weights into RAM.
    """
    if all(isinstance(p, QuantizedMatrix) for p in parts) and len({(p.kind, p.shape[1]) for p in parts}) == 1:
        return [quant.concat_rows(parts)]  # type: ignore[arg-type]
    return list(parts)


def linear_split(x: np.ndarray, fused: list[np.ndarray | QuantizedMatrix], sizes: list[int]) -> list[np.ndarray]:
    """linear(x, w) for each of the matrices `fuse` was given, whose output sizes are `sizes`."""
    if len(fused) == len(sizes):
        return [linear(x, w) for w in fused]
    y = linear(x, fused[0])  # (..., sum(sizes))
    return np.split(y, np.cumsum(sizes)[:-1], axis=-1)


def _numba_ops() -> ModuleType | None:
    """tinyvlm.kernels.ops_numba when the numba backend is in use (compiled or loaded on first use), else None."""
    if get_backend() != "numba":
        return None
    from tinyvlm.kernels import ops_numba

    return ops_numba


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis of float32 x (..., D) (reference: kernels/norm.py)."""
    ops = _numba_ops()
    return ops.rms_norm(x, weight, eps) if ops else norm.rms_norm(x, weight, eps)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x (H, T, Dh) with cos/sin (T, Dh/2) (reference: kernels/rope.py)."""
    ops = _numba_ops()
    return ops.apply_rope(x, cos, sin) if ops else rope.apply_rope(x, cos, sin)


def decode_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, scale: float) -> np.ndarray:
    """One query's attention over a layer's cache: q (Hq, Dh); keys, values (S_max, Hkv, Dh), of which the
    first `length` positions count. Returns (Hq, Dh) (reference: kernels/attention.py)."""
    ops = _numba_ops()
    if ops:
        return ops.decode_attention(q, keys, values, length, scale)
    k, v = keys[:length].transpose(1, 0, 2), values[:length].transpose(1, 0, 2)  # (Hkv, S, Dh) views
    return attention.grouped_attention(q[:, None], k, v, scale)[:, 0]


def softmax_(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a C-contiguous float32 x with no -inf entries, in place; returns x
    (reference: kernels/attention.py)."""
    ops = _numba_ops()
    return ops.softmax_(x) if ops else attention.softmax(x, out=x)


def _activation_(z: np.ndarray, name: str) -> np.ndarray:
    """z = activations.<name>(z) in place, by ops_numba.<name>_ on the numba backend; returns z."""
    ops = _numba_ops()
    if ops:
        return getattr(ops, name + "_")(z)
    z[...] = getattr(activations, name)(z)
    return z


def quick_gelu_(z: np.ndarray) -> np.ndarray:
    """z = CLIP's z * sigmoid(1.702 z) in place for C-contiguous float32 z; returns z
    (reference: kernels/activations.py)."""
    return _activation_(z, "quick_gelu")


def gelu_(z: np.ndarray) -> np.ndarray:
    """z = the exact (erf) GELU of z in place, for C-contiguous float32 z; returns z
    (reference: kernels/activations.py)."""
    return _activation_(z, "gelu")


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """out = LayerNorm over the last axis of C-contiguous float32 x (..., D), out of x's shape and not x itself;
    returns out (reference: kernels/norm.py)."""
    ops = _numba_ops()
    if ops:
        return ops.layer_norm(x, weight, bias, eps, out)
    out[...] = norm.layer_norm(x, weight, bias, eps)
    return out


def silu_mul_(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate = silu(gate) * up in place, C-contiguous float32 (T, F) each; returns gate
    (reference: kernels/activations.py)."""
    ops = _numba_ops()
    if ops:
        return ops.silu_mul_(gate, up)
    gate[...] = activations.silu(gate) * up
    return gate


def swiglu_(y: np.ndarray) -> np.ndarray:
    """silu(gate) * up for y = [gate | up] (T, 2F) C-contiguous float32, written over the gate half, which is
    returned as a (T, F) view (reference: kernels/activations.py)."""
    ops = _numba_ops()
    if ops:
        return ops.swiglu_(y)
    F = y.shape[1] // 2
    y[:, :F] = activations.silu(y[:, :F]) * y[:, F:]
    return y[:, :F]
