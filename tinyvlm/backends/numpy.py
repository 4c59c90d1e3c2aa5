"""The NumPy backend: the reference every other backend is tested against, and what runs without numba.

A backend is one object per model. It owns the array module, every allocation the model makes, every op the
model calls, and the preparation of weights at load; model code (vision, projector, language, cache) calls
only its backend. Ops take and return this backend's arrays. Dense linear weights are (out, in) float32 arrays
and go to BLAS (numpy @); quantized ones are QuantizedMatrix objects (kernels/quant.py), multiplied here by
dequantizing (the reference arithmetic). The numeric definitions live in tinyvlm.kernels.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import activations, attention, conv, norm, quant, rope
from tinyvlm.kernels.packing import PACKABLE, made
from tinyvlm.kernels.quant import QuantizedMatrix
from tinyvlm.weights.pages import release

Array = Any  # an array of a backend's array module (numpy.ndarray here)
Weight = Any  # a linear layer's (out, in) matrix: a backend's dense array or a QuantizedMatrix
# Decode activations times a quantized matrix: quantized to int8 per block of 32 first, for integer dot products as
# llama.cpp does (the default), or float32 (the previous kernels, kept as the reference and an option). "Decode" is
# any input of at most INT8_MAX_TOKENS tokens; here longer prompts multiply in float32 (the reference). The Numba
# backend multiplies them on int8 activations too on x86-64 (kernels/quant_gemm.py), in float32 elsewhere.
DECODE_ACTIVATIONS = ("int8", "float32")
# How the vision tower's linear weights are kept: float32 (the reference), or int8 = q8_0 blocks, a quarter of the
# memory (ViT-L/14: 1.16 GB -> 0.31 GB), dequantized tile by tile into BLAS as the LLM's prefill is.
VISION_WEIGHTS = ("float32", "int8")
INT8_MAX_TOKENS = 16


class NumpyBackend:
    """NumPy everywhere; quantized weights through the reference (de)quantization of kernels/quant.py."""

    name = "numpy"
    xp = np  # the array module
    compiles = False  # whether kernels are compiled (or loaded from a cache) before their first use

    def __init__(self, threads: int | None = None, decode_activations: str = "int8",
                 vision_weights: str = "float32") -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise TinyVLMError(f"threads must be an integer of at least 1, got {threads!r}")
        if decode_activations not in DECODE_ACTIVATIONS:
            raise TinyVLMError(f"unknown decode activations {decode_activations!r}; expected one of "
                               f"{', '.join(DECODE_ACTIVATIONS)}")
        if vision_weights not in VISION_WEIGHTS:
            raise TinyVLMError(f"unknown vision weights {vision_weights!r}; expected one of "
                               f"{', '.join(VISION_WEIGHTS)}")
        self.threads = threads  # no effect here: NumPy's BLAS reads OPENBLAS_NUM_THREADS when it starts
        self.decode_activations = decode_activations  # what a quantized matrix multiplies a short input in
        self.vision_weights = vision_weights

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(threads={self.threads}, decode_activations={self.decode_activations!r}, "
                f"vision_weights={self.vision_weights!r})")

    @property
    def short_input_tokens(self) -> int:
        """Inputs of at most this many tokens take the decode path through quantized matrices."""
        return INT8_MAX_TOKENS if self.decode_activations == "int8" else 1

    def activate(self) -> None:
        """Make this backend's settings current for the calling thread; called at the start of each forward."""

    # ---------------------------------------------------------------- memory

    def empty(self, shape: Sequence[int], dtype: type = np.float32) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape: Sequence[int], dtype: type = np.float32) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def asarray(self, a: object) -> np.ndarray:
        """Host data as a C-contiguous float32 array of this backend (no copy when it already is one)."""
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        """What leaves the model (logits, features) as a NumPy array."""
        return a

    def argmax(self, logits: np.ndarray) -> int:
        """The index of the largest of (V,) logits (the first of equals): greedy decoding's next id."""
        return int(np.argmax(logits))

    def concat(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Arrays joined along their first axis."""
        return np.concatenate(parts, axis=0)

    # ---------------------------------------------------------------- weights, once at load

    def dense(self, w: np.ndarray) -> np.ndarray:
        """A float weight (norm, bias, embedding, conv kernel, dense matrix) as this backend keeps it: C-contiguous
        float32, with no copy when it already is (so memory-mapped files stay lazy)."""
        return np.ascontiguousarray(w, dtype=np.float32)

    def vision_matrix(self, w: np.ndarray) -> Weight:
        """A vision tower's linear weight (out, in): dense float32, or q8_0 blocks when vision_weights is "int8"."""
        if self.vision_weights == "int8" and w.shape[-1] % quant.GROUP == 0:
            q8 = quant.quantize(self.dense(w), "q8_0")
            release(w)  # a float32 file's own pages, when w was one (weights/pages.py)
            return q8
        return self.dense(w)

    def linears(self, groups: Sequence[Sequence[Weight]]) -> list[list[Weight]]:
        """The LLM's linear weights, prepared once at load. Each group holds matrices that read the same input
        (q, k, v; gate, up; or one matrix alone); what comes back is read by linear_split and swiglu. A
        packing.Deferred matrix is made here."""
        return [[made(w) if isinstance(w, PACKABLE) else self.dense(w) for w in group]
                for group in groups]

    # ---------------------------------------------------------------- linear layers

    def linear(self, x: np.ndarray, w: Weight, bias: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        """x @ w.T (+ bias) for x (T, in) or (in,) and w (out, in); into `out` (T, out) when given."""
        if isinstance(w, QuantizedMatrix):
            y = self._quantized_linear(x, w, out)
            if out is not None and y is not out:
                out[...] = y
                y = out
        else:
            y = np.matmul(x, w.T, out=out)  # (T, in) -> (T, out)
        if bias is not None:
            y += bias
        return y

    def residual_linear(self, x: np.ndarray, h: np.ndarray, w: Weight) -> np.ndarray:
        """x += h @ w.T, in place, for the residual stream x (T, out) and h (T, in); returns x."""
        x += self.linear(h, w)
        return x

    def _quantized_linear(self, x: np.ndarray, w: QuantizedMatrix, out: np.ndarray | None = None) -> np.ndarray:
        """x @ dequantize(w).T for x (T, in) or (in,); each token's x quantized to int8 first with int8 activations
        and T <= INT8_MAX_TOKENS. A backend may write the result into `out` (T, out) and return it."""
        if self.decode_activations == "int8" and (x.ndim == 1 or x.shape[0] <= self.short_input_tokens):
            return np.stack([quant.matvec_int8_ref(w, row) for row in np.atleast_2d(x)]).reshape(*x.shape[:-1], -1)
        return quant.matvec_ref(w, x) if x.ndim == 1 else quant.matmul_ref(x, w)

    def linear_split(self, x: np.ndarray, group: Sequence[Weight], sizes: Sequence[int]) -> list[np.ndarray]:
        """linear(x, w) for each matrix of a group prepared by `linears`, whose output sizes are `sizes`."""
        if len(group) == len(sizes):
            return [self.linear(x, w) for w in group]
        y = self.linear(x, group[0])  # the group stacked into one matrix: (T, sum(sizes))
        return np.split(y, np.cumsum(sizes)[:-1], axis=-1)

    def swiglu(self, x: np.ndarray, gate_up: Sequence[Weight]) -> np.ndarray:
        """silu(x @ gate.T) * (x @ up.T) for a (gate, up) group prepared by `linears`: (T, D) -> (T, F)."""
        gate, up = (self.linear(x, w) for w in gate_up)
        return activations.silu(gate) * up

    # ---------------------------------------------------------------- the LLM's other ops

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows of table (V, D) for host ids (T,), already checked to lie in [0, V): (T, D)."""
        return table[ids]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return norm.rms_norm(x, weight, eps)

    def rope_tables(self, head_dim: int, n_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin, (n_positions, Dh/2) each."""
        return rope.rope_tables(head_dim, n_positions, theta)

    def apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x (H, T, Dh) rotated by cos/sin (T, Dh/2)."""
        return rope.apply_rope(x, cos, sin)

    def causal_attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
                         pos: int) -> np.ndarray:
        """Queries q (Hq, T, Dh) at positions pos .. pos+T-1 over keys, values (Hkv, pos+T, Dh), each query seeing
        the keys up to its own position; returns (Hq, T, Dh)."""
        T = q.shape[1]
        # Query t (position pos+t) may see keys 0 .. pos+t: -inf above that diagonal. (T, pos+T)
        mask = np.triu(np.full((T, pos + T), -np.inf, dtype=np.float32), k=pos + 1) if T > 1 else None
        return attention.grouped_attention(q, keys, values, scale, mask)

    def decode_attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int,
                         scale: float) -> np.ndarray:
        """One query per head, q (Hq, Dh), over the first `length` positions of a layer's whole cache (S, Hkv, Dh);
        returns (Hq, Dh)."""
        k, v = keys[:length].transpose(1, 0, 2), values[:length].transpose(1, 0, 2)  # (Hkv, S, Dh) views
        return attention.grouped_attention(q[:, None], k, v, scale)[:, 0]

    # ---------------------------------------------------------------- the vision tower's and projector's ops

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   out: np.ndarray | None = None) -> np.ndarray:
        """LayerNorm over the last axis; into `out` (x's shape, not x itself) when given."""
        y = norm.layer_norm(x, weight, bias, eps)
        if out is None:
            return y
        out[...] = y
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
        """Unmasked multi-head attention: q, k, v (H, T, Dh) into out (T, H, Dh); q is scaled in place."""
        q *= np.float32(scale)
        for h in range(q.shape[0]):
            out[:, h] = attention.softmax(q[h] @ k[h].T) @ v[h]  # (T, T) @ (T, Dh) -> (T, Dh)
        return out

    def quick_gelu_(self, z: np.ndarray) -> np.ndarray:
        """z = CLIP's z * sigmoid(1.702 z), in place; returns z."""
        z[...] = activations.quick_gelu(z)
        return z

    def gelu_(self, z: np.ndarray) -> np.ndarray:
        """z = the exact (erf) GELU of z, in place; returns z."""
        z[...] = activations.gelu(z)
        return z

    def relu(self, z: np.ndarray) -> np.ndarray:
        return np.maximum(z, np.float32(0))

    def hardswish(self, z: np.ndarray) -> np.ndarray:
        return activations.hardswish(z)

    def hardsigmoid(self, z: np.ndarray) -> np.ndarray:
        return activations.hardsigmoid(z)

    def depthwise3x3(self, x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
        """Channels-last depthwise 3x3 conv, zero padding 1: x (G, G, D), w (3, 3, D) -> (G/stride, G/stride, D)."""
        return conv.depthwise3x3(x, w, stride)

    def avg_pool2x2(self, x: np.ndarray) -> np.ndarray:
        """2x2 average pooling of a channels-last map: (G, G, D) -> (G/2, G/2, D)."""
        G, D = x.shape[0], x.shape[2]
        return x.reshape(G // 2, 2, G // 2, 2, D).mean(axis=(1, 3))
