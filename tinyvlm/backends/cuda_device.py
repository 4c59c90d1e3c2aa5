"""Where the CUDA backend's arrays live and its kernels run: a GPU through CuPy and Numba-CUDA (`open_device`, which
says in one line what is missing when it cannot be used), or `Device.emulated()`: NumPy arrays and the kernels'
NumPy references, with which the tests run the backend's own code on machines without a GPU."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from tinyvlm.errors import TinyVLMError

# The kernels by name; each call is one CUDA launch (`Device.launches` counts them).
KERNELS = ("matvec", "dequantize", "rms_norm", "layer_norm", "softmax_rows_", "rope", "decode_attention", "silu_mul",
           "gelu_", "depthwise3x3")
INSTALL = "pip install 'tinyvlm[cuda]' (CuPy for CUDA 12 and numba-cuda; a Jetson: see the README)"


@dataclass
class Device:
    """Where a CUDA backend's arrays live (`xp`: cupy or numpy) and its kernels run (`kernels`: launches, or their
    NumPy references); `launches` counts tinyvlm's own kernel launches (CuPy's array operations add theirs)."""

    name: str
    xp: ModuleType
    kernels: SimpleNamespace
    to_host: Callable[[Any], np.ndarray]
    launches: int = 0

    @classmethod
    def emulated(cls) -> Device:
        """NumPy arrays and the kernels' NumPy references: the backend's own code, run without a GPU."""
        return cls("emulated (NumPy, kernel references)", np, SimpleNamespace(), np.array)._with_kernels(True)

    def _with_kernels(self, reference: bool) -> Device:
        from tinyvlm.kernels import cuda_ops, cuda_quant

        for name in KERNELS:
            module = cuda_quant if name in ("matvec", "dequantize") else cuda_ops
            setattr(self.kernels, name, self._counted(getattr(module, name.rstrip("_") + "_ref" if reference else
                                                                  name)))
        return self

    def _counted(self, launch: Callable[..., None]) -> Callable[..., None]:
        def counted(*args: Any) -> None:
            self.launches += 1
            launch(*args)
        return counted


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def open_device(index: int = 0) -> Device:
    """GPU `index` through CuPy and Numba-CUDA; TinyVLMError, naming what is missing, when it cannot be used."""
    try:
        import cupy
    except ImportError:
        raise TinyVLMError(f"the cuda backend needs CuPy, which is not installed: {INSTALL}") from None
    runtime = cupy.cuda.runtime
    driver, built = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    if driver == 0:
        raise TinyVLMError("the cuda backend found no NVIDIA driver on this machine (no libcuda): install the "
                           "driver for your GPU, or use --backend numba")
    if driver < built:
        raise TinyVLMError(f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA "
                           f"{_cuda_version(built)} this CuPy was built for: update the driver, or install the "
                           f"CuPy wheel for CUDA {_cuda_version(driver)}")
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as e:
        raise TinyVLMError(f"the cuda backend cannot reach a GPU: {e}") from None
    if not 0 <= index < count:
        raise TinyVLMError(f"the cuda backend found {count} CUDA devices, so no device {index}")
    try:
        from numba import config as numba_config
        from numba import cuda  # noqa: F401
    except ImportError:
        raise TinyVLMError(f"the cuda backend needs numba-cuda for its kernels, which is not installed: {INSTALL}") \
            from None
    # Every launch, CuPy's and Numba's, goes to the same (default) stream, so they are ordered without a sync;
    # Numba would otherwise synchronize CuPy's stream for each array argument of each launch.
    numba_config.CUDA_ARRAY_INTERFACE_SYNC = False
    cupy.cuda.Device(index).use()
    props = runtime.getDeviceProperties(index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Device(f"{name} (sm_{props['major']}{props['minor']})", cupy, SimpleNamespace(),
                  cupy.asnumpy)._with_kernels(False)
