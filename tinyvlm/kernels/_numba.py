"""The one place tinyvlm imports numba: whether it is usable, why not, and its thread count.

numba is optional. It is imported on the first call here, never when tinyvlm is imported, so
`python -m tinyvlm --help` stays fast and works without it.

Before the import, numba's OpenMP threads are told to spin only briefly between parallel loops
(OMP_WAIT_POLICY=ACTIVE with GOMP_SPINCOUNT=100000, about a millisecond; values the user set are kept).
Sleeping at once (PASSIVE) costs a wake-up per kernel call, which dominates decode on small models;
spinning without limit starves OpenBLAS's threads in the matmuls that follow. SmolLM2-135M Q4_1 on the
2-core reference VM, 2 threads, prefill / decode tokens/s: passive 441 / 42, unlimited spin 161 / 64,
spin count 30000 398 / 63, 300000 411 / 61.

On x86-64 CPUs with AVX-512, LLVM's tuning for Intel server cores ("prefer-256-bit") vectorizes with
256-bit registers only; numba is told to use the full 512 bits (NUMBA_CPU_FEATURES = the host's
features + "-prefer-256-bit"), unless the user set NUMBA_CPU_FEATURES or NUMBA_CPU_NAME. On the
reference VM (Sapphire Rapids class) this made the q4 decode matvec over MobileLLaMA-1.4B's matrices
about 14% faster (13.0 -> 14.9 GB/s) when freshly compiled. Loaded from numba's on-disk cache, that
kernel then measured 12-15% slower than a fresh compile of the same source, in the same process. Only
parallel (prange) kernels showed it, with 1 thread as with 2; a fresh process runs the parallel loop body
from its own first compilation, placed elsewhere in memory, not the copy the cache stores, and a sampling
profile put the extra time in the loads that touched each row before its dot product. Since those loads
became prefetch hints for a row ahead (quant_numba), cached and fresh kernels measure the same.
Other CPUs (ARM64, AVX2-only x86) are left alone.
"""
from __future__ import annotations

import functools
import os
import platform
from types import ModuleType

from tinyvlm.errors import TinyVLMError


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    """(numba, "") or (None, the reason it cannot be used). Imported once per process."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:  # read by libgomp at load
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
        os.environ["GOMP_SPINCOUNT"] = "100000"
    _prefer_512_bit_vectors()
    try:
        import numba
    except Exception as e:  # ImportError, or a broken install (e.g. numba built for another numpy)
        return None, f"numba could not be imported ({type(e).__name__}: {e})"
    return numba, ""


def _prefer_512_bit_vectors() -> None:
    """Set NUMBA_CPU_FEATURES to the host's features without "prefer-256-bit" on AVX-512 x86-64 (see above)."""
    if "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ:
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        import llvmlite.binding as llvm  # numba's own dependency; importing it does not load numba

        features = llvm.get_host_cpu_features()
    except Exception:  # no llvmlite, or LLVM cannot read the host: numba will report its own problem
        return
    if features.get("avx512f"):
        os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"


def available() -> bool:
    """Whether the numba kernels can run here."""
    return _import()[0] is not None


def why_unavailable() -> str:
    """The reason numba cannot be used, or "" when it can."""
    return _import()[1]


def module() -> ModuleType:
    """The numba module; raises TinyVLMError saying why when it is missing."""
    numba, reason = _import()
    if numba is None:
        raise TinyVLMError(f"the numba backend is unavailable: {reason}; use the numpy backend")
    return numba


def check_threads(n: int) -> None:
    """Raise TinyVLMError unless numba's parallel kernels can run on n threads (1 .. the CPUs numba found)."""
    limit = module().config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise TinyVLMError(f"threads must be between 1 and {limit} on this machine, got {n}")


def set_threads(n: int) -> None:
    """Run numba's parallel kernels on n threads, from the calling thread (n checked by check_threads)."""
    module().set_num_threads(n)


def get_threads() -> int:
    """The number of threads numba's parallel kernels run on."""
    return module().get_num_threads()
