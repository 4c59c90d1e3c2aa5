"""MobileVLM composition: encode image -> project -> splice at <image> -> language model.

This is the only module that knows all the parts. It follows the official inference path
(../shared/design/mobilevlm.md sections 6, 8 and 9): image features replace the -200 placeholder, positions run
contiguously over the spliced sequence, the mask is causal throughout, and generation stops on `</s>`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tinyvlm.cache import KVCache
from tinyvlm.chat_template import VICUNA_V1, render
from tinyvlm.config import ModelConfig, VisionConfig
from tinyvlm.errors import PromptError, TinyVLMError
from tinyvlm.generate import GenerationConfig, generate_tokens
from tinyvlm.language import LanguageModel
from tinyvlm.processor import preprocess
from tinyvlm.projector import Projector
from tinyvlm.prompt import (
    IMAGE_TOKEN_ID,
    count_images,
    first_turn,
    next_turn,
    tokenize_with_images,
)
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower


_DEFAULTS = GenerationConfig()  # the one place generation defaults live (the CLI reads them too)


@dataclass
class Stats:
    """Timings of the last call, for `--verbose` and the benchmarks."""

    image_encode_s: float = 0.0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


class StopFilter:
    """Holds back streamed text that might be the start of a stop string; reports when one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        self.pending += text
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending, self.stopped = self.pending[:at], "", True
                return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class VLM:
    """A loaded model: the tokenizer, the language model and, for MobileVLM, the vision tower and projector."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer,
        language: LanguageModel,
        vision: VisionTower | None = None,
        projector: Projector | None = None,
        vision_config: VisionConfig | None = None,
        path: Path | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.language = language
        self.vision = vision
        self.projector = projector
        self.vision_config = vision_config
        self.path = path
        self.stats = Stats()
        self.template = VICUNA_V1  # chat template kind (tinyvlm.chat_template)
        self.quant: str | None = None  # "int4" / "int8" when the LLM's linear layers are quantized
        self.quant_report: Any = None  # tinyvlm.quantize.QuantReport when quantized at load

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
        return vision.features(pixels)

    def encode_image(self, image_or_pixels: Any) -> np.ndarray:
        """Image or float32 [3, H, W] pixels -> [N, D] projector output (N = 144)."""
        _, projector, vcfg = self._require_vision()
        t0 = time.perf_counter()
        if isinstance(image_or_pixels, np.ndarray) and image_or_pixels.dtype == np.float32:
            pixels = image_or_pixels
            if pixels.shape != (3, vcfg.image_size, vcfg.image_size):
                raise PromptError(
                    f"pixels of shape {pixels.shape}: expected float32 [3, {vcfg.image_size}, {vcfg.image_size}]"
                )
        else:
            pixels = self.preprocess(image_or_pixels)
        out = projector(self.vision_features(pixels))  # (P, C) -> (N, D)
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

    def embed(self, ids: Sequence[int], images: Sequence[np.ndarray] = ()) -> np.ndarray:
        """Ids with -200 placeholders -> (T', D) embeddings, each placeholder replaced by one image's (N, D)."""
        n_images = count_images(ids)
        if n_images != len(images):
            raise PromptError(f"the prompt has {n_images} <image> placeholder(s) but {len(images)} image(s) were given")
        parts: list[np.ndarray] = []
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
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)  # (T', D)

    def _images_for(self, ids: Sequence[int], image: Any) -> list[np.ndarray]:
        if count_images(ids) == 0:
            return []
        if image is None:
            raise PromptError("the prompt has an <image> placeholder but no image was given")
        return [self.encode_image(image)]

    def logits(self, ids: Sequence[int], image: Any = None) -> np.ndarray:
        """float32 [T', V] logits for every position of the spliced sequence (no sampling)."""
        embeds = self.embed(ids, self._images_for(ids, image))  # (T', D)
        cache = self.language.new_cache(max_len=min(len(embeds), self.config.text.max_position_embeddings))
        if len(embeds) > cache.max_len:
            raise PromptError(
                f"prompt of {len(embeds)} tokens does not fit the context of {self.config.text.max_position_embeddings}"
            )
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
    ) -> str | Iterator[str]:
        """Answer one question about an image (or none). Returns the text, or an iterator of pieces if stream."""
        chat = self.chat(image=image, system=system)
        return chat.send(
            prompt,
            stream=stream,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )

    def chat(self, image: Any = None, system: str | None = None) -> Chat:
        """A multi-turn conversation that keeps its KV cache between turns."""
        return Chat(self, image=image, system=system)


@dataclass
class _Turn:
    ids: list[int]
    generated: list[int] = field(default_factory=list)


class Chat:
    """Multi-turn chat: each send() prefills only the new turn; earlier turns stay in the KV cache."""

    def __init__(self, vlm: VLM, image: Any = None, system: str | None = None) -> None:
        self.vlm = vlm
        self.system = system
        self.image_features: np.ndarray | None = None
        if image is not None:
            self.image_features = vlm.encode_image(image)  # (N, D)
        self.cache: KVCache = vlm.language.new_cache()
        self.history: list[int] = []  # every id in the cache (the image counts as one -200)

    def clear(self, image: Any = None) -> None:
        """Forget the conversation; keep the image unless a new one is given."""
        if image is not None:
            self.image_features = self.vlm.encode_image(image)
        self.cache.reset()
        self.history = []

    def _turn_ids(self, question: str) -> tuple[list[int], list[np.ndarray]]:
        tok = self.vlm.tokenizer
        if not self.history:
            with_image = self.image_features is not None
            ids = tokenize_with_images(tok, self.vlm.first_turn_text(question, with_image, self.system))
            images = [self.image_features] if with_image and count_images(ids) else []
            if count_images(ids) > len(images):
                raise PromptError("the question has an <image> placeholder but the chat has no image")
            return ids, images  # type: ignore[return-value]
        if "<image>" in question:
            raise PromptError("an <image> placeholder is only allowed in the first turn")
        return tok.encode(self.vlm.next_turn_text(question), add_bos=False), []

    def send(
        self,
        question: str,
        stream: bool = False,
        *,
        max_new_tokens: int = _DEFAULTS.max_new_tokens,
        temperature: float = _DEFAULTS.temperature,
        top_p: float = _DEFAULTS.top_p,
        top_k: int = _DEFAULTS.top_k,
        repetition_penalty: float = _DEFAULTS.repetition_penalty,
        seed: int | None = _DEFAULTS.seed,
        stop: Sequence[str] = (),
    ) -> str | Iterator[str]:
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        cfg.validate()
        ids, images = self._turn_ids(question)
        embeds = self.vlm.embed(ids, images)  # (T, D)
        if len(embeds) > self.cache.free:
            raise PromptError(
                f"prompt of {len(embeds)} tokens does not fit the context of {self.cache.max_len} "
                f"({self.cache.free} free)"
            )
        pieces = self._run(ids, embeds, cfg, list(stop))
        if stream:
            return pieces
        return "".join(pieces).strip()

    def _run(self, ids: list[int], embeds: np.ndarray, cfg: GenerationConfig, stops: list[str]) -> Iterator[str]:
        vlm, lang, cache = self.vlm, self.vlm.language, self.cache
        eos = vlm.tokenizer.eos_id
        turn_start = cache.pos
        prompt_len = len(embeds)
        history = [t for t in self.history + ids if t >= 0]
        generated: list[int] = []
        decoder = vlm.tokenizer.stream_decoder()
        stopper = StopFilter(stops)
        stats = vlm.stats
        stats.prefill_tokens, stats.decode_tokens = prompt_len, 0
        t0 = time.perf_counter()
        t_first = None
        try:
            for tok in generate_tokens(lang, embeds, cache, cfg, stop_ids={eos}, history=history):
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.prefill_s = t_first - t0
                generated.append(tok)
                history.append(tok)
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
            if t_first is None:
                stats.prefill_s = now - t0
            else:
                stats.decode_tokens = max(len(generated) - 1, 0)
                stats.decode_s = now - t_first
            self._close_turn(ids, generated, turn_start, turn_start + prompt_len, eos)

    def _close_turn(self, ids: list[int], generated: list[int], turn_start: int, answer_start: int, eos: int) -> None:
        """Put the rest of the answer and its `</s>` into the cache, so the next turn prefills only itself."""
        cache, lang = self.cache, self.vlm.language
        if cache.pos < answer_start:  # interrupted during prefill: drop the whole turn
            cache.truncate(turn_start)
            return
        fed = cache.pos - answer_start
        rest = generated[fed:] + [eos]
        rest = rest[: cache.free]
        if rest:
            lang.forward(lang.embed(rest), cache)
        self.history += ids + generated[:fed] + rest


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


__all__ = ["VLM", "Chat", "Stats", "StopFilter", "TinyVLMError", "peak_rss_mib"]
