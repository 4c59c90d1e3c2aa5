"""End to end without torch: a tiny LLaMA GGUF written from seeded NumPy weights, with Q4_0, Q4_1 and Q8_0
matrices, loaded by tinyvlm.load; its logits and greedy tokens against values recorded on x86-64 and committed in
tests/fixtures/golden_logits.json, one set per backend.

The file is the same bytes on every machine (uniform weights from the generator's integers, quantized by gguf-py's
NumPy code: exact IEEE arithmetic only; its sha256 is checked first), so a difference comes from the computation.
.ci/arm64.sh runs this test as aarch64 code under qemu: other vector code (NEON, not AVX2) and another BLAS build
sum in other orders, so the logits are compared with a tolerance (GOLDEN_RTOL) and the greedy tokens exactly (the
file is written only when every greedy choice leads the runner-up by far more than that tolerance).

After a deliberate change of the arithmetic (new kernels), regenerate the file on x86-64 (both backends):
    python -m tests.test_golden_logits --write
Without --write it prints how far this machine's numbers are from the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.gguf_header import add_llama_header, add_tiny_vocab

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden_logits.json"
# max |ours - golden| / max |golden|, for the prompt's last logits and the last decode step's. Measured, aarch64
# (qemu, NUMBA_CPU_NAME=neoverse-n1) against the x86-64 file: numpy 8.7e-7 (prefill) and 5.0e-7 (decode), numba
# 6.7e-7 and 7.2e-7; on x86-64, numba's kernels loaded from its cache against freshly compiled ones: 6.0e-7 (decode).
GOLDEN_RTOL = 1e-5
# A greedy choice recorded in the file leads the runner-up by at least this, relative to max |logits|.
MIN_MARGIN = 100 * GOLDEN_RTOL

V, D, F, LAYERS, HEADS, KV_HEADS, CONTEXT = 97, 128, 352, 3, 4, 2, 64  # V prime, F = 11 blocks of 32
KINDS = ("Q4_0", "Q4_1", "Q8_0")
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = [1, 17, 42, 5, 88, 23, 61, 9, 70, 33, 3, 54]
STEPS = 8


# ---------------------------------------------------------------- the model file

def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float, centre: float = 0.0) -> np.ndarray:
    """centre + scale * U(-1, 1) in float32; Generator.random is integers times 2**-53, so no libm is involved."""
    return (centre + scale * (2.0 * rng.random(shape) - 1.0)).astype(np.float32)


def write_model(path: Path) -> Path:
    """The LLaMA GGUF: every 2-D weight quantized, kinds rotating over matrices and layers (each matrix slot sees
    Q4_0, Q4_1 and Q8_0 once), the embedding F16, norms F32; a small byte-level BPE vocabulary."""
    import gguf

    rng = np.random.default_rng(20240611)
    w = gguf.GGUFWriter(path, arch="llama")
    add_llama_header(w, "golden-tiny-llama", context=CONTEXT, width=D, layers=LAYERS, ffn=F, heads=HEADS,
                     kv_heads=KV_HEADS, eps=1e-5)
    add_tiny_vocab(w, V)

    def matrix(name: str, rows: int, cols: int, kind: str) -> None:
        a = _uniform(rng, (rows, cols), 1.7 / np.sqrt(cols))  # std ~1/sqrt(cols): activations stay O(1)
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    w.add_tensor("token_embd.weight", _uniform(rng, (V, D), 1.0).astype(np.float16))
    dh = D // HEADS
    shapes = {"attn_q": (D, D), "attn_k": (KV_HEADS * dh, D), "attn_v": (KV_HEADS * dh, D),
              "attn_output": (D, D), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", _uniform(rng, (D,), 0.2, 1.0))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", _uniform(rng, (D,), 0.2, 1.0))
        for j, m in enumerate(MATRICES):
            matrix(f"blk.{i}.{m}.weight", *shapes[m], KINDS[(i + j) % len(KINDS)])
    w.add_tensor("output_norm.weight", _uniform(rng, (D,), 0.2, 1.0))
    matrix("output.weight", V, D, "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- what is recorded

def run(path: Path, backend: str) -> dict:
    """The prompt's last logits, STEPS greedy tokens (one at a time through the KV cache) and the logits of the
    last step, on `backend`."""
    import tinyvlm
    from tinyvlm.config import GenerationConfig
    from tinyvlm.generate import generate_tokens

    vlm = tinyvlm.load(path, backend=backend)
    lm = vlm.language
    prefill = vlm.logits(PROMPT)[-1]  # (V,)
    cache = lm.new_cache(max_len=CONTEXT)
    logits = lm.forward(lm.embed(PROMPT), cache)  # (V,)
    greedy, margins = [], []
    for _ in range(STEPS):
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]) / float(np.abs(logits).max()))
        greedy.append(int(np.argmax(logits)))
        logits = lm.forward(lm.embed(greedy[-1:]), cache)
    loop = list(generate_tokens(lm, lm.embed(PROMPT), lm.new_cache(max_len=CONTEXT),
                                GenerationConfig(max_new_tokens=STEPS), stop_ids=(), history=[]))
    return {"prefill": prefill, "decode": logits, "greedy": greedy, "loop": loop, "margin": min(margins)}


def rel_diff(ours: np.ndarray, golden: list[float]) -> float:
    ref = np.asarray(golden, dtype=np.float64)
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("golden") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def golden(model_file: Path) -> dict:
    data = json.loads(GOLDEN.read_text())
    assert sha256(model_file) == data["gguf_sha256"], (
        "the GGUF written here is not the file the golden values were recorded from (weights, quantizer or the "
        "gguf package changed): regenerate with `python -m tests.test_golden_logits --write`")
    return data


def test_logits_and_greedy_tokens_match_the_golden_file(model_file: Path, golden: dict, backend_name: str) -> None:
    want = golden[backend_name]
    got = run(model_file, backend_name)
    hint = "after a deliberate change of the arithmetic: python -m tests.test_golden_logits --write"
    assert got["greedy"] == want["greedy"], hint
    assert got["loop"] == got["greedy"]  # the generation loop's ids are the step-by-step ones
    for key in ("prefill", "decode"):
        diff = rel_diff(got[key], want[key])
        assert diff <= GOLDEN_RTOL, f"{key} logits: max|diff| / max|golden| = {diff:.2e} ({hint})"


# ---------------------------------------------------------------- python -m tests.test_golden_logits [--write]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record {GOLDEN.name} from this machine")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "tiny-llama.gguf")
        results = {name: run(path, name) for name in ("numpy", "numba")}
        digest = sha256(path)
    if not args.write:
        data = json.loads(GOLDEN.read_text())
        print(f"{platform.machine()}: file {'matches' if digest == data['gguf_sha256'] else 'DIFFERS'}")
        for name, got in results.items():
            want = data[name]
            print(f"{name}: greedy {'equal' if got['greedy'] == want['greedy'] else 'DIFFERENT'}; max|diff| / "
                  f"max|golden|: prefill {rel_diff(got['prefill'], want['prefill']):.2e}, decode "
                  f"{rel_diff(got['decode'], want['decode']):.2e}; smallest greedy margin {got['margin']:.2e}")
        return
    for name, got in results.items():
        if got["margin"] < MIN_MARGIN or got["loop"] != got["greedy"]:
            sys.exit(f"{name}: a greedy choice is a near tie (margin {got['margin']:.1e}); change the seed or prompt")
    import numba

    lines = [f'"about": {json.dumps("written by python -m tests.test_golden_logits --write")}',
             f'"recorded_on": "{platform.machine()}, numpy {np.__version__}, numba {numba.__version__}"',
             f'"gguf_sha256": "{digest}"']
    for name, got in results.items():  # one line per array: float32 values in 9 significant digits (exact)
        arrays = [f'"greedy": {json.dumps(got["greedy"])}'] + [
            f'"{key}": [{", ".join(f"{v:.9g}" for v in got[key])}]' for key in ("prefill", "decode")]
        lines.append(f'"{name}": {{\n  ' + ",\n  ".join(arrays) + "}")
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
