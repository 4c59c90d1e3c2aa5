"""The CUDA backend (backends/cuda.py) end to end on the tiny V1 and V2 checkpoints, against the CPU's float32
results (the NumPy backend, itself checked against PyTorch in test_vlm.py).

Without a GPU the backend runs on its emulated device: NumPy arrays and the kernels' NumPy references, so that its
own code (uploads, layouts, stacking, fp16 casts, masks, the greedy path, the transfer count) is what is tested;
the kernels themselves are checked against those references in test_cuda_kernels.py. With
TINYVLM_TEST_CUDA_DEVICE=1 the same tests run on the GPU.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import tinyvlm
from tinyvlm.config import GenerationConfig
from tinyvlm.generate import generate_tokens

pytest.importorskip("numba")
from tinyvlm.backends.cuda import CudaBackend, Device  # noqa: E402

BACKEND_FREE = True
ON_DEVICE = os.environ.get("TINYVLM_TEST_CUDA_DEVICE") == "1"
pytestmark = pytest.mark.torch  # the checkpoints are written through torch
QUESTION = "What is in the image?"
STEPS = 16


def cuda(precision: str) -> CudaBackend:
    return CudaBackend(precision=precision, device=None if ON_DEVICE else Device.emulated())


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def host(backend: CudaBackend, a) -> np.ndarray:
    return backend.to_host(a) if not isinstance(a, np.ndarray) else a


def greedy(vlm, ids: list[int], image_tokens) -> list[int]:
    cache = vlm.language.new_cache()
    config = GenerationConfig(max_new_tokens=STEPS)
    return list(generate_tokens(vlm.language, vlm.embed(ids, [image_tokens]), cache, config, stop_ids={2},
                                history=[t for t in ids if t >= 0]))


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).uniform(-1.8, 2.1, (3, 336, 336)).astype(np.float32)


@pytest.fixture(scope="module")
def cpu(checkpoints):
    return {k: tinyvlm.load(checkpoints[k].path, backend="numpy") for k in ("v1", "v2")}


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_float32_mode_matches_the_cpu(name, checkpoints, cpu, pixels):
    """Vision features, projector output and logits within 1e-4 relative; greedy ids identical for 16 steps."""
    ref, bk = cpu[name], cuda("float32")
    vlm = tinyvlm.load(checkpoints[name].path, backend=bk)
    assert rel_err(vlm.vision_features(pixels), ref.vision_features(pixels)) <= 1e-4
    tokens, tokens_ref = vlm.encode_image(pixels), ref.encode_image(pixels)
    assert rel_err(host(bk, tokens), tokens_ref) <= 1e-4
    ids = ref.prompt_ids(QUESTION)
    assert rel_err(vlm.logits(ids, image=pixels), ref.logits(ids, image=pixels)) <= 1e-4
    ours = greedy(vlm, ids, tokens)
    assert ours == greedy(ref, ids, tokens_ref) and len(ours) == STEPS


def test_float16_mode_error_against_float32(checkpoints, cpu, pixels):
    """Dense weights in float16 on the device (the default): the error against the CPU's float32, stated."""
    ref, bk = cpu["v2"], cuda("float16")
    vlm = tinyvlm.load(checkpoints["v2"].path, backend=bk)
    ids = ref.prompt_ids(QUESTION)
    assert rel_err(vlm.vision_features(pixels), ref.vision_features(pixels)) <= 2e-3
    assert rel_err(host(bk, vlm.encode_image(pixels)), ref.encode_image(pixels)) <= 5e-3
    assert rel_err(vlm.logits(ids, image=pixels), ref.logits(ids, image=pixels)) <= 5e-3


def test_int4_matches_the_cpu_on_float_activations(checkpoints, pixels):
    """Q4_0 on the device (decode through the matvec kernel, prefill through dequantization and a GEMM) against
    the NumPy backend's Q4_0 with float32 activations: the same quantized matrices, float32 arithmetic."""
    ref = tinyvlm.load(checkpoints["text"].path, backend="numpy", quant="int4", decode_activations="float32")
    vlm = tinyvlm.load(checkpoints["text"].path, backend=cuda("float32"), quant="int4")
    ids = ref.prompt_ids("Tell me a story.", image=False)
    assert rel_err(vlm.logits(ids), ref.logits(ids)) <= 1e-4
    cache, cache_ref = vlm.language.new_cache(), ref.language.new_cache()
    logits = [m.language.forward(m.embed(ids), c) for m, c in ((vlm, cache), (ref, cache_ref))]
    for _ in range(4):  # decode steps: the matvec kernel's path
        assert rel_err(*logits) <= 1e-4
        token = int(np.argmax(logits[1]))
        logits = [m.language.forward(m.embed([token]), c) for m, c in ((vlm, cache), (ref, cache_ref))]


def test_a_decode_step_moves_one_id_each_way(checkpoints):
    """Greedy decoding: per step the token id goes up and its successor comes back; nothing else crosses."""
    bk = cuda("float16")
    vlm = tinyvlm.load(checkpoints["text"].path, backend=bk, quant="int4")
    cache = vlm.language.new_cache()
    embeds = vlm.embed(vlm.prompt_ids("Hello there", image=False))
    steps = generate_tokens(vlm.language, embeds, cache, GenerationConfig(max_new_tokens=8), stop_ids=set(),
                            history=[])
    first = next(steps)  # the prompt's prefill, then the first id back
    before, launches = dict(bk.transfers), bk.device.launches
    rest = list(steps)
    assert isinstance(first, int) and len(rest) == 7
    assert bk.transfers == {"to_device": before["to_device"] + 7, "to_host": before["to_host"] + 7}
    per_step = (bk.device.launches - launches) / 7
    # per layer: 2 RMSNorms, 4 matvecs (q/k/v and gate/up stacked; o_proj and down_proj adding into the residual),
    # 2 RoPEs, attention, SwiGLU's product; then the final norm and the head
    assert per_step == 2 * (2 + 4 + 2 + 1 + 1) + 2


def test_the_gpu_benchmark_runs_on_the_emulated_device():
    """benchmarks/bench_cuda.py, the run prepared for a GPU machine, at the real widths with one layer: every field
    of its line is there, so that the one run on a lent GPU cannot fail on the script itself."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    done = subprocess.run([sys.executable, "bench_cuda.py", "--engine", "tinyvlm", "--emulated", "--layers", "1",
                           "--repeat", "1", "--decode-tokens", "2"], capture_output=True, text=True, cwd=bench,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in record, record
    assert record["prompt_tokens"] == 192 and record["tinyvlm_launches_per_decode_step"] == 10 + 2
    assert all(record[k] > 0 for k in ("image_encode_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s"))


def test_one_host_matrix_is_one_device_array():
    """A tied model's embedding table serves as its head: uploaded once, in the weight precision."""
    bk = cuda("float16")
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    first = bk.dense(table)
    assert bk.dense(table) is first and first.dtype == np.float16 and bk.transfers["to_device"] == 1
    assert bk.dense(np.ones(3, np.float32)).dtype == np.float32  # vectors stay float32
