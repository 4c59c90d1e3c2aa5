"""The one place tinyvlm imports numba: whether it is usable, why not, and its thread count.

numba is optional. It is imported on the first call here, never when tinyvlm is imported, so
`python -m tinyvlm --help` stays fast and works without it.

Before the import, OMP_WAIT_POLICY defaults to PASSIVE (a value the user set is kept): numba's OpenMP
threads then sleep between parallel loops instead of spinning. On the 2-core reference VM, busy with
other processes, a 2-thread q4_0 matvec (5632 x 2048) took ~15 ms with spinning threads and ~2.5 ms
passive, and spinning threads starved OpenBLAS's in a following matmul (~1 s instead of ~30 ms).
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

from tinyvlm.errors import TinyVLMError


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    """(numba, "") or (None, the reason it cannot be used). Imported once per process."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when numba loads it
    try:
        import numba
    except Exception as e:  # ImportError, or a broken install (e.g. numba built for another numpy)
        return None, f"numba could not be imported ({type(e).__name__}: {e})"
    return numba, ""


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


def set_threads(n: int) -> None:
    """Run numba's parallel kernels on n threads (1 .. the number of CPUs numba found)."""
    numba = module()
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise TinyVLMError(f"threads must be between 1 and {limit} on this machine, got {n}")
    numba.set_num_threads(n)


def get_threads() -> int:
    """The number of threads numba's parallel kernels run on."""
    return module().get_num_threads()
