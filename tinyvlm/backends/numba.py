"""The Numba backend: the NumPy backend with Numba kernels where they are faster (kernels/quant_numba.py,
kernels/ops_numba.py); every other op is the NumPy backend's own.

What runs in Numba, and why only that (each measured on the 2-core reference VM; the kernels' docstrings say more):
* quantized linear layers: for one token (and up to backends.numpy.INT8_MAX_TOKENS), the activations
  quantized to int8 and integer dot products (kernels/quant_int8.py), or with float32 activations a
  fused-dequantization matvec (quant_numba.py); on x86-64 with int8 activations, prompts of GEMM_MIN_TOKENS or
  more go through the int16 GEMM of kernels/quant_gemm.py (1.2-4.5x faster there than the alternative), and prefill
  attention runs in Numba, so that no BLAS call sits between two GEMMs; other long inputs (the vision tower's int8
  layers among them) through dequantized tiles into BLAS;
* the LLM's RMSNorm, RoPE and SwiGLU step, and decode attention over the cache, but decode attention only when
  the layers are quantized: with dense layers every matvec is OpenBLAS's, and Numba's threads, spinning after a
  parallel kernel between them, cost more than the kernel saves (MobileLLaMA-1.4B fp32 decode: 5.3 tok/s with
  NumPy's attention, 4.1 with Numba's);
* the vision tower's softmax, quick-GELU and LayerNorm, and the projector's exact GELU.
Weights: the q/k/v and gate/up matrices are stacked into one when quantized alike (one kernel call reads x once),
and every quantized matrix is copied into one huge-page-aligned buffer (packing.pack_together: decode 18% faster),
converted from a file's blocks one at a time as it is copied (packing.Deferred).
Dense matrices are left where they are: BLAS gains nothing from stacking, and memory-mapped files stay lazy.
numba is imported when the backend is made, never when tinyvlm is imported. Like the model that holds it, a
backend runs one call at a time (it keeps the vision attention's scores buffer between calls).
"""
from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np

from tinyvlm.backends.numpy import NumpyBackend, Weight
from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import _numba, packing
from tinyvlm.kernels.packing import PACKABLE as QUANTIZED
from tinyvlm.kernels.quant import QuantizedMatrix
from tinyvlm.weights.pages import release

GEMM_MIN_TOKENS = 10  # fewer tokens waste most of a panel's 16 lanes: the per-row kernels (quant_int8) are faster


