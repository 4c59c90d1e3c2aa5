"""Give back the pages of a memory-mapped weight file once a tensor's contents have been copied out of it.

A tensor read from a mapped file and converted (float16 to float32, GGUF blocks to the kernels' layout, quantized
matrices packed into one buffer) leaves the file pages it read resident in this process: they count in its RSS as
much as the copy does, for as long as the mapping lives, and it lives as long as any zero-copy weight in it. On
MobileVLM_V2-1.7B int4 that doubled the model in memory. madvise(MADV_DONTNEED) on a read-only shared file mapping
drops the pages from the process only: the kernel's page cache keeps them, and a later read of the same bytes (a
zero-copy weight that shares a page) faults them back in unchanged. Nothing is done for any other memory, on other
systems, or when the call fails: it is an optimisation, never a change in what is read.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import numpy as np

_MADV_DONTNEED = 4  # the same value on Linux and macOS


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _in_read_only_map(a: np.ndarray) -> bool:
    """Whether a's memory is a read-only np.memmap's (a view of one, at any depth)."""
    base: object = a
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return base.mode == "r"
        base = base.base
    return False


def release(a: np.ndarray, *keep: object) -> None:
    """Drop the pages under `a` from this process if `a` lies in a read-only memory-mapped file and no array in
    `keep` (what was made from it) shares its memory; otherwise do nothing."""
    madvise = _madvise()
    if madvise is None or a.size == 0 or not _in_read_only_map(a):
        return
    if any(isinstance(k, np.ndarray) and np.shares_memory(a, k) for k in keep):
        return
    extents = [(n - 1) * stride for n, stride in zip(a.shape, a.strides)]
    low = a.ctypes.data + sum(min(e, 0) for e in extents)
    high = a.ctypes.data + sum(max(e, 0) for e in extents) + a.itemsize  # one past a's last byte
    first, last = low // mmap.PAGESIZE * mmap.PAGESIZE, -(-high // mmap.PAGESIZE) * mmap.PAGESIZE
    madvise(first, last - first, _MADV_DONTNEED)
