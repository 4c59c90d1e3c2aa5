"""Sampling and the one generation loop that chat, the CLI, the Python API, tests and benchmarks all use.

Sampling follows the Hugging Face logits processors in the order `generate` applies them
(transformers 5.23, `generation/logits_process.py`): RepetitionPenaltyLogitsProcessor, then greedy argmax or
TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> softmax -> draw. The loop follows
style.md (b) 7 (mlx `generate_step`): prefill once, then yield one id per step.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Protocol

import numpy as np

from tinyvlm.backends import Array
from tinyvlm.cache import KVCache
from tinyvlm.config import GenerationConfig
from tinyvlm.errors import PromptError
from tinyvlm.json_constraint import JsonConstraint
from tinyvlm.kernels import softmax


def penalize_repetition(logits: np.ndarray, penalty: float, history: Sequence[int]) -> np.ndarray:
    """Each id in the history, counted once: a positive logit is divided by the penalty, a negative one multiplied.

    Ids outside the vocabulary (such as the -200 image placeholder) are skipped. Returns a new array.
    """
    out = np.array(logits, dtype=np.float32)  # (V,), a copy
    if penalty == 1.0:
        return out
    ids = np.unique(np.asarray(history, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.shape[0])]
    seen = out[ids]
    out[ids] = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
    return out


def processed_logits(logits: np.ndarray, cfg: GenerationConfig, history: Sequence[int]) -> np.ndarray:
    """The scores a sampled token is drawn from, (V,) float32: penalty, temperature, top-k, top-p.

    Filtered tokens get -inf, as transformers' warpers give them. Only meaningful for temperature > 0.
    """
    scores = penalize_repetition(logits, cfg.repetition_penalty, history) / np.float32(cfg.temperature)  # (V,)
    if 0 < cfg.top_k < scores.shape[0]:
        kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
        scores[scores < kth] = -np.inf  # ties with the k-th score survive, as in TopKLogitsWarper
    if cfg.top_p < 1.0:
        # TopPLogitsWarper: sort ascending and drop the tokens whose cumulative probability, counted from the
        # least likely, stays <= 1 - top_p; the most likely token always survives.
        order = np.argsort(scores, kind="stable")  # (V,) ascending
        # In float64, so the cumulative sums over a 32000-token vocabulary stay exact enough.
        cumulative = np.cumsum(softmax(scores[order].astype(np.float64)))  # (V,)
        drop = cumulative <= 1.0 - cfg.top_p
        drop[-1] = False
        scores[order[drop]] = -np.inf
    return scores


def sample_next(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history: Sequence[int]) -> int:
    """Pick the next id from (V,) logits: greedy argmax when temperature is 0, else a draw from `rng`."""
    if cfg.temperature == 0.0:
        return int(np.argmax(penalize_repetition(logits, cfg.repetition_penalty, history)))
    cdf = np.cumsum(softmax(processed_logits(logits, cfg, history).astype(np.float64)))  # (V,), float64 as above
    # First index whose cdf exceeds u: never a zero-probability token, since the cdf is flat across those.
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def sample_allowed(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history: Sequence[int],
                   constraint: JsonConstraint) -> int:
    """sample_next among the ids `constraint` allows. Greedy: the best ids in order until one is allowed. Sampling:
    draws from the processed distribution, each refused id taken out before the next draw (the same law as masking
    first); when every id with probability left is refused, the best allowed id. When the tokens left would no longer
    fit the shortest completion, that completion, in as few tokens as the vocabulary allows."""
    closing = constraint.closing_token()
    if closing is not None:  # out of tokens: the shortest way to the end of the value
        return closing
    scores = penalize_repetition(logits, cfg.repetition_penalty, history)
    if cfg.temperature != 0.0:
        probs = softmax(processed_logits(logits, cfg, history).astype(np.float64))
        for _ in range(64):
            total = probs.sum()
            if not total > 0:
                break
            token = int(np.searchsorted(np.cumsum(probs), rng.random() * total, side="right"))
            token = min(token, probs.shape[0] - 1)
            if constraint.allows(token):
                return token
            probs[token] = 0.0
    best = int(np.argmax(scores))  # most steps: the best id fits, and no sort of the whole vocabulary is needed
    if constraint.allows(best):
        return best
    for token in np.argsort(-scores, kind="stable"):
        if constraint.allows(int(token)):
            return int(token)
    raise PromptError("no token can continue the JSON answer")  # unreachable: some token always fits


class CausalLM(Protocol):
    """What the loop needs from a model (LanguageModel provides it)."""

    def embed(self, ids: Sequence[int]) -> Array: ...

    def forward(self, embeds: Array, cache: KVCache, all_logits: bool = False) -> np.ndarray: ...

    def greedy_next(self, embeds: Array, cache: KVCache) -> int: ...  # forward(), then the argmax of its logits


def generate_tokens(model: CausalLM, prompt_embeds: Array, cache: KVCache, cfg: GenerationConfig, *,
                    stop_ids: Collection[int], history: list[int],
                    constraint: JsonConstraint | None = None) -> Iterator[int]:
    """Prefill `prompt_embeds` (T, D) at cache.pos, then yield one new id per step.

    Stops, without raising, after cfg.max_new_tokens ids, when the context is full (the next id would have no
    position left), or when a stop id is sampled; the stop id is neither yielded nor fed into the cache, so a
    chat layer that wants it in the conversation feeds it itself. Every yielded id is appended to `history`
    (which the repetition penalty reads) and fed into the cache before the next one is sampled; only the
    last id of a run that hits max_new_tokens (or that the consumer abandons) is left unfed. Raises PromptError
    at once if the prompt is empty or does not fit the cache. With a `constraint` (json_constraint.py) only ids
    that continue its JSON are taken, and the end of the JSON value ends the answer.
    """
    n = prompt_embeds.shape[0]
    if n == 0:
        raise PromptError("the prompt is empty: generation needs at least one token to start from")
    cache.check_room(n, "prompt tokens")
    shortest = constraint.shortest() if constraint is not None else 0
    if shortest > cfg.max_new_tokens:
        raise PromptError(f"max_new_tokens {cfg.max_new_tokens} is too few for a JSON answer: the shortest one "
                          f"this format allows takes {shortest} tokens")
    return _loop(model, prompt_embeds, cache, cfg, stop_ids, history, constraint)


def _loop(model: CausalLM, prompt_embeds: Array, cache: KVCache, cfg: GenerationConfig,
          stop_ids: Collection[int], history: list[int], constraint: JsonConstraint | None) -> Iterator[int]:
    rng = np.random.default_rng(cfg.seed)
    # Plain greedy decoding needs only the argmax, which the model finds where its logits are (on a GPU: one id
    # crosses to the host, not V logits); the same id sample_next would pick.
    greedy = cfg.temperature == 0.0 and cfg.repetition_penalty == 1.0 and constraint is None

    def step_from(embeds: Array) -> np.ndarray | int:
        """(T, D) embeddings through the model: the last position's (V,) logits, or with `greedy` their argmax."""
        return model.greedy_next(embeds, cache) if greedy else model.forward(embeds, cache)

    scored = step_from(prompt_embeds)
    for step in range(cfg.max_new_tokens):
        if cache.free == 0:
            return  # context full
        if greedy:
            token = scored
        elif constraint is not None:
            constraint.close_within(cfg.max_new_tokens - step)
            token = sample_allowed(scored, cfg, rng, history, constraint)
            constraint.advance(token)
        else:
            token = sample_next(scored, cfg, rng, history)
        if token in stop_ids:
            return
        history.append(token)
        yield token
        if constraint is not None and constraint.done:
            return  # the JSON value is complete
        if step + 1 < cfg.max_new_tokens:
            scored = step_from(model.embed([token]))  # one id
