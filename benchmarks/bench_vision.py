"""Image encode seconds and time to first token at MobileVLM_V2-1.7B shapes (random weights), one engine per run.

Image encode = CLIP ViT-L/14-336 up to the layer MobileVLM selects (23 of 24 layers) + LDPv2, from preprocessed
pixels to the 144 image tokens. Time to first token = from the raw HxWx3 uint8 image and the prompt ids to the
greedy first answer token: preprocess, encode, splice, prefill of the whole templated prompt, argmax.
Engines: tinyvlm (`--quant` picks the LLM's weight format, `--vision-weights` the tower's), and PyTorch:
transformers `CLIPVisionModel` built with 23 layers (so its last_hidden_state is MobileVLM's hidden_states[-2] of
the 24-layer tower: the same work), an LDPv2 of torch.nn layers and `LlamaForCausalLM` fp32 fed `inputs_embeds`.
Both engines use tinyvlm's preprocessing and prompt ids, so they differ only in the model compute.
Prints one JSON line. Run: `python benchmarks/bench_vision.py --engine tinyvlm --threads 2`.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from _common import (PROJECTOR, TEXT, TOKENIZER, VISION, emit, median, peak_rss_mib, pin_threads, random_weights,
                     reset_peak_rss)
from bench_llm import Torch as TorchLLM
from bench_llm import Unavailable, load_quantizer

from tinyvlm.config import ModelConfig
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.processor import preprocess
from tinyvlm.projector import build_projector, projector_expected_shapes
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, vision_expected_shapes, vision_needed_names
from tinyvlm.vlm import VLM

SHAPES = "MobileVLM_V2-1.7B: ViT-L/14-336 (23 layers run) + LDPv2 -> 144 tokens + MobileLLaMA-1.4B"
QUESTION = "What is in the image?"

# An engine is two functions: pixels (3, 336, 336) -> image tokens (N, D), and (ids, image tokens) -> first token.
Encode = Callable[[np.ndarray], Any]
FirstToken = Callable[[list[int], Any], int]


# ---------------------------------------------------------------- tinyvlm

def tinyvlm_engine(quant: str, threads: int, vision_weights: str = "float32",
                   image_cache: bool = False) -> tuple[Encode, FirstToken]:
    """tinyvlm's two functions; with `image_cache`, the image-embedding cache is on (the timed rounds ask again about
    the warm-up's image), else off (every round runs the vision tower)."""
    from tinyvlm.backends import make
    from tinyvlm.image_cache import ImageCache

    backend = make(threads=threads, vision_weights=vision_weights)  # numba when installed, as tinyvlm.load
    quantizer = load_quantizer(quant)
    rng = np.random.default_rng(0)
    needed = vision_needed_names(VISION)
    vision = VisionTower(VISION, random_weights({n: s for n, s in vision_expected_shapes(VISION).items()
                                                 if n in needed}, rng), backend)
    projector = build_projector(PROJECTOR, random_weights(projector_expected_shapes(PROJECTOR), rng), backend)
    weights: dict[str, Any] = random_weights(language_expected_shapes(TEXT), rng)
    if quantizer is not None:
        weights, _report = quantizer(TEXT, weights, quant)  # rebinding drops the fp32 dict
    language = LanguageModel(TEXT, weights, backend)
    cfg = ModelConfig(text=TEXT, vision=VISION, projector=PROJECTOR)
    vlm = VLM(cfg, Tokenizer.from_sentencepiece(TOKENIZER), language, vision, projector)
    vlm.image_cache = ImageCache(1 if image_cache else 0)

    def first_token(ids: list[int], tokens: np.ndarray) -> int:
        embeds = vlm.embed(ids, [tokens])  # (T, D) with the (N, D) image tokens spliced in
        return int(np.argmax(language.forward(embeds, language.new_cache())))

    return vlm.encode_image, first_token


# ---------------------------------------------------------------- PyTorch + transformers

def torch_engine(threads: int) -> tuple[Encode, FirstToken]:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    llm = TorchLLM(threads)  # sets the torch threads and seed
    v = VISION
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.layers_to_run,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)).eval()
    projector = torch_ldpv2(PROJECTOR.mm_hidden_size, PROJECTOR.hidden_size).eval()
    embed_tokens = llm.model.get_input_embeddings()

    def encode(pixels: np.ndarray) -> Any:
        with torch.inference_mode():
            hidden = clip(pixel_values=torch.from_numpy(pixels)[None]).last_hidden_state  # (1, P+1, C)
            return projector(hidden[:, 1:])  # (1, P, C) -> (1, N, D)

    def first_token(ids: list[int], tokens: Any) -> int:
        at = ids.index(-200)  # the image placeholder (mobilevlm.md section 6)
        with torch.inference_mode():
            before = embed_tokens(torch.tensor([ids[:at]]))  # (1, t, D)
            after = embed_tokens(torch.tensor([ids[at + 1:]]))
            embeds = torch.cat([before, tokens, after], dim=1)  # (1, T, D)
            out = llm.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    return encode, first_token


