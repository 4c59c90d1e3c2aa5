"""Compile every Numba-CUDA kernel of tinyvlm to PTX for the given compute capabilities, with the argument types the
CUDA backend launches it with; print one JSON object {kernel: {"sm_87": ptx bytes, ...}}. Needs NVVM (the CUDA
toolkit's libnvvm), no driver and no GPU. Run without NUMBA_ENABLE_CUDASIM: tests/test_cuda_ptx.py runs it.

    python tests/cuda_ptx.py 8.7 9.0
"""
from __future__ import annotations

import json
import sys

C1, C2, C3 = "[::1]", "[:, ::1]", "[:, :, ::1]"
SCALES = ("float16", "float32")  # cuda_quant.device_layout's d and m
SIGNATURES = {  # kernel -> argument type lists
    "cuda_quant._matvec": [f"int64, uint8{C2}, {s}{C2}, {s}{C2}, float32{C1}, float32{C1}, boolean" for s in SCALES],
    "cuda_quant._dequantize": [f"int64, uint8{C2}, {s}{C2}, {s}{C2}, {o}{C2}" for s in SCALES for o in SCALES],
    "cuda_ops._rms_norm": [f"float32{C2}, float32{C1}, float32, float32{C2}"],
    "cuda_ops._layer_norm": [f"float32{C2}, float32{C1}, float32{C1}, float32, float32{C2}"],
    "cuda_ops._softmax_rows": [f"float32{C2}"],
    "cuda_ops._rope": [f"float32{C3}, float32{C2}, float32{C2}, float32{C3}"],
    "cuda_ops._decode_attention": [f"float32{C2}, float32{C3}, float32{C3}, int64, float32, float32{C2}"],
    "cuda_ops._silu_mul": [f"float32{C1}, float32{C1}, float32{C1}"],
    "cuda_ops._gelu": [f"float32{C1}"],
    "cuda_ops._depthwise3x3": [f"float32{C3}, float32{C3}, int64, float32{C3}"],
}


def main(capabilities: list[str]) -> None:
    from numba import cuda
    from numba.core import types  # noqa: F401  (the names the signatures use)

    from tinyvlm.kernels import cuda_ops, cuda_quant

    modules = {"cuda_quant": cuda_quant, "cuda_ops": cuda_ops}
    kernels = {f"{m}.{n}" for m, module in modules.items() for n, v in vars(module).items()
               if hasattr(v, "py_func") and not v.targetoptions.get("device")}
    assert kernels == set(SIGNATURES), f"kernels without signatures here: {sorted(kernels - set(SIGNATURES))}"
    result: dict[str, dict[str, int]] = {}
    for name, signatures in SIGNATURES.items():
        module, kernel = name.split(".")
        function = getattr(modules[module], kernel).py_func
        for signature in signatures:
            for cc in capabilities:
                major, minor = (int(v) for v in cc.split("."))
                ptx, _ = cuda.compile_ptx(function, f"void({signature})", cc=(major, minor))
                target = f"sm_{major}{minor}"
                assert f".target {target}" in ptx, (name, target)
                result.setdefault(name, {})[target] = result.get(name, {}).get(target, 0) + len(ptx)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
