"""Multi-turn chat over one KV cache, and the filter that holds back streamed text at stop strings.

Each `send` prefills only the new turn: earlier turns, answers and their end-of-turn tokens stay in the cache.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tinyvlm.backends import Array
from tinyvlm.config import GenerationConfig
from tinyvlm.errors import PromptError
from tinyvlm.prompt import count_images, tokenize_with_images

if TYPE_CHECKING:
    from tinyvlm.vlm import VLM

_DEFAULTS = GenerationConfig()  # the defaults of send and VLM.generate are GenerationConfig's, as are the CLI's


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


class Chat:
    """Multi-turn chat: each send() prefills only the new turn; earlier turns stay in the KV cache."""

    def __init__(self, vlm: VLM, image: Any = None, system: str | None = None) -> None:
        self.vlm = vlm
        self.system = system
        self.image_features: Array | None = None  # (N, D)
        self._encode_s: float | None = None  # the last image encode's time, until a turn reports it
        if image is not None:
            self._encode(image)
        self.cache = vlm.language.new_cache()
        self.history: list[int] = []  # every id in the cache (the image counts as one -200)

    def _encode(self, image: Any) -> None:
        self.image_features = self.vlm.encode_image(image)
        self._encode_s = self.vlm.stats.image_encode_s

    def clear(self, image: Any = None) -> None:
        """Forget the conversation; keep the image unless a new one is given."""
        if image is not None:
            self._encode(image)
        self.cache.reset()
        self.history = []

    def _turn_ids(self, question: str) -> tuple[list[int], list[Array]]:
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
        response_format: dict[str, Any] | None = None,
    ) -> str | Iterator[str]:
        """The answer to the next turn: the text, or an iterator of its pieces if `stream`; `response_format`
        constrains it to JSON, as in VLM.generate."""
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        constraint = self.vlm.json_constraint(response_format)
        ids, images = self._turn_ids(question)
        embeds = self.vlm.embed(ids, images)  # (T, D)
        turn_start, generated = self.cache.pos, []
        history = [t for t in self.history + ids if t >= 0]
        pieces = self.vlm.reply(embeds, self.cache, cfg, list(stop), history, generated, constraint)
        encode_s, self._encode_s = (self._encode_s, None) if images else (None, self._encode_s)
        self.vlm.stats.reset(encode_s)  # the image encode is reported once, with the turn that first used it
        pieces = self._closing_turn(pieces, ids, generated, turn_start, turn_start + len(embeds))
        return pieces if stream else "".join(pieces).strip()

    def _closing_turn(self, pieces: Iterator[str], ids: list[int], generated: list[int], turn_start: int,
                      answer_start: int) -> Iterator[str]:
        """The pieces of the answer; when they end, or the consumer stops, the turn is closed."""
        try:
            yield from pieces
        finally:
            self._close_turn(ids, generated, turn_start, answer_start, self.vlm.tokenizer.eos_id)

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
