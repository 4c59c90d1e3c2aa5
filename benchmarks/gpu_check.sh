#!/usr/bin/env bash
# The one prepared run for a GPU machine (issue 12): the CUDA tests on the device, then the GPU benchmark; about
# 5 minutes. Needs what `pip install -e ".[cuda,test]"` installs (on a machine without the network, bring them as
# wheels). Prints the tests' summary, then one JSON line per engine (benchmarks/bench_cuda.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TINYVLM_TEST_CUDA_DEVICE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 240 python -m pytest -q -x tests/test_cuda_kernels.py tests/test_cuda_backend.py tests/test_cuda_errors.py
timeout 300 python benchmarks/run_all.py --backend cuda --repeat 5
