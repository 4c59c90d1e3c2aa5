"""Normalisations over the last axis, NumPy reference kernels: RMSNorm (LLaMA) and LayerNorm (CLIP, LDP).

rms_norm follows transformers' LlamaRMSNorm, layer_norm torch.nn.functional.layer_norm (biased variance);
both compute in the input's float32, as the model files always pass float32.
"""
from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32 like LlamaRMSNorm."""
    inv_rms = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps))  # (..., 1)
    return weight * (x * inv_rms)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, with the biased variance, in float32.

    On a channels-last map [G, G, D] this is timm's LayerNorm2d (LayerNorm over channels at each pixel).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    return xc / np.sqrt(var + np.float32(eps)) * weight + bias
