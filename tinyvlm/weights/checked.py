"""Strict reading of a model part's tensors from any name -> array mapping (a TensorStore or a plain dict).

The vision tower and the projectors build themselves through `read_checked`, which reports every missing and
misshaped tensor in one WeightsError (style.md b3).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tinyvlm.errors import WeightsError


def read_checked(
    weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str
) -> dict[str, np.ndarray]:
    """Read each expected tensor once, as contiguous float32 (no copy if it already is).

    Raises one WeightsError listing every missing and every misshaped tensor.
    """
    present = set(weights)
    w = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in expected if n in present}
    missing = sorted(set(expected) - present)
    wrong = sorted(f"{n} {w[n].shape} (expected {s})" for n, s in expected.items() if n in w and w[n].shape != s)
    if missing or wrong:
        raise WeightsError(f"{what} weights: missing {missing or 'none'}; wrong shape {wrong or 'none'}")
    return w
