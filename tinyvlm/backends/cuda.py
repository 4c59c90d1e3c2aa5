"""The CUDA backend: the whole model on an NVIDIA GPU, from pixels to logits (Jetson Orin, datacenter GPUs).

Arrays are CuPy arrays; GEMMs are cuBLAS's (CuPy matmul), the elementwise and reduction steps CuPy's, and the
rest tinyvlm's Numba-CUDA kernels (kernels/cuda_quant.py, kernels/cuda_ops.py). Why Numba-CUDA for those: one
Python source runs in Numba's CUDA simulator against its NumPy reference on any machine, and compiles to PTX for
sm_87 / sm_90 without a GPU (tests/test_cuda_ptx.py); CUDA C sources would be untestable without a GPU.
Weights go up once, at load: dense 2-D matrices (and embedding tables) as float16 (precision "float16", the
default) or float32 ("float32", for testing); vectors and conv kernels as float32; quantized matrices as stored
(cuda_quant.py's device layout: Q4_0 stays 18 bytes per 32 weights). Each host array is released as soon as
its copy is up, so a Jetson, whose CPU and GPU share one DRAM, never holds two copies of the weights.
Activations are float32; with float16 weights a matmul's input is rounded to float16, and cuBLAS sums in float32.
Quantized matrices: one token through the matvec kernel (float32 activations: decode_activations does not apply
here); longer inputs dequantize the matrix into a scratch of the weight precision, then cuBLAS.
Transfers: `transfers` counts every host<->device copy the backend makes. A decode step copies its token id up
and, with greedy decoding, one id back down (`argmax` runs on the device); nothing else crosses.

`Device` (cuda_device.py) is where arrays live and kernels run: the GPU (`open_device`), or `Device.emulated()`,
NumPy arrays with the kernels' NumPy references, with which the tests run this backend's code without a GPU.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyvlm.backends.cuda_device import Device, open_device
from tinyvlm.backends.numpy import NumpyBackend, Weight
from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import quant
from tinyvlm.kernels.packing import PACKABLE, made
from tinyvlm.weights.pages import release

PRECISIONS = ("float16", "float32")  # how dense weights are kept on the device


@dataclass(frozen=True, eq=False)
class DeviceQuantized:
    """A quantized matrix on the device, in cuda_quant.py's layout; shape (out, in) of the matrix it stands for."""

    kind: str
    shape: tuple[int, int]
    qs: Any
    d: Any
    m: Any


