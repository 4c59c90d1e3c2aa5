"""Shared test fixtures. Real data lives in ../shared/data (see its README)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# No test may find a model in the user's real Hugging Face cache.
_EMPTY_HF = tempfile.mkdtemp(prefix="tinyvlm-empty-hf-")
os.environ["HF_HUB_CACHE"] = _EMPTY_HF
os.environ.pop("TINYVLM_MODEL", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    """Tiny random checkpoints in the published layouts, with their torch reference (tests/checkpoints.py)."""
    from tests.checkpoints import build

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "v1": build(root, "MobileVLM-tiny", "ldpnet", "bin-bf16", seed=1),
        "v2": build(root, "MobileVLM_V2-tiny", "ldpnetv2", "bin-bf16", seed=2),
        "v2-safetensors": build(root, "MobileVLM_V2-tiny-st", "ldpnetv2", "safetensors-sharded", seed=3),
        "text": build(root, "MobileLLaMA-tiny", None, "bin-fp16", seed=4),
    }
