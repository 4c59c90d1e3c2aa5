"""images/s of `tinyvlm batch`'s loop (tinyvlm/batch.py) on one machine, with random weights: a tiny model (the
tests' shapes) or MobileVLM_V2-1.7B's real shapes (int4 LLM), over distinct images, then over the same images each
asked twice (the second time from the image-embedding cache). One process, the default backend.

With `--model DIR`, instead: the `batch` command itself on that model directory, in one process and then with
`--ray` (a local cluster, `--ray-actors` actors), side by side.

Prints one JSON line per case. Run: `python benchmarks/bench_batch.py --shapes real --images 4 --threads 2`, or
`python benchmarks/bench_batch.py --model DIR --images 8`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import PROJECTOR, TEXT, TOKENIZER, VISION, emit, pin_threads, random_weights

from tinyvlm import batch
from tinyvlm.backends import make
from tinyvlm.config import ModelConfig, ProjectorConfig
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.projector import build_projector, projector_expected_shapes
from tinyvlm.quantize import quantize_language
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, vision_expected_shapes, vision_needed_names
from tinyvlm.vlm import VLM

TINY_TEXT = dataclasses.replace(TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4)
TINY_VISION = dataclasses.replace(VISION, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                  num_attention_heads=2)


def build(shapes: str, threads: int) -> VLM:
    text, vision = (TEXT, VISION) if shapes == "real" else (TINY_TEXT, TINY_VISION)
    projector_cfg = PROJECTOR if shapes == "real" else ProjectorConfig("ldpnetv2", 128, 128)
    backend = make(threads=threads)
    rng = np.random.default_rng(0)
    needed = vision_needed_names(vision)
    tower = VisionTower(vision, random_weights({n: s for n, s in vision_expected_shapes(vision).items()
                                                if n in needed}, rng), backend)
    projector = build_projector(projector_cfg, random_weights(projector_expected_shapes(projector_cfg), rng),
                                backend)
    weights = random_weights(language_expected_shapes(text), rng)
    if shapes == "real":
        weights, _ = quantize_language(text, weights, "int4")
    language = LanguageModel(text, weights, backend)
    vlm = VLM(ModelConfig(text=text, vision=vision, projector=projector_cfg), Tokenizer.from_sentencepiece(TOKENIZER),
              language, tower, projector)
    vlm.warm_up()
    return vlm


def command_against_ray(model: str, images: int, max_tokens: int, actors: int) -> None:
    """The batch command on `model`: one process, then on a local Ray cluster; one JSON line each."""
    import os
    import subprocess
    import sys

    folder = Path(tempfile.mkdtemp(prefix="tinyvlm-bench-batch-ray-"))
    rng = np.random.default_rng(2)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    for how, extra in (("one process", []), (f"ray, {actors} actors", ["--ray", "--ray-actors", str(actors)])):
        out = folder / f"{len(extra)}.jsonl"
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tinyvlm", "batch", str(folder), "--prompt", "Describe the image.",
                               "--out", str(out), "--model", model, "--max-tokens", str(max_tokens), *extra],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - t0
        emit({"bench": "batch_command", "how": how, "model": model, "images": images, "max_tokens": max_tokens,
              "cpus": os.cpu_count(), "seconds_with_load": round(seconds, 2),
              "images_per_s_with_load": round(images / seconds, 3),
              "answer_seconds": round(sum(json.loads(line)["seconds"] for line in out.read_text().splitlines()), 2),
              **({"error": done.stderr.strip().splitlines()[-1]} if done.returncode else {})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model directory: time the batch command, in one process and on Ray")
    ap.add_argument("--ray-actors", type=int, default=2)
    ap.add_argument("--shapes", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--images", type=int, default=8, help="distinct images")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.model:
        return command_against_ray(args.model, args.images, args.max_tokens, args.ray_actors)
    pin_threads(args.threads)
    vlm = build(args.shapes, args.threads)
    folder = Path(tempfile.mkdtemp(prefix="tinyvlm-bench-batch-"))
    rng = np.random.default_rng(1)
    paths = []
    for i in range(args.images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(paths[-1])

    def answer(item: batch.Item) -> tuple[str, int]:
        return vlm.generate(item.prompt, image=item.image, max_new_tokens=args.max_tokens), vlm.stats.answer_tokens

    for case, prompts in (("distinct images", ["Describe the image."]),
                          ("each image asked twice", ["Describe the image.", "What colours are in it?"])):
        vlm.image_cache.clear()
        hits = vlm.image_cache.hits
        todo = [batch.Item(str(p), q) for p in paths for q in prompts]
        writer = batch.Writer(folder / f"{len(prompts)}.jsonl")
        t0 = time.perf_counter()
        counts = batch.run(answer, todo, writer)
        seconds = time.perf_counter() - t0
        writer.close()
        emit({"bench": "batch", "shapes": args.shapes, "case": case, "threads": args.threads,
              "llm": "int4" if args.shapes == "real" else "fp32", "answers": len(todo),
              "max_tokens": args.max_tokens, "failed": counts["failed"], "seconds": round(seconds, 2),
              "answers_per_s": round(len(todo) / seconds, 3), "images_per_s": round(args.images / seconds, 3),
              "cache_hits": vlm.image_cache.hits - hits})


if __name__ == "__main__":
    main()
