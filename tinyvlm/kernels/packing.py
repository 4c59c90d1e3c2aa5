"""Quantized matrices packed into one huge-page-aligned buffer at load, each made only when its turn comes.

Decode streams every weight once per token. In separate arrays the weights sit mostly on 4 KiB pages, and the page
walks cost more than the arithmetic saves: on the reference VM, MobileLLaMA-1.4B int4 decode ran at 13.5 tok/s
from the quantizer's arrays and 15.9 from one buffer, which NumPy marks for transparent huge pages (madvise, its
default on Linux for arrays of 4 MiB and more). Where huge pages are off this is one copy and no change in speed.

A loader that has to convert a file's blocks (GGUF: Q4_K to q4_1, Q6_K to q6_k, even Q4_0's re-layout) hands over
`Deferred` matrices instead: their kind and shape, and how to make them. pack_together makes each one as it
copies it, and lets it go, so the converted copies of the whole model never exist beside the buffer (MobileLLaMA-
1.4B Q4_K_M: they were 0.9 GB of the load's peak).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tinyvlm.kernels.quant import GROUP, QuantizedMatrix

HUGE_PAGE = 2 << 20  # bytes: the x86-64 and common ARM64 transparent huge page


@dataclass(frozen=True, eq=False)
class Deferred:
    """A QuantizedMatrix of `kind` and `shape` (out, in) that `make()` builds when it is needed."""

    kind: str
    shape: tuple[int, int]
    make: Callable[[], QuantizedMatrix]


Packable = QuantizedMatrix | Deferred
PACKABLE = (QuantizedMatrix, Deferred)  # for isinstance: a matrix, or one made when it is packed


def array_layout(kind: str, shape: tuple[int, int]) -> list[tuple[str, tuple[int, int], type]]:
    """(field, shape, dtype) of each array a QuantizedMatrix of `kind` and `shape` holds in memory (quant.py's
    layout), in the order qs, d, m."""
    out, n_in = shape
    if kind == "q6_k":
        return [("qs", (out, 3 * n_in // 4), np.uint8), ("d", (out, n_in // 16), np.float32)]
    qs = ("qs", (out, n_in), np.int8) if kind == "q8_0" else ("qs", (out, n_in // 2), np.uint8)
    scales = [("d", (out, n_in // GROUP), np.float32)]
    return [qs, *scales, *([("m", (out, n_in // GROUP), np.float32)] if kind == "q4_1" else [])]


def made(member: Packable) -> QuantizedMatrix:
    """The QuantizedMatrix itself, or a Deferred one made now (checked to be of the kind and shape it said)."""
    qm = member.make() if isinstance(member, Deferred) else member
    if (qm.kind, tuple(qm.shape)) != (member.kind, tuple(member.shape)):
        raise ValueError(f"a deferred {member.kind} matrix of shape {member.shape} made a {qm.kind} one of "
                         f"shape {qm.shape}")
    return qm


def pack_together(groups: list[list[Packable]], copied: Callable[[np.ndarray], None] | None = None
                  ) -> list[QuantizedMatrix]:
    """One matrix per group, its members' rows stacked in order (one kind and input width per group: q, k and v
    read the same input, so one kernel call serves them), all arrays in one buffer aligned to a huge page, each
    array to 64 bytes. A Deferred member is made when its rows are copied, and dropped after. `copied(a)` is
    called on each source array once its values are in the buffer. Stacking here copies each weight once."""
    for group in groups:
        if len({(m.kind, m.shape[1]) for m in group}) != 1:
            raise ValueError("pack_together stacks matrices of one kind and one input width per group")
    layouts = [array_layout(group[0].kind, (sum(m.shape[0] for m in group), group[0].shape[1])) for group in groups]
    sizes = [[-(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64 for _, shape, dtype in layout]
             for layout in layouts]  # each rounded up to a cache line
    buffer = np.empty(sum(map(sum, sizes)) + HUGE_PAGE, dtype=np.uint8)
    offset = -buffer.ctypes.data % HUGE_PAGE
    packed = []
    for group, layout, group_sizes in zip(groups, layouts, sizes):
        views = {}
        for (field, shape, dtype), size in zip(layout, group_sizes):
            views[field] = buffer[offset:offset + size].view(dtype)[:int(np.prod(shape))].reshape(shape)
            offset += size
        row = 0
        for member in group:
            qm = made(member)
            for field, view in views.items():
                a = getattr(qm, field)
                view[row:row + a.shape[0]] = a
                if copied is not None:  # the loader's: give back a memory-mapped file's pages (weights/pages.py)
                    copied(a)
            row += qm.shape[0]
            del qm  # a Deferred member's arrays go now, before the next one is made
        packed.append(QuantizedMatrix(group[0].kind, (row, group[0].shape[1]), views["qs"], views["d"],
                                      views.get("m")))
    return packed
