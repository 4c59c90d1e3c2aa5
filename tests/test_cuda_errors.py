"""`backend="cuda"` without what it needs gives one clear line naming what is missing (the CLI exits 2): CuPy not
installed, no NVIDIA driver, a driver older than CuPy's CUDA, no device. These run where there is no GPU (CI
installs CuPy for them); on a GPU machine the no-driver cases skip."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tinyvlm import backends
from tinyvlm.errors import TinyVLMError

BACKEND_FREE = True
HAS_CUPY = importlib.util.find_spec("cupy") is not None
ON_DEVICE = os.environ.get("TINYVLM_TEST_CUDA_DEVICE") == "1"
needs_cupy = pytest.mark.skipif(not HAS_CUPY and not os.environ.get("CI"), reason="CuPy is not installed (CI has it)")


def test_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(TinyVLMError, match=r"the cuda backend needs CuPy, which is not installed: "
                                           r"pip install 'tinyvlm\[cuda\]'"):
        backends.make("cuda")


@needs_cupy
@pytest.mark.skipif(ON_DEVICE, reason="this machine has a driver")
def test_without_a_driver():
    with pytest.raises(TinyVLMError, match=r"found no NVIDIA driver on this machine \(no libcuda\)"):
        backends.make("cuda")


@needs_cupy
@pytest.mark.parametrize("driver, count, message", [
    (11040, 1, r"the NVIDIA driver supports CUDA 11\.4, older than the CUDA \d+\.\d+ this CuPy was built for"),
    (99000, 0, r"found 0 CUDA devices, so no device 0"),
])
def test_old_driver_or_no_device(monkeypatch, driver, count, message):
    import cupy

    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: driver)
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: count)
    with pytest.raises(TinyVLMError, match=message):
        backends.make("cuda")


@needs_cupy
@pytest.mark.skipif(ON_DEVICE, reason="this machine has a driver")
def test_cli_says_what_is_missing_and_exits_2(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    command = ["chat", str(tmp_path / "photo.png"), "--model", str(tmp_path), "--backend", "cuda"]
    done = subprocess.run([sys.executable, "-m", "tinyvlm", *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["tinyvlm: error: the cuda backend found no NVIDIA driver on this "
                                                "machine (no libcuda): install the driver for your GPU, or use "
                                                "--backend numba"]
