"""Sampling against transformers' logits processors, and the generation loop against transformers' generate."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.test_language import VOCAB, prompt, tiny_llama
from tinyvlm.backends import Backend, NumpyBackend
from tinyvlm.cache import KVCache
from tinyvlm.errors import PromptError
from tinyvlm.config import GenerationConfig
from tinyvlm.generate import generate_tokens, processed_logits, sample_next
from tinyvlm.language import LanguageModel

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# Processed scores are float32 on both sides (measured: bit-identical); probabilities are
# float64 here and float32 in transformers (measured differences up to 1.6e-7).
SCORE_RTOL = 1e-6
PROB_ATOL = 1e-6


def random_logits(seed: int, vocab: int, scale: float, ties: bool) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, scale, vocab).astype(np.float32)
    return np.round(logits * 2) / 2 if ties else logits  # rounding to halves makes many ties


def hf_scores(logits: np.ndarray, cfg: GenerationConfig, history: Sequence[int]) -> tuple[np.ndarray, float]:
    """The processors in generate's order; also how close top-p's cumulative sums come to its threshold."""
    import torch
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    ids = torch.tensor([list(history)], dtype=torch.long).reshape(1, -1)
    scores = torch.from_numpy(logits.copy())[None]
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty))(ids, scores)
    scores = TemperatureLogitsWarper(float(cfg.temperature))(ids, scores)
    if cfg.top_k:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    cumulative = torch.sort(scores, descending=False)[0].softmax(-1).cumsum(-1)[0].double().numpy()
    margin = float(np.min(np.abs(cumulative - (1.0 - cfg.top_p))))
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    return scores[0].numpy(), margin


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 300), scale=st.floats(0.1, 10.0), ties=st.booleans(),
    temperature=st.floats(0.05, 5.0), top_k=st.integers(0, 310), top_p=st.floats(0.01, 1.0) | st.just(1.0),
    penalty=st.floats(0.5, 2.0) | st.just(1.0), n_history=st.integers(0, 30),
)
def test_filtered_distribution_matches_transformers(seed: int, vocab: int, scale: float, ties: bool,
                                                    temperature: float, top_k: int, top_p: float, penalty: float,
                                                    n_history: int) -> None:
    import torch

    logits = random_logits(seed, vocab, scale, ties)
    history = np.random.default_rng(seed + 1).integers(0, vocab, n_history).tolist()
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    expected, margin = hf_scores(logits, cfg, history)
    # Ties straddling the top-p cut are ordered arbitrarily by torch.sort, and a cumulative sum within float32
    # rounding of the threshold may fall either way: neither case has one right answer.
    assume(top_p == 1.0 or (not ties and margin > 1e-5))
    scores = processed_logits(logits, cfg, history)
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(scores), kept)
    np.testing.assert_allclose(scores[kept], expected[kept], rtol=SCORE_RTOL)
    probs = np.exp(scores.astype(np.float64) - scores.max())
    np.testing.assert_allclose(probs / probs.sum(), torch.from_numpy(expected).softmax(-1).numpy(), rtol=0,
                               atol=PROB_ATOL)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 2000), penalty=st.floats(0.5, 2.0) | st.just(1.0))
def test_greedy_is_argmax_after_penalty(seed: int, vocab: int, penalty: float) -> None:
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(seed, vocab, 3.0, ties=False)
    history = np.random.default_rng(seed + 1).integers(0, vocab, 10).tolist()
    cfg = GenerationConfig(repetition_penalty=penalty)
    expected = RepetitionPenaltyLogitsProcessor(float(penalty))(torch.tensor([history]), torch.from_numpy(logits)[None])
    assert sample_next(logits, cfg, np.random.default_rng(0), history) == int(expected.argmax())
    assert sample_next(logits, GenerationConfig(), np.random.default_rng(0), history) == int(np.argmax(logits))


def test_penalty_skips_ids_outside_vocabulary() -> None:
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    cfg = GenerationConfig(temperature=1.0, repetition_penalty=2.0)
    np.testing.assert_array_equal(processed_logits(logits, cfg, [0, 1, 1, -200, 3]), [1.0, -4.0, 1.0])


def test_draws_follow_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    cfg = GenerationConfig(temperature=1.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_next(logits, cfg, rng, []) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.012)  # 3.5 sigma at p = 0.5
    cut = GenerationConfig(temperature=1.0, top_k=2)
    assert {sample_next(logits, cut, rng, []) for _ in range(2000)} == {0, 1}


class CountingModel:
    """A stand-in decoder whose next id is always the last fed id + 1; it records what it was fed."""

    vocab = 50

    def __init__(self) -> None:
        self.fed: list[int] = []

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.float32)[:, None]  # (T,) -> (T, 1)

    def forward(self, embeds: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        cache.write(0, embeds.T[:, :, None], embeds.T[:, :, None])  # (T, 1) -> (1, T, 1)
        cache.advance(len(embeds))
        self.fed += [int(e) for e in embeds[:, 0]]
        return np.eye(self.vocab, dtype=np.float32)[(self.fed[-1] + 1) % self.vocab]  # (V,)

    def greedy_next(self, embeds: np.ndarray, cache: KVCache) -> int:
        return int(np.argmax(self.forward(embeds, cache)))


def run(prompt_ids: list[int], max_len: int, stop_ids: set[int], **gen: int) -> tuple[list[int], CountingModel,
                                                                                       KVCache, list[int]]:
    model, cache, history = CountingModel(), KVCache(1, 1, max_len, 1, NumpyBackend()), list(prompt_ids)
    ids = list(generate_tokens(model, model.embed(prompt_ids), cache, GenerationConfig(**gen),
                               stop_ids=stop_ids, history=history))
    return ids, model, cache, history


def test_stop_id_is_neither_yielded_nor_fed() -> None:
    ids, model, cache, history = run([0], max_len=32, stop_ids={5})
    assert ids == [1, 2, 3, 4]
    assert model.fed == [0, 1, 2, 3, 4] and cache.pos == 5
    assert history == [0, 1, 2, 3, 4]


def test_max_new_tokens_leaves_last_id_unfed() -> None:
    ids, model, cache, _ = run([7, 8], max_len=32, stop_ids=set(), max_new_tokens=3)
    assert ids == [9, 10, 11]
    assert model.fed == [7, 8, 9, 10] and cache.pos == 4
    assert run([7], max_len=32, stop_ids=set(), max_new_tokens=0)[0] == []


def test_full_context_stops_cleanly() -> None:
    ids, model, cache, _ = run([0, 1], max_len=6, stop_ids=set(), max_new_tokens=100)
    assert ids == [2, 3, 4, 5]  # as transformers with max_length 6: prompt + new ids fill the context exactly
    assert cache.pos == 6 and cache.free == 0
    assert run([0, 1, 2], max_len=3, stop_ids=set())[0] == []  # a prompt that fills the context yields nothing


def test_prompt_too_long_and_bad_config_raise_at_once() -> None:
    model = CountingModel()
    cache = KVCache(1, 1, 8, 1, NumpyBackend())
    cache.advance(5)
    with pytest.raises(PromptError, match=r"4 prompt tokens at position 5 do not fit the context of 8 \(3 free\)"):
        generate_tokens(model, model.embed([1, 2, 3, 4]), cache, GenerationConfig(), stop_ids=(), history=[])
    with pytest.raises(PromptError, match="empty"):
        generate_tokens(model, model.embed([]), cache, GenerationConfig(), stop_ids=(), history=[])
    assert model.fed == []


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -3), ("top_k", True),
    ("repetition_penalty", 0.0), ("seed", -1), ("seed", "7"),
])
def test_validate_names_the_bad_value(field: str, value: object) -> None:
    with pytest.raises(PromptError, match=f"^{field} must be .* got {value!r}$".replace("(", r"\(")):
        GenerationConfig(**{field: value})


Models = tuple["LlamaForCausalLM", LanguageModel]  # (transformers' model, ours)


@pytest.fixture(scope="module")
def gqa_models(backend: Backend) -> Models:
    return tiny_llama(kv=2, tie=False, seed=4, backend=backend)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_matches_transformers(gqa_models: Models, penalty: float) -> None:
    import torch

    ref, lm = gqa_models
    ids = prompt(12, seed=5)
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids)[None], do_sample=False, max_new_tokens=16, eos_token_id=None,
                           pad_token_id=0, repetition_penalty=penalty)
    expected = out[0, len(ids):].tolist()
    history = ids.tolist()
    got = list(generate_tokens(lm, lm.embed(ids), lm.new_cache(), GenerationConfig(max_new_tokens=16,
                               repetition_penalty=penalty), stop_ids=(), history=history))
    assert got == expected
    assert history == ids.tolist() + expected

    stop = expected[5]  # generate stops at the first occurrence of its eos id and keeps it; we drop it
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids)[None], do_sample=False, max_new_tokens=16, eos_token_id=stop,
                           pad_token_id=0, repetition_penalty=penalty)
    got = list(generate_tokens(lm, lm.embed(ids), lm.new_cache(), GenerationConfig(max_new_tokens=16,
                               repetition_penalty=penalty), stop_ids={stop}, history=ids.tolist()))
    assert got + [stop] == out[0, len(ids):].tolist()


def test_seeded_sampling_repeats(gqa_models: Models) -> None:
    _, lm = gqa_models
    ids = prompt(8, seed=6)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, top_k=40, top_p=0.95, seed=123)

    def sample() -> list[int]:
        return list(generate_tokens(lm, lm.embed(ids), lm.new_cache(), cfg, stop_ids=(), history=[]))

    first = sample()
    assert first == sample()
    assert len(first) == 12 and all(0 <= t < VOCAB for t in first)
    cfg = replace(cfg, seed=124)
    assert sample() != first
