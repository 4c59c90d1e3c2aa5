"""tinyvlm.projector against the torch oracle in tests/torch_ldp.py (float32). erf and GELU: test_kernels.py."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tinyvlm.backends import Backend
from tinyvlm.config import ProjectorConfig
from tinyvlm.errors import ConfigError, WeightsError
from tinyvlm.projector import build_projector, projector_expected_shapes, se_width

if TYPE_CHECKING:
    import torch

REL_TOL = 1e-5  # max |ours - torch| / max |torch|; measured below 1e-6


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights with spread: N(0, 0.1) for linear/conv kernels, LayerNorm gains 1 + N(0, 0.1), biases N(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_ln_gain = name.endswith(".1.weight") and p.ndim == 1
            p.copy_(1.0 + 0.1 * noise if is_ln_gain else 0.1 * noise)


def make(kind: str, c_in: int, d: int, seed: int = 0) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    from tests.torch_ldp import LDPNetProjector, LDPNetV2Projector

    oracle = {"ldpnet": LDPNetProjector, "ldpnetv2": LDPNetV2Projector}[kind](c_in, d).eval()
    randomise(oracle, seed)
    return oracle, {k: v.detach().numpy() for k, v in oracle.state_dict().items()}


def run_torch(oracle: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return oracle(torch.from_numpy(x)[None])[0].numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", ["ldpnet", "ldpnetv2"])
@pytest.mark.parametrize("c_in, d", [(64, 128), (128, 128), (128, 96), (64, 76)])
def test_matches_torch(kind: str, c_in: int, d: int, backend: Backend) -> None:
    oracle, weights = make(kind, c_in, d)
    proj = build_projector(ProjectorConfig(kind, c_in, d), weights, backend)
    x = np.random.default_rng(1).standard_normal((576, c_in)).astype(np.float32)
    ours, ref = proj(x), run_torch(oracle, x)
    assert ours.shape == ref.shape == (144, d) and ours.dtype == np.float32
    assert np.abs(ref).max() > 0.5
    assert rel_err(ours, ref) <= REL_TOL


def _transposed_tokens(x: np.ndarray, side: int) -> np.ndarray:
    """Reorder tokens as if the grid were read column-major (an H/W swap)."""
    return x.reshape(side, side, -1).transpose(1, 0, 2).reshape(side * side, -1)


@pytest.mark.parametrize("kind", ["ldpnet", "ldpnetv2"])
def test_hw_swap_is_detected(kind: str, backend: Backend) -> None:
    """A swapped grid still runs; with asymmetric 3x3 kernels it must give clearly different tokens."""
    import torch

    oracle, weights = make(kind, 64, 128, seed=3)
    x = np.random.default_rng(2).standard_normal((576, 64)).astype(np.float32)
    ours = build_projector(ProjectorConfig(kind, 64, 128), weights, backend)(x)
    swapped = _transposed_tokens(run_torch(oracle, _transposed_tokens(x, 24)), 12)
    assert rel_err(ours, run_torch(oracle, x)) <= REL_TOL
    assert rel_err(ours, swapped) > 100 * REL_TOL
    # symmetric kernels (w == w^T per channel) make the swap invisible: that is what the test above relies on
    sym = {k: (v + v.transpose(0, 1, 3, 2)) / 2 if v.shape[-2:] == (3, 3) else v for k, v in weights.items()}
    oracle.load_state_dict({k: torch.from_numpy(v) for k, v in sym.items()})
    ours_sym = build_projector(ProjectorConfig(kind, 64, 128), sym, backend)(x)
    swapped_sym = _transposed_tokens(run_torch(oracle, _transposed_tokens(x, 24)), 12)
    assert rel_err(ours_sym, swapped_sym) <= REL_TOL


def test_se_width() -> None:
    assert se_width(2048) == 512 and se_width(2560) == 640 and se_width(4096) == 1024
    assert se_width(96) == 24
    assert se_width(76) == 24  # 19 rounds to 16 < 0.9 * 19, so one more step of 8
    assert se_width(100) == 24  # 25 rounds down to 24


def test_expected_shapes_real_sizes() -> None:
    v1 = projector_expected_shapes(ProjectorConfig("ldpnet", 1024, 2048))
    assert len(v1) == 24
    assert v1["model.mb_block.2.block.1.fc1.weight"] == (512, 2048, 1, 1)
    assert v1["model.mlp.1.weight"] == (2048, 1024)
    v2 = projector_expected_shapes(ProjectorConfig("ldpnetv2", 1024, 2560))
    assert v2 == {"mlp.mlp.0.weight": (2560, 1024), "mlp.mlp.0.bias": (2560,), "mlp.mlp.2.weight": (2560, 2560),
                  "mlp.mlp.2.bias": (2560,), "peg.peg.0.weight": (2560, 1, 3, 3), "peg.peg.0.bias": (2560,)}
    with pytest.raises(ConfigError, match="mlp2x_gelu"):
        projector_expected_shapes(ProjectorConfig("mlp2x_gelu", 1024, 2048))


def test_bad_inputs(backend: Backend) -> None:
    _, weights = make("ldpnet", 64, 96)
    cfg = ProjectorConfig("ldpnet", 64, 96)
    proj = build_projector(cfg, weights, backend)
    for shape in [(575, 64), (625, 64), (576, 32), (576,), (0, 64)]:
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            proj(np.zeros(shape, np.float32))
    assert proj(np.zeros((64, 64), np.float32)).shape == (16, 96)  # any even square grid works
    broken = dict(weights)
    del broken["model.mb_block.2.block.1.fc2.bias"]
    broken["model.mlp.3.weight"] = np.zeros((96, 64), np.float32)
    with pytest.raises(WeightsError, match=r"missing \(1\): .*fc2\.bias; wrong shape \(1\): model\.mlp\.3\.weight \(file \[96, 64\], "
                                           r"expected \[96, 96\]\)"):
        build_projector(cfg, broken, backend)
