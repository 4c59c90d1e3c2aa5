"""Every Numba-CUDA kernel compiles to PTX for Jetson Orin (sm_87) and H100 / H200 (sm_90), with the argument types
the CUDA backend launches it with: tests/cuda_ptx.py, run without the simulator. Needs numba-cuda and NVVM (the
pip wheel nvidia-cuda-nvcc-cu12), no driver and no GPU. CI installs both; elsewhere the test skips without them."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cuda_ptx import SIGNATURES

BACKEND_FREE = True


def test_every_kernel_compiles_to_ptx_for_orin_and_hopper():
    if importlib.util.find_spec("numba_cuda") is None and not os.environ.get("CI"):
        pytest.skip("numba-cuda is not installed (CI installs it)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    script = Path(__file__).with_name("cuda_ptx.py")
    done = subprocess.run([sys.executable, str(script), "8.7", "9.0"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=script.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout)
    assert set(sizes) == set(SIGNATURES)
    for kernel, per_target in sizes.items():
        assert set(per_target) == {"sm_87", "sm_90"}, kernel
        assert min(per_target.values()) > 1000, kernel
