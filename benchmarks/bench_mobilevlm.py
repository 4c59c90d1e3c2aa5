"""Speed of the whole MobileVLM_V2-1.7B path at its real shapes, with random weights (speed does not depend on them).

Prints one JSON line: image encode seconds (CLIP ViT-L/14-336, 23 layers, + LDPv2), prefill tokens/s for the
full image prompt, decode tokens/s, peak RSS. Run: `python benchmarks/bench_mobilevlm.py [--decode 32] [--repeat 3]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from _common import random_weights
from tinyvlm.backends import make
from tinyvlm.config import ModelConfig, ProjectorConfig, TextConfig, VisionConfig
from tinyvlm.image_cache import ImageCache
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.projector import build_projector, projector_expected_shapes
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, vision_expected_shapes, vision_needed_names
from tinyvlm.vlm import VLM, peak_rss_mib

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama-spm-vocab" / "tokenizer.model"

# MobileVLM_V2-1.7B (mobilevlm.md section 1.1): MobileLLaMA-1.4B + ViT-L/14-336 + LDPv2.
TEXT = TextConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
VISION = VisionConfig()
PROJECTOR = ProjectorConfig("ldpnetv2", 1024, 2048)


def build() -> VLM:
    backend = make()  # numba when installed, as tinyvlm.load
    rng = np.random.default_rng(0)
    vision_shapes = vision_expected_shapes(VISION)
    needed = vision_needed_names(VISION)
    vision = VisionTower(VISION, random_weights({n: s for n, s in vision_shapes.items() if n in needed}, rng), backend)
    projector = build_projector(PROJECTOR, random_weights(projector_expected_shapes(PROJECTOR), rng), backend)
    language = LanguageModel(TEXT, random_weights(language_expected_shapes(TEXT), rng), backend)
    cfg = ModelConfig(text=TEXT, vision=VISION, projector=PROJECTOR)
    vlm = VLM(cfg, Tokenizer.from_sentencepiece(TOKENIZER), language, vision, projector)
    vlm.image_cache = ImageCache(0)  # every run encodes the image (the cache would make runs after the first free)
    return vlm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--decode", type=int, default=32, help="tokens to decode per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs; medians are reported")
    args = ap.parse_args()

    t0 = time.perf_counter()
    vlm = build()
    build_s = time.perf_counter() - t0
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ids = vlm.prompt_ids("What is in the image? Describe it in detail.")
    encode, prefill, decode = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        tokens = vlm.encode_image(image)  # (N, D)
        encode.append(time.perf_counter() - t0)
        embeds = vlm.embed(ids, [tokens])  # (T, D)
        cache = vlm.language.new_cache()
        t0 = time.perf_counter()
        vlm.language.forward(embeds, cache)
        prefill.append(len(embeds) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        n = sum(1 for _ in _decode_steps(vlm, cache, args.decode))
        decode.append(n / (time.perf_counter() - t0))
    # weights read per decoded token: every LLM matrix once (the embedding table only one row)
    shapes = language_expected_shapes(TEXT)
    weight_bytes = 4 * sum(int(np.prod(s)) for n, s in shapes.items() if n != "model.embed_tokens.weight")
    result = {
        "bench": "mobilevlm_v2_1.7b_shapes", "engine": "tinyvlm-numpy-fp32", "machine": platform.machine(),
        "cpus": os.cpu_count(), "prompt_tokens": len(embeds), "decode_tokens": args.decode, "runs": args.repeat,
        "build_s": round(build_s, 1),
        "image_encode_s": round(statistics.median(encode), 3),
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 3),
        "peak_rss_mib": round(peak_rss_mib()),
    }
    result["decode_GB_s"] = round(weight_bytes * result["decode_tok_s"] / 1e9, 2)
    print(json.dumps(result))


def _decode_steps(vlm: VLM, cache, n: int):
    """n single-token steps through the language model, each feeding the argmax of the last."""
    lang = vlm.language
    tok = 1
    for _ in range(n):
        logits = lang.forward(lang.embed([tok]), cache)  # (V,)
        tok = int(np.argmax(logits))
        yield tok


if __name__ == "__main__":
    main()
