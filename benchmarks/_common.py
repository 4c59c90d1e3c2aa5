"""Shared pieces of the side-by-side benchmarks: the shapes, random weights, thread pinning, memory and JSON output.

The shapes are MobileVLM_V2-1.7B's (../shared/design/mobilevlm.md section 1.1): MobileLLaMA-1.4B, CLIP ViT-L/14-336
and LDPv2. Speed does not depend on weight values, so every engine runs on random weights. Every bench script
prints exactly one JSON line (a dict) on stdout; run_all.py collects them. Not imported by the package or the tests.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Measure the tinyvlm of the working tree these scripts sit in, whatever `pip install -e` points at.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinyvlm.config import ProjectorConfig, TextConfig, VisionConfig  # noqa: E402

TEXT = TextConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0)
VISION = VisionConfig()  # ViT-L/14-336, select_layer -2: 23 of 24 layers run
PROJECTOR = ProjectorConfig("ldpnetv2", VISION.hidden_size, TEXT.hidden_size)
DATA = REPO.parent / "shared" / "data"
TOKENIZER = DATA / "llama-spm-vocab" / "tokenizer.model"
DEFAULT_CACHE = Path("/tmp/tinyvlm-bench")

# Every thread pool an engine may start: BLAS (OpenBLAS in numpy, MKL in torch), OpenMP, Numba.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def pin_threads(threads: int) -> None:
    """Make every thread pool of this process use `threads` threads.

    BLAS libraries read their thread count when they are loaded, which has already happened (numpy is imported),
    so when the environment does not say `threads` yet, set it and restart this same command in place.
    """
    want = str(threads)
    if all(os.environ.get(v) == want for v in THREAD_VARS):
        return
    env = dict(os.environ, **{v: want for v in THREAD_VARS})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def random_weights(shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 N(0, 0.02) for every tensor, ones for norm scales (so activations keep a sane size)."""
    out = {}
    for name, shape in shapes.items():
        if "norm" in name and name.endswith("weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return out


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """BOS and n-1 random ordinary token ids (3 .. V-1): the prefill prompt every LLM engine gets."""
    rng = np.random.default_rng(seed)
    return [TEXT.bos_token_id] + rng.integers(3, TEXT.vocab_size, n - 1).tolist()


def llm_matrix_params(cfg: TextConfig = TEXT) -> int:
    """Weights in the matrices read per decoded token: every layer's 7 projections and lm_head (not the embedding)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = D * q_out + 2 * D * kv_out + q_out * D + 3 * D * F
    return cfg.num_hidden_layers * per_layer + V * D


def nbytes(value: Any) -> int:
    """Bytes of the arrays held by a weight: an ndarray, a tuple/list/dict of them, or an object with array fields."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values())
    if hasattr(value, "__slots__"):
        return sum(nbytes(getattr(value, s)) for s in value.__slots__)
    return 0


def decode_weight_bytes(weights: Mapping[str, Any]) -> int:
    """Bytes of every LLM matrix read per decoded token, as stored: all weights but the embedding table and norms."""
    return sum(nbytes(w) for name, w in weights.items() if "embed_tokens" not in name and "norm" not in name)


def reset_peak_rss() -> None:
    """Forget the peak resident size so far (Linux), so load-time temporaries do not count as the engine's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not allowed: the peak then includes loading


def peak_rss_mib() -> float:
    """Peak resident size of this process in MiB since the last reset_peak_rss (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def machine_info() -> dict[str, Any]:
    """The CPU (model name and the vector extensions that matter for these kernels), cores and memory."""
    info: dict[str, Any] = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("model name", "?")
        info["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
        flags = set(fields.get("flags", "").split())
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
                        if f in flags]
        info["hypervisor"] = "hypervisor" in flags
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        info["cpu"] = platform.processor() or "?"
    info["python"] = platform.python_version()
    info["numpy"] = np.__version__
    return info


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def emit(record: Mapping[str, Any]) -> str:
    """Print one result as a JSON line, floats rounded for reading; return the line."""
    out = {k: (round(v, 4 if abs(v) < 10 else 2) if isinstance(v, float) else v) for k, v in record.items()}
    line = json.dumps(out)
    print(line, flush=True)
    return line
