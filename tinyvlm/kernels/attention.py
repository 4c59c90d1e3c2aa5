"""Softmax, the NumPy reference kernel shared by CLIP and LLaMA attention and by the samplers.

Numerically stable as torch.softmax is: each row is shifted by its max before exp, so exp never overflows and
-inf entries (masked scores, filtered logits) become exact zeros.
"""
from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)) along `axis`, computed in x's dtype.

    Writes into `out` when given; `out=x` overwrites x and allocates nothing of x's size (attention scores are
    the largest temporaries of a forward pass). Each slice along `axis` needs at least one finite entry.
    """
    e = np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e
