"""Rotary position embedding in the rotate-half layout (LLaMA as in transformers), NumPy reference kernels.

Follows transformers' LlamaRotaryEmbedding (the tables) and `apply_rotary_pos_emb` (the rotation), which pair
element j of a head vector with element j + Dh/2.
"""
from __future__ import annotations

import numpy as np


def rope_tables(head_dim: int, n_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (n_positions, Dh/2), for the rotate-half RoPE (the full tables repeat them twice).

    Rounded like transformers' LlamaRotaryEmbedding, whose tables are float32 all the way: inv_freq is
    theta^(2j/Dh) rounded to float32 and then inverted in float32, and the angle position * inv_freq is a
    float32 product (at position 2000 its rounding moves cos by ~1e-4, more than any later step, so the
    angles must not be computed in float64). Only cos/sin are evaluated in float64 and rounded once,
    which lands within one float32 ulp of torch.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # (Dh/2,)
    inv_freq = np.float32(1.0) / (theta ** exponent.astype(np.float64)).astype(np.float32)  # (Dh/2,)
    angles = np.arange(n_positions, dtype=np.float32)[:, None] * inv_freq  # (S, Dh/2), float32 product
    angles64 = angles.astype(np.float64)
    return np.cos(angles64).astype(np.float32), np.sin(angles64).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head vector [x1 | x2] to [x1*cos - x2*sin | x2*cos + x1*sin]; x (H, T, Dh), cos/sin (T, Dh/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (H, T, Dh/2) each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (H, T, Dh)
