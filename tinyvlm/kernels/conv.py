"""Depthwise 3x3 convolution on channels-last maps, the NumPy reference kernel of the LDP / LDPv2 projectors.

Computes what torch.nn.functional.conv2d(x, w, stride=s, padding=1, groups=D) does on the [D, G, G] layout,
on the projectors' channels-last [G, G, D] layout instead.
"""
from __future__ import annotations

import numpy as np


def depthwise3x3(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """Depthwise 3x3 cross-correlation, zero padding 1: x [G, G, D], w [3, 3, D] -> [G/stride, G/stride, D].

    out[i, j] = sum over u, v of w[u, v] * x_padded[stride*i + u, stride*j + v]: nine shifted slices, no pixel loop.
    """
    G = x.shape[0]
    Go = (G - 1) // stride + 1
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))  # (G, G, D) -> (G+2, G+2, D)
    span = stride * (Go - 1) + 1
    out = np.zeros((Go, Go, x.shape[2]), dtype=np.float32)
    for u in range(3):
        for v in range(3):
            out += padded[u : u + span : stride, v : v + span : stride] * w[u, v]
    return out