class CudaBackend(NumpyBackend):
    name = "cuda"
    compiles = True

    def __init__(self, threads: int | None = None, decode_activations: str = "int8", vision_weights: str = "float32",
                 precision: str | None = None, device: Device | None = None) -> None:
        super().__init__(threads, decode_activations, vision_weights)
        precision = precision or os.environ.get("TINYVLM_CUDA_PRECISION") or "float16"
        if precision not in PRECISIONS:
            raise TinyVLMError(f"unknown cuda precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.device = device if device is not None else open_device()
        self.xp = self.device.xp
        self._k = self.device.kernels
        self._weight_dtype = np.float16 if precision == "float16" else np.float32
        self.transfers = {"to_device": 0, "to_host": 0}  # host <-> device copies made by this backend
        self._dense_uploads: dict[int, tuple[Any, Any]] = {}  # id(host matrix) -> (weakref to it, device copy)

    def __repr__(self) -> str:
        return f"CudaBackend(device={self.device.name!r}, precision={self.precision!r})"

    @property
    def short_input_tokens(self) -> int:
        return 1

    # ---------------------------------------------------------------- memory and transfers

    def empty(self, shape: Sequence[int], dtype: type = np.float32) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape: Sequence[int], dtype: type = np.float32) -> Any:
        return self.xp.zeros(shape, dtype=dtype)

    def _up(self, a: Any, dtype: type) -> Any:
        self.transfers["to_device"] += 1
        return self.xp.asarray(np.ascontiguousarray(a, dtype=dtype))

    def asarray(self, a: object) -> Any:
        if isinstance(a, self.xp.ndarray):  # already on the device (emulated: any NumPy array)
            return self.xp.ascontiguousarray(a, dtype=np.float32)
        return self._up(a, np.float32)

    def to_host(self, a: Any) -> np.ndarray:
        self.transfers["to_host"] += 1
        return self.device.to_host(a)

    def argmax(self, logits: Any) -> int:
        """The index of the largest of (V,) logits (the first of equals), found on the device: one int comes back."""
        self.transfers["to_host"] += 1
        return int(self.xp.argmax(logits))

    def concat(self, parts: Sequence[Any]) -> Any:
        return self.xp.concatenate(parts, axis=0)

    # ---------------------------------------------------------------- weights, once at load

    def dense(self, w: np.ndarray) -> Any:
        """Up to the device, released on the host: 2-D in the weight precision, anything else float32. The same
        host array twice (a tied model's embedding table as its head) is one device array."""
        known = self._dense_uploads.get(id(w))
        if known is not None and known[0]() is w:
            return known[1]
        up = self._up(w, self._weight_dtype if np.ndim(w) == 2 else np.float32)
        release(w, up)  # emulated, up may be w itself
        if np.ndim(w) == 2 and isinstance(w, np.ndarray):
            self._dense_uploads[id(w)] = (weakref.ref(w), up)  # a weak reference: the host array may go
        return up

    def _quantized(self, qm: quant.QuantizedMatrix) -> DeviceQuantized:
        from tinyvlm.kernels.cuda_quant import device_layout

        qs, d, m = (self._up(a, a.dtype) for a in device_layout(qm))
        for host in (qm.qs, qm.d, qm.m):  # a quantized file's pages (weights/pages.py)
            if host is not None:
                release(host, qs, d, m)
        return DeviceQuantized(qm.kind, qm.shape, qs, d, m)

    def vision_matrix(self, w: np.ndarray) -> Weight:
        if self.vision_weights == "int8" and w.shape[-1] % quant.GROUP == 0:
            q8 = quant.quantize(np.ascontiguousarray(w, dtype=np.float32), "q8_0")
            release(w)
            return self._quantized(q8)
        return self.dense(w)

    def linears(self, groups: Sequence[Sequence[Weight]]) -> list[list[Weight]]:
        """Each group's matrices stacked into one when they are all dense or all quantized alike (one launch reads
        the input once), then uploaded; a packing.Deferred matrix is made first, one at a time."""
        prepared = []
        for group in groups:
            members = [made(w) if isinstance(w, PACKABLE) else w for w in group]
            kinds = {w.kind if isinstance(w, quant.QuantizedMatrix) else "dense" for w in members}
            if len(members) > 1 and len(kinds) == 1:
                members = [_stacked(members)]
            prepared.append([self._quantized(w) if isinstance(w, quant.QuantizedMatrix) else self.dense(w)
                             for w in members])
        return prepared

    # ---------------------------------------------------------------- linear layers

    def linear(self, x: Any, w: Weight, bias: Any = None, out: Any = None) -> Any:
        y = self._quantized_linear(x, w, out) if isinstance(w, DeviceQuantized) else self._dense(x, w, out)
        if bias is not None:
            y += bias
        return y

    def residual_linear(self, x: Any, h: Any, w: Weight) -> Any:
        """x += h @ w.T; one token times a quantized matrix is one launch, the matvec adding into x."""
        if isinstance(w, DeviceQuantized) and h.shape[0] == 1:
            self._k.matvec(w.kind, w.qs, w.d, w.m, self.xp.ascontiguousarray(h).reshape(-1), x.reshape(-1), True)
            return x
        x += self.linear(h, w)
        return x

    def _dense(self, x: Any, w: Any, out: Any = None) -> Any:
        """x @ w.T; float16 w: x rounded to float16, cuBLAS sums in float32, the result float32."""
        if w.dtype == np.float32:
            return self.xp.matmul(x, w.T, out=out)
        y = self.xp.matmul(x.astype(np.float16), w.T).astype(np.float32)
        if out is None:
            return y
        out[...] = y
        return out

    def _quantized_linear(self, x: Any, w: DeviceQuantized, out: Any = None) -> Any:
        if x.ndim == 1 or x.shape[0] == 1:
            y = out if out is not None else self.xp.empty((*x.shape[:-1], w.shape[0]), dtype=np.float32)
            self._k.matvec(w.kind, w.qs, w.d, w.m, self.xp.ascontiguousarray(x).reshape(-1), y.reshape(-1))
            return y
        tile = self.xp.empty(w.shape, dtype=self._weight_dtype)  # (out, in), from CuPy's pool after the first call
        self._k.dequantize(w.kind, w.qs, w.d, w.m, tile)
        return self._dense(x, tile, out)

    def swiglu(self, x: Any, gate_up: Sequence[Weight]) -> Any:
        if len(gate_up) == 1:  # stacked (T, 2F): gate, then up
            y = self.linear(x, gate_up[0])
            half = y.shape[-1] // 2
            gate, up = y[..., :half], y[..., half:]
        else:
            gate, up = (self.linear(x, w) for w in gate_up)
        out = self.xp.empty(gate.shape, dtype=np.float32)
        self._k.silu_mul(self.xp.ascontiguousarray(gate), self.xp.ascontiguousarray(up), out)
        return out

    # ---------------------------------------------------------------- the LLM's other ops

    def embedding(self, table: Any, ids: np.ndarray) -> Any:
        return table[self._up(ids, np.int64)].astype(np.float32)  # (T,) -> (T, D)

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        rows = self.xp.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = self.xp.empty(rows.shape, dtype=np.float32)
        self._k.rms_norm(rows, weight, eps, out)
        return out.reshape(x.shape)

    def rope_tables(self, head_dim: int, n_positions: int, theta: float) -> tuple[Any, Any]:
        """kernels/rope.py's tables, computed on the device with the same roundings (no transfer)."""
        xp = self.xp
        exponent = xp.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = np.float32(1.0) / (theta ** exponent.astype(np.float64)).astype(np.float32)  # (Dh/2,)
        angles = (xp.arange(n_positions, dtype=np.float32)[:, None] * inv_freq).astype(np.float64)  # (S, Dh/2)
        return xp.cos(angles).astype(np.float32), xp.sin(angles).astype(np.float32)

    def apply_rope(self, x: Any, cos: Any, sin: Any) -> Any:
        out = self.xp.empty(x.shape, dtype=np.float32)
        self._k.rope(self.xp.ascontiguousarray(x), self.xp.ascontiguousarray(cos), self.xp.ascontiguousarray(sin),
                     out)
        return out

    def causal_attention(self, q: Any, keys: Any, values: Any, scale: float, pos: int) -> Any:
        xp = self.xp
        Hq, T, Dh = q.shape
        Hkv, S = keys.shape[0], keys.shape[1]
        group = Hq // Hkv
        scores = xp.matmul(q.reshape(Hkv, group * T, Dh), keys.transpose(0, 2, 1))  # (Hkv, group*T, S)
        scores *= np.float32(scale)
        hidden = xp.arange(S)[None, :] > (pos + xp.arange(T))[:, None]  # (T, S): key s after query t's position
        per_query = scores.reshape(Hkv, group, T, S)  # a view of scores
        per_query += xp.where(hidden, np.float32(-np.inf), np.float32(0))
        self._k.softmax_rows_(scores.reshape(-1, S))
        return xp.matmul(scores, values).reshape(Hq, T, Dh)

    def decode_attention(self, q: Any, keys: Any, values: Any, length: int, scale: float) -> Any:
        out = self.xp.empty(q.shape, dtype=np.float32)  # (Hq, Dh)
        self._k.decode_attention(self.xp.ascontiguousarray(q), keys, values, length, scale, out)
        return out

    # ---------------------------------------------------------------- the vision tower's and projector's ops

    def layer_norm(self, x: Any, weight: Any, bias: Any, eps: float, out: Any = None) -> Any:
        rows = self.xp.ascontiguousarray(x).reshape(-1, x.shape[-1])
        y = self.xp.empty(rows.shape, dtype=np.float32)
        self._k.layer_norm(rows, weight, bias, eps, y)
        if out is None:
            return y.reshape(x.shape)
        out[...] = y.reshape(x.shape)
        return out

    def attention(self, q: Any, k: Any, v: Any, scale: float, out: Any) -> Any:
        q *= np.float32(scale)
        scores = self.xp.matmul(q, k.transpose(0, 2, 1))  # (H, T, T)
        self._k.softmax_rows_(scores.reshape(-1, scores.shape[-1]))
        out[...] = self.xp.matmul(scores, v).transpose(1, 0, 2)  # (H, T, Dh) -> (T, H, Dh)
        return out

    def quick_gelu_(self, z: Any) -> Any:
        z *= np.float32(0.5) * (np.float32(1.0) + self.xp.tanh(np.float32(0.851) * z))
        return z

    def gelu_(self, z: Any) -> Any:
        if not z.flags.c_contiguous:
            z[...] = self.gelu_(self.xp.ascontiguousarray(z))
            return z
        self._k.gelu_(z)
        return z

    def relu(self, z: Any) -> Any:
        return self.xp.maximum(z, np.float32(0))

    def hardswish(self, z: Any) -> Any:
        return z * self.xp.clip(z + np.float32(3.0), 0.0, 6.0) / np.float32(6.0)

    def hardsigmoid(self, z: Any) -> Any:
        return self.xp.clip(z / np.float32(6.0) + np.float32(0.5), 0.0, 1.0)

    def depthwise3x3(self, x: Any, w: Any, stride: int) -> Any:
        side = (x.shape[0] - 1) // stride + 1
        out = self.xp.empty((side, side, x.shape[2]), dtype=np.float32)
        self._k.depthwise3x3(self.xp.ascontiguousarray(x), w, stride, out)
        return out


def _stacked(members: list[Any]) -> Any:
    """Matrices that read the same input, as one: rows concatenated (quantized alike, or dense)."""
    if not isinstance(members[0], quant.QuantizedMatrix):
        return np.concatenate([np.asarray(w, dtype=np.float32) for w in members], axis=0)
    first = members[0]
    return quant.QuantizedMatrix(first.kind, (sum(w.shape[0] for w in members), first.shape[1]),
                                 np.concatenate([w.qs for w in members]), np.concatenate([w.d for w in members]),
                                 np.concatenate([w.m for w in members]) if first.m is not None else None)
