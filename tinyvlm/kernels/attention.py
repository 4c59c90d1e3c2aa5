"""Softmax and grouped-query attention, the NumPy references shared by CLIP and LLaMA attention and the samplers.

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


def grouped_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
              mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T * scale + mask) v per head, with grouped-query heads; float32 in, float32 out.

    q (Hq, T, Dh); keys, values (Hkv, S, Dh) with Hq a multiple of Hkv: query heads j*group .. j*group+group-1
    share kv head j (group = Hq / Hkv). mask (T, S) is added to every head's scores (-inf hides a key), or None.
    Returns (Hq, T, Dh).
    """
    Hq, T, Dh = q.shape
    Hkv = keys.shape[0]
    group = Hq // Hkv
    # Stacking each group's queries makes one batched matmul per kv head, with no copy of keys or values.
    scores = (q.reshape(Hkv, group * T, Dh) @ keys.transpose(0, 2, 1)) * np.float32(scale)  # (Hkv, group*T, S)
    if mask is not None:
        per_query = scores.reshape(Hkv, group, T, -1)  # a view of scores: (Hkv, group, T, S)
        per_query += mask  # (T, S) broadcasts over all heads
    probs = softmax(scores, out=scores)  # in place: no second (Hkv, group*T, S) buffer
    return (probs @ values).reshape(Hq, T, Dh)  # (Hkv, group*T, S) @ (Hkv, S, Dh) -> (Hq, T, Dh)
