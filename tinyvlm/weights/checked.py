"""The one strict check of tensors against what a model expects, and the one "... and N more" listing.

Every reader reports every missing, unexpected and misshaped tensor in one WeightsError (style.md b3): a
TensorStore checking a checkpoint's files, the model parts building themselves through `read_checked`, and the
GGUF loaders.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tinyvlm.errors import WeightsError
from tinyvlm.limits import shown

MAX_LISTED = 20  # names listed per kind of problem


def listing(names: Iterable[str], limit: int = MAX_LISTED) -> str:
    """`a, b, c` or `a, b ... and 7 more`."""
    names = [shown(n) for n in names]  # names come from files
    text = ", ".join(names[:limit])
    return text if len(names) <= limit else f"{text} ... and {len(names) - limit} more"


def check_tensors(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str, *,
                  optional: Iterable[str] = (), ignore: Callable[[str], bool] | None = None) -> None:
    """Raise one WeightsError, prefixed by `where`, naming every tensor of `expected` that `shapes` lacks or holds
    with another shape, and every tensor of `shapes` that is not expected; return if there is none.

    `optional` names may be absent (and, when present, are shape-checked if expected and never unexpected);
    `ignore(name)` marks present tensors the model does not use.
    """
    optional = set(optional)
    missing = [n for n in expected if n not in shapes and n not in optional]
    unexpected = [n for n in shapes if n not in expected and n not in optional and not (ignore and ignore(n))]
    misshaped = [f"{n} (file {list(shapes[n])}, expected {list(s)})"
                 for n, s in expected.items() if n in shapes and tuple(shapes[n]) != tuple(s)]
    problems = [f"{label} ({len(items)}): {listing(sorted(items))}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
                if items]
    if problems:
        raise WeightsError(f"{where}: the weights do not match the model; {'; '.join(problems)}")


def read_checked(weights: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> dict[str, Any]:
    """Read each expected tensor present in `weights` once (extra tensors are neither read nor refused), after
    checking that every one is there with its shape. Values come back as read: the caller converts them."""
    w = {n: weights[n] for n in expected if n in weights}
    check_tensors({n: tuple(a.shape) for n, a in w.items()}, expected, f"{what} weights")
    return w


def check_shapes(weights: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """read_checked's check without reading anything when `weights` can tell a tensor's shape (a `shape(name)`
    method, as store.StoreView has): for a caller that then reads the tensors a few at a time."""
    shape_of = getattr(weights, "shape", None)
    shapes = {n: tuple(shape_of(n) if callable(shape_of) else weights[n].shape) for n in expected if n in weights}
    check_tensors(shapes, expected, f"{what} weights")


def check_layer_count(names: Iterable[str], pattern: str, count: int, what: str, where: str) -> None:
    """The layers the tensor `names` hold (their numbers, group 1 of `pattern`) must be exactly 0 .. count - 1: a
    WeightsError naming `what` says otherwise. Run before anything is built per layer from a count in a header.
    Numbers are compared as written, so "01", "١" or a 5,000-digit number is never a layer."""
    held = {m.group(1) for n in names if (m := re.match(pattern, n))}
    if len(held) == count and held == {str(i) for i in range(count)}:  # sized by the file before it is built
        return
    plain = {h for h in held if h.isascii() and h.isdigit() and len(h) <= 9 and (h == "0" or h[0] != "0")}
    numbers = sorted(map(int, plain))
    found = f"layers {numbers[0]} to {numbers[-1]} ({len(numbers)} in all)" if numbers else "no layer 0, 1, ..."
    odd = sorted(held - plain)
    extra = f", and layers numbered {listing(odd, 3)}" if odd else ""
    raise WeightsError(f"{where}: {what} is {count}, but the weights hold {found}{extra}")
