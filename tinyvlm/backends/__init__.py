"""Backends: one object per model that owns its arrays, its ops and the preparation of its weights.

    numpy  tinyvlm/backends/numpy.py: the reference and test oracle; runs wherever NumPy does
    numba  tinyvlm/backends/numba.py: Numba kernels for the hot ops, the NumPy backend's for the rest

`make(name, threads)` builds one. The name comes from the caller (`tinyvlm.load(..., backend=...)`, `--backend`),
else from the environment variable TINYVLM_BACKEND, else it is "numba" when numba can be imported and "numpy"
otherwise. Both run one token's quantized matvecs on int8 activations by default (as llama.cpp does), or on
float32 ones (decode_activations, $TINYVLM_DECODE_ACTIVATIONS, --decode-activations). Nothing here is
module-level state: two models with different backends live side by side.
"""
from __future__ import annotations

import os

from tinyvlm.backends.numpy import DECODE_ACTIVATIONS, Array, NumpyBackend, Weight
from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import _numba

BACKENDS = ("numpy", "numba")
Backend = NumpyBackend  # the interface every backend implements (the others subclass it)

__all__ = ["Array", "BACKENDS", "Backend", "DECODE_ACTIVATIONS", "NumpyBackend", "Weight", "default_name", "make"]


def default_name() -> str:
    """TINYVLM_BACKEND when set, else "numba" when numba can be imported, else "numpy"."""
    env = os.environ.get("TINYVLM_BACKEND")
    if env:
        return env
    return "numba" if _numba.available() else "numpy"


def make(name: str | None = None, threads: int | None = None, decode_activations: str | None = None) -> Backend:
    """A new backend `name` (default: default_name()) running on `threads` threads (default: numba's own), with
    one token's activations quantized to int8 before a quantized matrix (decode_activations "int8", the default)
    or kept in float32 ("float32"); the default comes from $TINYVLM_DECODE_ACTIVATIONS when set."""
    if decode_activations is None:
        decode_activations = os.environ.get("TINYVLM_DECODE_ACTIVATIONS") or "int8"
        if decode_activations not in DECODE_ACTIVATIONS:
            raise TinyVLMError(f"unknown decode activations {decode_activations!r} from TINYVLM_DECODE_ACTIVATIONS; "
                               f"expected one of {', '.join(DECODE_ACTIVATIONS)}")
    source = "backend" if name is not None else "TINYVLM_BACKEND"
    name = default_name() if name is None else name
    if name not in BACKENDS:
        raise TinyVLMError(f"unknown backend {name!r} from {source}; expected one of {', '.join(BACKENDS)}")
    if name == "numba":
        from tinyvlm.backends.numba import NumbaBackend

        return NumbaBackend(threads, decode_activations)
    return NumpyBackend(threads, decode_activations)