def torch_ldpv2(c_in: int, d: int) -> Any:
    """LDPv2 (mobilevlm.md section 5.2) from torch.nn layers: [1, P, C] -> [1, P/4, D]."""
    import torch
    from torch import nn

    class LDPv2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(c_in, d), nn.GELU(), nn.Linear(d, d))
            self.pool = nn.AvgPool2d(2)  # AdaptiveAvgPool2d(12) on a 24x24 map is exactly this
            self.peg = nn.Conv2d(d, d, 3, padding=1, groups=d, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            g = int(round(x.shape[1] ** 0.5))
            y = self.mlp(x).transpose(1, 2).reshape(1, d, g, g)  # (1, P, D) -> (1, D, g, g)
            y = self.pool(y)  # -> (1, D, g/2, g/2)
            y = y + self.peg(y)
            return y.flatten(2).transpose(1, 2)  # -> (1, N, D)

    return LDPv2()


# ---------------------------------------------------------------- the protocol

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("tinyvlm", "torch"), required=True)
    ap.add_argument("--quant", choices=("fp32", "int8", "int4"), default="fp32", help="tinyvlm LLM weight format")
    ap.add_argument("--vision-weights", choices=("float32", "int8"), default="float32",
                    help="tinyvlm: the vision tower's linear weights (int8: q8_0, multiplied on int8 activations)")
    ap.add_argument("--image-cache", action="store_true",
                    help="tinyvlm: keep the image-embedding cache on, so that each timed round is a second question "
                    "about the same image (default: off, every round encodes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds; medians are reported")
    args = ap.parse_args()
    pin_threads(args.threads)

    record: dict[str, Any] = {"bench": "vision", "engine": args.engine, "threads": args.threads, "shapes": SHAPES,
                              "question": QUESTION}
    t0 = time.perf_counter()
    try:
        if args.engine == "tinyvlm":
            encode, first_token = tinyvlm_engine(args.quant, args.threads, args.vision_weights, args.image_cache)
            record["quant"] = f"vision {'fp32' if args.vision_weights == 'float32' else 'int8'}, llm {args.quant}"
            record["image_cache"] = args.image_cache
        else:
            encode, first_token = torch_engine(args.threads)
            record["quant"] = "vision fp32, llm fp32"
    except Unavailable as e:
        emit({**record, "quant": f"vision fp32, llm {args.quant}", "error": str(e)})
        return
    record["load_s"] = time.perf_counter() - t0
    record["load_peak_rss_mib"] = round(peak_rss_mib())
    reset_peak_rss()

    ids = _prompt_ids()
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    first_token(ids, encode(preprocess(image)))  # warm-up
    encode_s, prefill_s, ttft_s = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        pixels = preprocess(image)  # (H, W, 3) uint8 -> (3, 336, 336) float32
        t1 = time.perf_counter()
        tokens = encode(pixels)  # (N, D)
        t2 = time.perf_counter()
        first_token(ids, tokens)
        t3 = time.perf_counter()
        encode_s.append(t2 - t1)
        prefill_s.append(t3 - t2)
        ttft_s.append(t3 - t0)
    prompt_tokens = len(ids) - 1 + PROJECTOR_TOKENS  # the placeholder becomes N image tokens
    record.update(image_encode_s=median(encode_s), prompt_tokens=prompt_tokens,
                  prefill_tok_s=prompt_tokens / median(prefill_s), ttft_s=median(ttft_s),
                  peak_rss_mib=round(peak_rss_mib()),
                  runs=args.repeat, image_encode_s_runs=[round(s, 3) for s in encode_s],
                  ttft_s_runs=[round(s, 3) for s in ttft_s])
    emit(record)


PROJECTOR_TOKENS = (VISION.image_size // VISION.patch_size // 2) ** 2  # N = 144


def _prompt_ids() -> list[int]:
    """The templated one-image prompt as ids, with -200 at the image, exactly as tinyvlm's chat builds it."""
    from tinyvlm.prompt import first_turn, tokenize_with_images

    tokenizer = Tokenizer.from_sentencepiece(TOKENIZER)
    return tokenize_with_images(tokenizer, first_turn(QUESTION, image=True))


if __name__ == "__main__":
    main()
