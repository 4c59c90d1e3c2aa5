"""The command line's shared options: which model to load and how (chat, batch, serve), and the question and its
decoding settings (chat, batch)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tinyvlm.errors import ModelNotFound

DEFAULT_MODEL = "mtgv/MobileVLM_V2-1.7B"  # what runs when nothing names a model and none is cached


def generation_arguments(p: argparse.ArgumentParser, prompt_flags: tuple[str, ...], prompt_help: str) -> None:
    """The question and the decoding settings (chat and batch)."""
    from tinyvlm.config import GenerationConfig

    defaults = GenerationConfig()
    p.add_argument(*prompt_flags, dest="prompt", help=prompt_help)
    p.add_argument("--system", help="system prompt (default: the MobileVLM v1 one)")
    p.add_argument("--max-tokens", type=int, default=defaults.max_new_tokens, help="default %(default)s")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="default %(default)s")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                   help="default %(default)s")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed for sampling")


def generation(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding settings, checked (before any slow load)."""
    from tinyvlm.config import GenerationConfig

    gen = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               repetition_penalty=args.repetition_penalty, seed=args.seed)
    GenerationConfig(**gen)
    return gen


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say which model to load and how (chat and serve)."""
    p.add_argument("--model", help="model directory or Hugging Face id, downloaded on first use (default: "
                   f"$TINYVLM_MODEL, else the first MobileVLM in the Hugging Face cache, else {DEFAULT_MODEL})")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never touch the network: only models already on disk (also: HF_HUB_OFFLINE=1)")
    p.add_argument("--vision-tower", help="CLIP directory or id to use instead of the one the config names")
    p.add_argument("--mmproj", help="llama.cpp's image encoder GGUF, with an LLM .gguf as --model")
    p.add_argument("--quant", choices=["int4", "int8"], help="quantize the LLM's linear layers while loading")
    p.add_argument("--backend", choices=["numpy", "numba", "cuda"],
                   help="default: $TINYVLM_BACKEND, else numba when it is installed")
    p.add_argument("--threads", type=int, help="threads for the Numba kernels (default: all cores)")
    p.add_argument("--decode-activations", choices=["int8", "float32"],
                   help="one token's activations before a quantized matrix (default: int8, as llama.cpp)")
    p.add_argument("--vision-weights", choices=["float32", "int8"],
                   help="the vision tower's linear weights (default: float32; int8: a quarter of the memory)")
    p.add_argument("--image-cache", type=int, default=8,
                   help="images whose encodings are kept, so that asking again skips the vision tower "
                   "(default %(default)s; 0: off)")


def load_model(args: argparse.Namespace, progress: bool = True) -> Any:
    """The model the arguments name, with its image cache sized."""
    from tinyvlm.image_cache import ImageCache
    from tinyvlm.loading import load

    cache = ImageCache(args.image_cache)  # a bad size fails before the slow load
    vlm = load(args.model or default_model(args.offline), quant=args.quant, backend=args.backend,
               threads=args.threads, vision_tower=args.vision_tower, progress=progress, mmproj=args.mmproj,
               decode_activations=args.decode_activations, vision_weights=args.vision_weights, offline=args.offline)
    if vlm.quant_report is not None:
        print(f"quantized {vlm.quant_report}", file=sys.stderr)
    vlm.image_cache = cache
    return vlm


def default_model(offline: bool | None) -> str:
    """$TINYVLM_MODEL, else the first MobileVLM in the cache, else DEFAULT_MODEL (downloaded) unless offline."""
    from tinyvlm.loading.download import offline as is_offline
    from tinyvlm.loading.hub import find_cached_models

    env = os.environ.get("TINYVLM_MODEL")
    if env:
        return env
    cached = find_cached_models()
    if cached:
        return cached[0]
    if not is_offline(offline):
        return DEFAULT_MODEL
    raise ModelNotFound(
        "no model given and none found (offline): pass --model PATH_OR_ID, set TINYVLM_MODEL, or download one "
        f"(e.g. `huggingface-cli download {DEFAULT_MODEL}`)"
    )
