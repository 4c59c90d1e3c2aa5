"""MobileVLM composition: encode image -> project -> splice at <image> -> language model.

This is the only module that knows all the parts. It follows the official inference path
(../shared/design/mobilevlm.md sections 6, 8 and 9): image features replace the -200 placeholder, positions run
contiguously over the spliced sequence, the mask is causal throughout, and generation stops on `</s>`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.backends import Array
from tinyvlm.cache import KVCache
from tinyvlm.chat import _DEFAULTS, Chat, StopFilter
from tinyvlm.config import GenerationConfig, ModelConfig, VisionConfig
from tinyvlm.errors import PromptError
from tinyvlm.generate import generate_tokens
from tinyvlm.image_cache import ImageCache
from tinyvlm.json_constraint import JsonConstraint, response_schema
from tinyvlm.language import LanguageModel
from tinyvlm.processor import preprocess
from tinyvlm.projector import Projector
from tinyvlm.prompt import IMAGE_TOKEN_ID, VICUNA_V1, count_images, first_turn, next_turn, render, \
    tokenize_with_images
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower



@dataclass
class Stats:
    """What the last call did and how long it took, for `--verbose` and the benchmarks. image_encode_s is None
    when the call encoded no image; counts of 0 mean the step did not run."""

    image_encode_s: float | None = None
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    answer_tokens: int = 0  # ids the answer took (the first one's from the prefill)

    def reset(self, image_encode_s: float | None = None) -> None:
        self.image_encode_s, self.prefill_tokens, self.prefill_s, self.decode_tokens, self.decode_s = \
            image_encode_s, 0, 0.0, 0, 0.0
        self.answer_tokens = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


class VLM:
    """A loaded model: the tokenizer, the language model and, for MobileVLM, the vision tower and projector, all
    on one backend (the language model's)."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, language: LanguageModel,
                 vision: VisionTower | None = None, projector: Projector | None = None,
                 path: Path | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.language = language
        self.vision = vision
        self.projector = projector
        self.backend = language.bk
        self.path = path
        self.stats = Stats()
        self.template = VICUNA_V1  # chat template kind (tinyvlm.prompt)
        self.quant: str | None = None  # "int4" / "int8" when the LLM's linear layers are quantized
        self.quant_report: Any = None  # tinyvlm.quantize.QuantReport when quantized at load
        self.image_cache = ImageCache()  # projector outputs of recent images (tinyvlm/image_cache.py)

    @property
    def vision_config(self) -> VisionConfig | None:
        return self.config.vision

    def warm_up(self) -> None:
        """Run every kernel once on tiny inputs, so that a compiling backend compiles (or loads its cache) now."""
        self.language.warm_up()
        if self.vision is not None and self.projector is not None and self.vision_config is not None:
            self.vision.warm_up()
            self.projector(self.backend.zeros((4, self.vision_config.hidden_size)))  # a 2 x 2 grid of features

    # ---------------------------------------------------------------- image side

    def _require_vision(self) -> tuple[VisionTower, Projector, VisionConfig]:
        if self.vision is None or self.projector is None or self.vision_config is None:
            raise PromptError(f"{self.path}: this is a text-only model; it cannot take an image")
        return self.vision, self.projector, self.vision_config

    def preprocess(self, image: Any) -> np.ndarray:
        """Image (path, PIL image or HxWx3 uint8 array) -> float32 [3, 336, 336] CLIP pixels."""
        size = self.vision_config.image_size if self.vision_config else 336
        return preprocess(image, image_size=size, aspect=self.config.image_aspect_ratio)

    def vision_features(self, pixels: np.ndarray) -> np.ndarray:
        """[3, 336, 336] -> [P, C]: the selected CLIP layer, CLS dropped."""
        vision, _, _ = self._require_vision()
        return self.backend.to_host(vision.features(pixels))

    def encode_image(self, image_or_pixels: Any) -> Array:
        """Image or float32 [3, H, W] pixels -> [N, D] projector output (N = 144), in the backend's memory. An image
        whose pixels are in `image_cache` skips the vision tower; its array is shared, so read it, never write."""
        vision, projector, vcfg = self._require_vision()
        t0 = time.perf_counter()
        if isinstance(image_or_pixels, np.ndarray) and image_or_pixels.dtype == np.float32:
            pixels = image_or_pixels
            if pixels.shape != (3, vcfg.image_size, vcfg.image_size):
                raise PromptError(
                    f"pixels of shape {pixels.shape}: expected float32 [3, {vcfg.image_size}, {vcfg.image_size}]"
                )
        else:
            pixels = self.preprocess(image_or_pixels)
        key = self.image_cache.key(pixels)
        out = self.image_cache.get(key)
        if out is None:
            out = projector(vision.features(pixels))  # (P, C) -> (N, D)
            self.image_cache.put(key, out)
        self.stats.image_encode_s = time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- text side

    def prompt_ids(self, prompt: str, image: bool = True, system: str | None = None) -> list[int]:
        """The full templated prompt as ids, with -200 where the image goes (never for a text-only model)."""
        with_image = image and self.vision is not None
        return tokenize_with_images(self.tokenizer, self.first_turn_text(prompt, with_image, system))

    def first_turn_text(self, question: str, image: bool, system: str | None) -> str:
        """The first turn in this model's chat template (MobileVLM's v1 unless a GGUF file names another)."""
        if self.template == VICUNA_V1:
            return first_turn(question, image=image, system=system)
        return render(self.template, system, [(question, None)])

    def next_turn_text(self, question: str) -> str:
        """A later turn, to follow the previous answer and its end-of-turn token."""
        if self.template == VICUNA_V1:
            return next_turn(question)
        return "\n" + render(self.template, None, [(question, None)])

    def embed(self, ids: Sequence[int], images: Sequence[Array] = ()) -> Array:
        """Ids with -200 placeholders -> (T', D) embeddings, each placeholder replaced by one image's (N, D)."""
        n_images = count_images(ids)
        if n_images != len(images):
            raise PromptError(f"the prompt has {n_images} <image> placeholder(s) but {len(images)} image(s) were given")
        parts: list[Array] = []
        start, k = 0, 0
        for i, t in enumerate(ids):
            if t == IMAGE_TOKEN_ID:
                if i > start:
                    parts.append(self.language.embed(ids[start:i]))  # (t, D)
                parts.append(images[k])  # (N, D)
                k, start = k + 1, i + 1
        if start < len(ids):
            parts.append(self.language.embed(ids[start:]))
        if not parts:
            raise PromptError("empty prompt: nothing to run")
        return self.backend.concat(parts)  # (T', D)

    def _images_for(self, ids: Sequence[int], image: Any) -> list[Array]:
        if count_images(ids) == 0:
            return []
        if image is None:
            raise PromptError("the prompt has an <image> placeholder but no image was given")
        return [self.encode_image(image)]

    def logits(self, ids: Sequence[int], image: Any = None) -> np.ndarray:
        """float32 [T', V] logits for every position of the spliced sequence (no sampling)."""
        embeds = self.embed(ids, self._images_for(ids, image))  # (T', D)
        cache = self.language.new_cache(max_len=min(len(embeds), self.config.text.max_position_embeddings))
        return self.language.forward(embeds, cache, all_logits=True)  # (T', V)

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompt: str,
        image: Any = None,
        *,
        max_new_tokens: int = _DEFAULTS.max_new_tokens,
        temperature: float = _DEFAULTS.temperature,
        top_p: float = _DEFAULTS.top_p,
        top_k: int = _DEFAULTS.top_k,
        repetition_penalty: float = _DEFAULTS.repetition_penalty,
        seed: int | None = _DEFAULTS.seed,
        stream: bool = False,
        system: str | None = None,
        stop: Sequence[str] = (),
        response_format: dict[str, Any] | None = None,
    ) -> str | Iterator[str]:
        """Answer one question about an image (or none). Returns the text, or an iterator of pieces if stream.
        `response_format` (OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
        ...}}) constrains the answer to JSON (tinyvlm/json_constraint.py)."""
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        constraint = self.json_constraint(response_format)
        features = None if image is None else self.encode_image(image)  # (N, D)
        encode_s = self.stats.image_encode_s if features is not None else None
        ids = tokenize_with_images(self.tokenizer, self.first_turn_text(prompt, features is not None, system))
        embeds = self.embed(ids, [features] if features is not None and count_images(ids) else [])  # (T, D)
        pieces = self.reply(embeds, self.language.new_cache(), cfg, list(stop), [t for t in ids if t >= 0], [],
                            constraint)
        self.stats.reset(encode_s)
        return pieces if stream else "".join(pieces).strip()

    def json_constraint(self, response_format: dict[str, Any] | None) -> JsonConstraint | None:
        """A fresh constraint for one answer, or None without a response_format."""
        return None if response_format is None else JsonConstraint(response_schema(response_format), self.tokenizer)

    def reply(self, embeds: Array, cache: KVCache, cfg: GenerationConfig, stops: list[str], history: list[int],
              generated: list[int], constraint: JsonConstraint | None = None) -> Iterator[str]:
        """Prefill `embeds` (T, D) at cache.pos and stream the answer's text until `</s>`, a stop string,
        max_new_tokens or a full context. Each new id is appended to `generated` and `history`; self.stats
        receives the prefill and decode timings, also when the consumer stops early. Raises PromptError at once
        (before any text is asked for) if the prompt is empty or does not fit the cache."""
        tokens = generate_tokens(self.language, embeds, cache, cfg, stop_ids={self.tokenizer.eos_id}, history=history,
                                 constraint=constraint)
        return self._text(tokens, len(embeds), stops, generated)

    def _text(self, tokens: Iterator[int], n_prompt: int, stops: list[str], generated: list[int]) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        stopper = StopFilter(stops)
        stats = self.stats
        stats.prefill_tokens = n_prompt
        t0 = time.perf_counter()
        t_first = None
        n_start = len(generated)
        try:
            for tok in tokens:
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.prefill_s = t_first - t0
                generated.append(tok)
                text = stopper.push(decoder.push(tok))
                if text:
                    yield text
                if stopper.stopped:
                    break
            else:
                tail = stopper.push(decoder.flush())
                tail += "" if stopper.stopped else stopper.flush()
                if tail:
                    yield tail
        finally:
            now = time.perf_counter()
            stats.answer_tokens = len(generated) - n_start
            if t_first is None:
                stats.prefill_s = now - t0
            else:
                stats.decode_tokens = max(len(generated) - 1, 0)
                stats.decode_s = now - t_first

    def chat(self, image: Any = None, system: str | None = None) -> Chat:
        """A multi-turn conversation that keeps its KV cache between turns."""
        return Chat(self, image=image, system=system)


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


__all__ = ["VLM", "Chat", "Stats", "StopFilter", "peak_rss_mib"]