class NumbaBackend(NumpyBackend):
    name = "numba"
    compiles = True

    def __init__(self, threads: int | None = None, decode_activations: str = "int8",
                 vision_weights: str = "float32") -> None:
        super().__init__(threads, decode_activations, vision_weights)
        if not _numba.available():
            raise TinyVLMError(f"the numba backend is unavailable: {_numba.why_unavailable()}; use the numpy backend")
        if threads is not None:
            _numba.check_threads(threads)
        from tinyvlm.kernels import dot_ir, ops_numba, quant_gemm, quant_int8, quant_numba  # compiled or cached

        self._ops: ModuleType = ops_numba
        self._quant: ModuleType = quant_numba
        self._quant_int8: ModuleType | None = quant_int8 if decode_activations == "int8" else None
        # prompts of GEMM_MIN_TOKENS or more on int8 activations: the int16 GEMM, where it measured faster than
        # dequantized tiles into BLAS (x86-64; on ARM64 its form has no integer dot product, and was not timed)
        self._quant_gemm: ModuleType | None = \
            quant_gemm if decode_activations == "int8" and dot_ir.target_family() == "x86" else None
        self._numba_attention = False  # the LLM's attention in Numba: set by `linears` when its layers are quantized
        self._vision_blocks: set[int] = set()  # id(qs) of the vision tower's quantized matrices (vision_matrix)
        self._scores: np.ndarray | None = None  # the vision attention's (T, T) scores, one head at a time

    def activate(self) -> None:
        """Run Numba's parallel kernels on this backend's thread count (numba's setting is per calling thread)."""
        if self.threads is not None:
            _numba.set_threads(self.threads)

    # ---------------------------------------------------------------- weights

    def linears(self, groups: Sequence[Sequence[Weight]]) -> list[list[Weight]]:
        prepared = [[w if isinstance(w, QUANTIZED) else self.dense(w) for w in group] for group in groups]
        packs = [[group] if self._fusable(group) else [[w] for w in group if isinstance(w, QUANTIZED)]
                 for group in prepared]  # group -> the lists of matrices that become one packed matrix each
        flat = [pack for group_packs in packs for pack in group_packs]
        self._numba_attention = bool(flat)
        if not flat:
            return prepared
        packed = iter(packing.pack_together(flat, release))  # the file pages each weight came from are given back
        result = []
        for group, group_packs in zip(prepared, packs):
            if group_packs and len(group_packs[0]) > 1:  # the group stacked into one matrix
                result.append([next(packed)])
            else:
                result.append([next(packed) if isinstance(w, QUANTIZED) else w for w in group])
        return result

    def vision_matrix(self, w: np.ndarray) -> Weight:
        matrix = super().vision_matrix(w)
        if isinstance(matrix, QuantizedMatrix):  # its qs lives as long as the matrix: the id is not reused
            self._vision_blocks.add(id(matrix.qs))
        return matrix

    @staticmethod
    def _fusable(group: list[Weight]) -> bool:
        """Whether the group becomes one stacked matrix: every member quantized with the same kind and width."""
        return len(group) > 1 and all(isinstance(w, QUANTIZED) for w in group) \
            and len({(w.kind, w.shape[1]) for w in group}) == 1  # type: ignore[union-attr]

    # ---------------------------------------------------------------- linear layers

    def _quantized_linear(self, x: np.ndarray, w: QuantizedMatrix, out: np.ndarray | None = None) -> np.ndarray:
        tokens = 1 if x.ndim == 1 else x.shape[0]
        # The vision tower's int8 layers keep dequantized tiles into BLAS: through the GEMM, with BLAS attention
        # between them (OpenBLAS's threads spinning on after it), ViT-L encode measured 3.4-4.7 s against 2.8-3.1
        if self._quant_gemm is not None and tokens >= GEMM_MIN_TOKENS and id(w.qs) not in self._vision_blocks:
            return self._quant_gemm.matmul(x, w, out)
        if self._quant_int8 is not None and tokens <= self.short_input_tokens:  # integers, row by row
            return self._quant_int8.matmul(np.atleast_2d(x), w).reshape(*x.shape[:-1], -1)
        return self._quant.linear(x, w, out)

    def swiglu(self, x: np.ndarray, gate_up: Sequence[Weight]) -> np.ndarray:
        if len(gate_up) == 1:  # gate and up stacked: one (T, 2F) output, activated into its gate half
            return self._ops.swiglu_(self.linear(x, gate_up[0]))
        gate, up = (self.linear(x, w) for w in gate_up)  # (T, F) each
        return self._ops.silu_mul_(gate, up)

    # ---------------------------------------------------------------- the LLM's other ops

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return self._ops.rms_norm(x, weight, eps)

    def apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        return self._ops.apply_rope(x, cos, sin)

    def causal_attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
                         pos: int) -> np.ndarray:
        if not self._numba_attention:  # dense layers: BLAS
            return super().causal_attention(q, keys, values, scale, pos)
        return self._ops.causal_attention(q, keys, values, scale, pos)

    def decode_attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int,
                         scale: float) -> np.ndarray:
        if not self._numba_attention:  # dense layers: see the module docstring
            return super().decode_attention(q, keys, values, length, scale)
        return self._ops.decode_attention(q, keys, values, length, scale)

    # ---------------------------------------------------------------- vision and projector

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   out: np.ndarray | None = None) -> np.ndarray:
        return self._ops.layer_norm(x, weight, bias, eps, np.empty_like(x) if out is None else out)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
        """One head at a time into one reused (T, T) buffer: its scores stay in cache through the softmax and the
        second product (7% faster than one batched (H, T, T) pass at ViT-L shapes, and 1.3 MB instead of 21 MB)."""
        T = q.shape[1]
        if self._scores is None or self._scores.shape[0] != T:
            self._scores = np.empty((T, T), dtype=np.float32)
        q *= np.float32(scale)
        for h in range(q.shape[0]):
            scores = np.matmul(q[h], k[h].T, out=self._scores)  # (T, Dh) @ (Dh, T) -> (T, T)
            np.matmul(self._ops.softmax_(scores), v[h], out=out[:, h])  # (T, T) @ (T, Dh) -> (T, Dh)
        return out

    def quick_gelu_(self, z: np.ndarray) -> np.ndarray:
        return self._ops.quick_gelu_(z)

    def gelu_(self, z: np.ndarray) -> np.ndarray:
        return self._ops.gelu_(z)
