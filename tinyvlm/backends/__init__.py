"""Backends: one object per model that owns its arrays, its ops and the preparation of its weights.

    numpy  tinyvlm/backends/numpy.py: the reference and test oracle; runs wherever NumPy does
    numba  tinyvlm/backends/numba.py: Numba kernels for the hot ops, the NumPy backend's for the rest
    cuda   tinyvlm/backends/cuda.py: everything on an NVIDIA GPU (CuPy + Numba-CUDA); only when asked for

`make(name, threads)` builds one. The name comes from the caller (`tinyvlm.load(..., backend=...)`, `--backend`),
else from the environment variable TINYVLM_BACKEND, else it is "numba" when numba can be imported and "numpy"
otherwise. Both run one token's quantized matvecs on int8 activations by default (as llama.cpp does), or on
float32 ones (decode_activations, $TINYVLM_DECODE_ACTIVATIONS, --decode-activations), and keep the vision tower's
linear weights in float32 by default or as int8 blocks (vision_weights, $TINYVLM_VISION_WEIGHTS, --vision-weights).
Nothing here is module-level state: two models with different backends live side by side.
"""
from __future__ import annotations

import os

from tinyvlm.backends.numpy import DECODE_ACTIVATIONS, VISION_WEIGHTS, Array, NumpyBackend, Weight
from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import _numba

BACKENDS = ("numpy", "numba", "cuda")
Backend = NumpyBackend  # the interface every backend implements (the others subclass it)

__all__ = ["Array", "BACKENDS", "Backend", "DECODE_ACTIVATIONS", "NumpyBackend", "VISION_WEIGHTS", "Weight",
           "default_name", "make"]


def default_name() -> str:
    """TINYVLM_BACKEND when set, else "numba" when numba can be imported, else "numpy"."""
    env = os.environ.get("TINYVLM_BACKEND")
    if env:
        return env
    return "numba" if _numba.available() else "numpy"


def _from_env(value: str | None, variable: str, default: str, choices: tuple[str, ...], what: str) -> str:
    """value, else $variable when set (checked here, so that its error names the variable), else default."""
    if value is not None:
        return value
    value = os.environ.get(variable) or default
    if value not in choices:
        raise TinyVLMError(f"unknown {what} {value!r} from {variable}; expected one of {', '.join(choices)}")
    return value


def make(name: str | None = None, threads: int | None = None, decode_activations: str | None = None,
         vision_weights: str | None = None) -> Backend:
    """A new backend `name` (default: default_name()) running on `threads` threads (default: numba's own), with
    one token's activations quantized to int8 before a quantized matrix (decode_activations "int8", the default)
    or kept in float32 ("float32"), and the vision tower's linear weights kept in float32 (vision_weights
    "float32", the default) or as q8_0 blocks ("int8"); the defaults come from $TINYVLM_DECODE_ACTIVATIONS and
    $TINYVLM_VISION_WEIGHTS when set."""
    decode_activations = _from_env(decode_activations, "TINYVLM_DECODE_ACTIVATIONS", "int8", DECODE_ACTIVATIONS,
                                   "decode activations")
    vision_weights = _from_env(vision_weights, "TINYVLM_VISION_WEIGHTS", "float32", VISION_WEIGHTS, "vision weights")
    source = "backend" if name is not None else "TINYVLM_BACKEND"
    name = default_name() if name is None else name
    if name not in BACKENDS:
        raise TinyVLMError(f"unknown backend {name!r} from {source}; expected one of {', '.join(BACKENDS)}")
    if name == "numba":
        from tinyvlm.backends.numba import NumbaBackend

        return NumbaBackend(threads, decode_activations, vision_weights)
    if name == "cuda":
        from tinyvlm.backends.cuda import CudaBackend

        return CudaBackend(threads, decode_activations, vision_weights)
    return NumpyBackend(threads, decode_activations, vision_weights)
