"""A/B two source trees of tinyvlm on the same saved model files, one short process at a time, alternately.

For a change that should not move speed (a refactor): on a shared, noisy machine a whole run_all.py round per tree
moves by 10-20% between rounds, so this times short rounds in alternating processes, each loading the same files
by memory map (a few seconds, where run_all.py regenerates and requantizes 1.4B random weights per engine).

    python benchmarks/ab_trees.py --trees /path/to/old,/path/to/new --pairs 8

The first call writes a random MobileVLM_V2-1.7B-shaped checkpoint (fp32 safetensors, 6.6 GB) and its int4
quantized copy (`python -m tinyvlm quantize`) into --cache-dir. Each process loads one model with its tree's
`tinyvlm.load`, runs one untimed warm-up, then --repeat timed rounds, and prints one JSON line: prefill tokens/s of
a 192-token prompt, decode tokens/s of 32 greedy steps, and for the image model the image encode seconds. Every
engine runs on 2 threads unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

ONE_ROUND = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import tinyvlm
vlm = tinyvlm.load(sys.argv[2])
lm, repeat, image = vlm.language, int(sys.argv[3]), sys.argv[4] == "image"
ids = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 32000, 191)]
cache = lm.new_cache()

def llm_round():
    cache.reset()
    t0 = time.perf_counter()
    tok = int(np.argmax(lm.forward(lm.embed(ids), cache)))
    t1 = time.perf_counter()
    for _ in range(32):
        tok = int(np.argmax(lm.forward(lm.embed([tok]), cache)))
    return len(ids) / (t1 - t0), 32 / (time.perf_counter() - t1)

pixels = np.random.default_rng(1).standard_normal((3, 336, 336)).astype(np.float32)
def encode_round():
    t0 = time.perf_counter()
    vlm.encode_image(pixels)
    return time.perf_counter() - t0

llm_round(); encode_round() if image else None  # warm-up
out = {"tree": sys.argv[1], "model": sys.argv[2], "prefill_tok_s": [], "decode_tok_s": [], "image_encode_s": []}
for _ in range(repeat):
    if image:
        out["image_encode_s"].append(round(encode_round(), 4))
    else:
        p, d = llm_round()
        out["prefill_tok_s"].append(round(p, 2)); out["decode_tok_s"].append(round(d, 3))
print(json.dumps(out))
"""


def build_models(cache_dir: Path, tree: Path) -> tuple[Path, Path]:
    """(fp32 checkpoint directory, its int4 copy) of MobileVLM_V2-1.7B's shapes, written once."""
    fp32, int4 = cache_dir / "MobileVLM_V2-1.7B-random", cache_dir / "MobileVLM_V2-1.7B-random-int4"
    if not (fp32 / "config.json").is_file():
        code = (f"import sys; sys.path[:0] = [{str(tree)!r}, {str(HERE)!r}]\n"
                "from ab_trees import write_checkpoint; write_checkpoint(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(fp32)], check=True)
    if not int4.is_dir():
        subprocess.run([sys.executable, "-m", "tinyvlm", "quantize", str(fp32), str(int4), "--quant", "int4"],
                       check=True, cwd=tree)
    return fp32, int4


def write_checkpoint(out: str) -> None:
    """A random MobileVLM_V2-1.7B-shaped checkpoint in the published layout (fp32 safetensors)."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from _common import PROJECTOR, TEXT, VISION, random_weights
    from tinyvlm.language import language_expected_shapes
    from tinyvlm.projector import projector_expected_shapes
    from tinyvlm.vision import vision_expected_shapes

    rng = np.random.default_rng(0)
    weights = random_weights(language_expected_shapes(TEXT), rng)
    weights.update({"model.mm_projector." + n: w for n, w in
                    random_weights(projector_expected_shapes(PROJECTOR), rng).items()})
    weights.update({"model.vision_tower.vision_tower." + n: w for n, w in
                    random_weights(vision_expected_shapes(VISION), rng).items()})
    path = Path(out)
    path.mkdir(parents=True)
    save_file(weights, str(path / "model.safetensors"))
    config = {"hidden_size": TEXT.hidden_size, "num_hidden_layers": TEXT.num_hidden_layers,
              "num_attention_heads": TEXT.num_attention_heads, "num_key_value_heads": TEXT.num_key_value_heads,
              "intermediate_size": TEXT.intermediate_size, "vocab_size": TEXT.vocab_size,
              "max_position_embeddings": TEXT.max_position_embeddings, "rms_norm_eps": TEXT.rms_norm_eps,
              "mm_projector_type": "ldpnetv2", "mm_hidden_size": VISION.hidden_size,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2}
    (path / "config.json").write_text(json.dumps(config))
    shutil.copy(HERE.parents[1] / "shared" / "data" / "llama-spm-vocab" / "tokenizer.model", path / "tokenizer.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", required=True, help="two tinyvlm source trees, comma-separated: A,B")
    ap.add_argument("--pairs", type=int, default=6, help="A,B process pairs per model")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/tinyvlm-bench"))
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    fp32, int4 = build_models(args.cache_dir, trees[-1])
    env = dict(os.environ, **{v: str(args.threads) for v in
                              ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    for model, kind in ((int4, "llm"), (fp32, "llm"), (int4, "image")):
        for pair in range(args.pairs):
            for tree in (trees if pair % 2 == 0 else trees[::-1]):  # ABBA: neither tree always goes first
                proc = subprocess.run([sys.executable, "-c", ONE_ROUND, str(tree), str(model), str(args.repeat), kind],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{tree}: {proc.stderr.strip().splitlines()[-1]}")
                line = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps({"time": time.strftime("%H:%M:%S"), "kind": kind, **line}), flush=True)
                slot = results.setdefault((f"{model.name} {kind}", str(tree)), {})
                for key in ("prefill_tok_s", "decode_tok_s", "image_encode_s"):
                    slot.setdefault(key, []).extend(line[key])
    for (model, tree), values in results.items():
        summary = {k: {"median": statistics.median(v), "best": (min if k == "image_encode_s" else max)(v), "n": len(v)}
                   for k, v in values.items() if v}
        print(json.dumps({"summary": model, "tree": tree, **summary}))


if __name__ == "__main__":
    main()
