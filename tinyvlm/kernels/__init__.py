"""NumPy reference kernels: arrays in, arrays out, no tinyvlm types (style.md section c).

Each op is the test oracle for the faster versions that will sit beside it:
  norm.py         rms_norm, layer_norm (over the last axis)
  activations.py  silu, quick_gelu, gelu (exact, with erf), erf, hardswish, hardsigmoid
  rope.py         rope_tables, apply_rope (rotate-half layout)
  attention.py    softmax (stable, can work in place), grouped_attention (optional mask)
  conv.py         depthwise3x3 (channels-last, zero padding 1, stride 1 or 2)
"""
from tinyvlm.kernels.activations import erf, gelu, hardsigmoid, hardswish, quick_gelu, silu
from tinyvlm.kernels.attention import grouped_attention, softmax
from tinyvlm.kernels.conv import depthwise3x3
from tinyvlm.kernels.norm import layer_norm, rms_norm
from tinyvlm.kernels.rope import apply_rope, rope_tables

__all__ = ["apply_rope", "depthwise3x3", "erf", "gelu", "grouped_attention", "hardsigmoid", "hardswish", "layer_norm",
           "quick_gelu", "rms_norm", "rope_tables", "silu", "softmax"]
