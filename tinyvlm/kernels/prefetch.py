"""Prefetch hints for the decode kernels: while a kernel multiplies row o of a weight, it asks for the cache lines
of row o + PREFETCH_ROWS (quant_numba.py, quant_int8.py). Needs numba; imported by those kernel modules only.
Numba caches their compiled kernels keyed by their own files: after editing this one, delete
tinyvlm/kernels/__pycache__/quant_* (a package upgrade replaces every file)."""
from __future__ import annotations

import numpy as np

from tinyvlm.kernels import _numba

numba = _numba.module()  # raises TinyVLMError, saying why, when numba cannot be used
from llvmlite import ir  # noqa: E402  (numba's own dependency)
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# Distances 1 to 4 measured the same (5632 x 2048 q4_0, 2 threads: 16.1-16.8 GB/s).
PREFETCH_ROWS = 2


@intrinsic
def prefetch(typingctx, a, i, j):
    """Hint that a[i, j]'s cache line will be read soon: LLVM's target-independent llvm.prefetch (read, keep
    in all cache levels), which x86-64 lowers to prefetcht0 and ARM64 to prfm pldl1keep. A hint, not a load:
    it never faults or stalls, so it may name a row the loop reaches only later."""
    sig = types.void(a, i, j)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, index, wraparound=False)
        pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32]), "llvm.prefetch")
        # rw = 0 (read), locality = 3 (keep in every cache level), cache type = 1 (data). LLVM's parser upgrades the
        # name without a pointer-type suffix to its own mangling (llvm.prefetch.p0 on LLVM 22); the kernels pass
        # their tests with numba 0.59 (LLVM 14) and 0.68 (LLVM 22)
        builder.call(prefetch, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, inline="always")
def prefetch_row(a: np.ndarray, o: int) -> None:
    """Prefetch every cache line of row o of the 2-D array a (nothing when o is past the last row)."""
    if o < a.shape[0]:
        n = a.shape[1]
        for k in range(0, n, 64 // a.itemsize):
            prefetch(a, o, k)
        prefetch(a, o, n - 1)  # the row's last line, when the row does not start on a line boundary
