"""Torch reference for the MobileVLM projectors (LDP and LDPv2), written from mobilevlm.md sections 3.2, 3.3 and 5.

A test oracle, also used to build checkpoint fixtures: each module's state_dict keys are exactly the checkpoint
names after `model.mm_projector.`. Built from plain torch.nn layers (torchvision is not importable with this torch),
arranged as torchvision's InvertedResidual / SqueezeExcitation so the parameter paths come out the same.

    LDPNetProjector(mm_hidden, hidden)    V1 `ldpnet`:   [B, P, C_in] -> [B, P/4, D]
    LDPNetV2Projector(mm_hidden, hidden)  V2 `ldpnetv2`: [B, P, C_in] -> [B, P/4, D]
"""
from __future__ import annotations

import math

import torch
from torch import nn


def se_width(d: int) -> int:
    """torchvision's _make_divisible(d // 4, 8)."""
    v = d // 4
    s = max(8, int(v + 4) // 8 * 8)
    return s + 8 if s < 0.9 * v else s


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, D, H, W] map, at each pixel (timm LayerNorm2d), eps 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    """Mean over space, fc1 (1x1 conv) + ReLU, fc2 (1x1 conv) + Hardsigmoid, scale the channels."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV3 block with no expansion: block.0 dw3x3+LN+Hardswish, block.1 SE, block.2 pw1x1+LN."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.use_residual = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
                LayerNorm2d(channels, eps=1e-5),
                nn.Hardswish(),
            ),
            SqueezeExcitation(channels, se_width(channels)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-5)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def _to_map(y: torch.Tensor) -> torch.Tensor:
    """[B, P, D] -> [B, D, G, G] with F[b, c, r, k] = y[b, r*G + k, c]."""
    b, p, d = y.shape
    g = math.isqrt(p)
    return y.permute(0, 2, 1).reshape(b, d, g, g)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, D, g, g] -> [B, g*g, D], row-major."""
    return x.flatten(2).transpose(1, 2)


class LDPBlock(nn.Module):
    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(hidden, 1), InvertedResidual(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_tokens(self.mb_block(_to_map(self.mlp(x))))


class LDPNetProjector(nn.Module):
    """LDP v1 (`ldpnet`): keys `model.mlp.{1,3}.*`, `model.mb_block.{1,2}.block.*`."""

    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        self.model = LDPBlock(mm_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Wrap(nn.Module):
    """Holds one Sequential under the same attribute name as the wrapper (hence `mlp.mlp.*`, `peg.peg.*`)."""

    def __init__(self, name: str, seq: nn.Sequential) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


class LDPNetV2Projector(nn.Module):
    """LDP v2 (`ldpnetv2`): keys `mlp.mlp.{0,2}.*`, `peg.peg.0.*`. MLP, AdaptiveAvgPool2d((12, 12)), PEG."""

    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        self.mlp = _Wrap("mlp", nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)))
        self.dwn = nn.AdaptiveAvgPool2d((12, 12))
        self.peg = _Wrap("peg", nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, bias=True, groups=hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.dwn(_to_map(self.mlp(x)))
        return _to_tokens(pooled + self.peg(pooled))
