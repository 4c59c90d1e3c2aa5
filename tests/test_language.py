"""LanguageModel and KVCache against transformers' LlamaForCausalLM (float32, eager attention, random weights)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tinyvlm.backends import Backend, make
from tinyvlm.config import TextConfig
from tinyvlm.errors import PromptError, WeightsError
from tinyvlm.kernels import rope_tables
from tinyvlm.cache import INITIAL_POSITIONS
from tinyvlm.language import LanguageModel, language_expected_shapes

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

VOCAB = 1000
# Logits compared as max|ours - ref| / max|ref|; measured about 1.3e-6 on these models.
LOGIT_RTOL = 1e-4
# Same arithmetic through different chunkings only differs by BLAS blocking; measured about 1e-6.
CHUNK_RTOL = 1e-5

CASES = {"mha": dict(kv=4, tie=False), "gqa": dict(kv=2, tie=False), "tied": dict(kv=4, tie=True)}


def tiny_llama(kv: int, tie: bool, seed: int = 0, backend: Backend | None = None) -> tuple[LlamaForCausalLM,
                                                                                             LanguageModel]:
    """A random 2-layer LLaMA in transformers and the same weights in tinyvlm (on `backend`, default: the module's).

    initializer_range 0.1 gives logits with std ~1.1, so greedy choices are not near-ties.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=kv, num_hidden_layers=2,
        intermediate_size=256, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    ref = LlamaForCausalLM(hf_cfg).eval()
    weights = {name: t.detach().numpy().copy() for name, t in ref.state_dict().items()}
    if tie:
        weights.pop("lm_head.weight", None)  # a tied checkpoint stores the embedding only
    cfg = TextConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=256,
        vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie,
    )
    return ref, LanguageModel(cfg, weights, backend or make())


@pytest.fixture(scope="module", params=list(CASES))
def models(request: pytest.FixtureRequest, backend: Backend) -> tuple[LlamaForCausalLM, LanguageModel]:
    return tiny_llama(**CASES[request.param], backend=backend)


def prompt(n: int = 20, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, n)


def ref_logits(ref: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.tensor(ids)[None]).logits[0].numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_full_logits_match_transformers(models: tuple[LlamaForCausalLM, LanguageModel]) -> None:
    ref, lm = models
    ids = prompt()
    expected = ref_logits(ref, ids)
    assert expected.std() > 1.0
    got = lm.forward(lm.embed(ids), lm.new_cache(), all_logits=True)
    assert got.shape == (20, VOCAB) and got.dtype == np.float32
    assert rel_err(got, expected) <= LOGIT_RTOL
    last = lm.forward(lm.embed(ids), lm.new_cache())
    assert last.shape == (VOCAB,)
    assert rel_err(last, expected[-1]) <= LOGIT_RTOL


def test_prefill_equals_steps_and_chunks(models: tuple[LlamaForCausalLM, LanguageModel]) -> None:
    _, lm = models
    ids = prompt()
    whole = lm.forward(lm.embed(ids), lm.new_cache(), all_logits=True)

    cache = lm.new_cache(64)
    steps = np.stack([lm.forward(lm.embed([t]), cache) for t in ids])
    assert cache.pos == 20
    assert rel_err(steps, whole) <= CHUNK_RTOL

    cache = lm.new_cache(64)  # a second multi-token chunk exercises the mask offset past the cache
    chunks = np.concatenate([lm.forward(lm.embed(ids[:7]), cache, all_logits=True),
                             lm.forward(lm.embed(ids[7:]), cache, all_logits=True)])
    assert rel_err(chunks, whole) <= CHUNK_RTOL


def test_greedy_matches_transformers_generate(models: tuple[LlamaForCausalLM, LanguageModel]) -> None:
    import torch

    ref, lm = models
    ids = prompt(12, seed=2)
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids)[None], do_sample=False, max_new_tokens=16,
                           eos_token_id=None, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    cache = lm.new_cache()
    logits = lm.forward(lm.embed(ids), cache)
    got = []
    for _ in range(16):
        got.append(int(np.argmax(logits)))
        logits = lm.forward(lm.embed(got[-1:]), cache)
    assert got == expected


def test_forward_from_inputs_embeds(models: tuple[LlamaForCausalLM, LanguageModel]) -> None:
    import torch

    ref, lm = models
    ids = prompt()
    embeds = lm.embed(ids)
    np.testing.assert_array_equal(embeds, ref.get_input_embeddings()(torch.tensor(ids)).detach().numpy())
    # Perturbed embeddings (as an image splice would give) through both models' inputs_embeds path.
    embeds = embeds + np.random.default_rng(3).normal(0, 0.1, embeds.shape).astype(np.float32)
    with torch.no_grad():
        expected = ref(inputs_embeds=torch.from_numpy(embeds)[None]).logits[0].numpy()
    got = lm.forward(embeds, lm.new_cache(), all_logits=True)
    assert rel_err(got, expected) <= LOGIT_RTOL


def test_expected_shapes_match_checkpoint(models: tuple[LlamaForCausalLM, LanguageModel]) -> None:
    ref, lm = models
    hf_shapes = {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    if lm.cfg.tie_word_embeddings:
        hf_shapes.pop("lm_head.weight", None)
    assert language_expected_shapes(lm.cfg) == hf_shapes


def test_chunk_past_cache_and_bad_ids() -> None:
    _, lm = tiny_llama(kv=2, tie=False)
    cache = lm.new_cache(8)
    lm.forward(lm.embed([5, 6, 7]), cache)
    with pytest.raises(PromptError, match=r"6 tokens at position 3 .* context of 8 \(5 free\)"):
        lm.forward(lm.embed(prompt(6)), cache)
    assert cache.pos == 3  # nothing was written
    with pytest.raises(PromptError, match="-200 is outside the vocabulary"):
        lm.embed([1, 5, -200, 7])
    with pytest.raises(PromptError, match=f"{VOCAB} is outside the vocabulary"):
        lm.embed([VOCAB])
    with pytest.raises(PromptError, match="context of 256"):
        lm.new_cache(257)
    with pytest.raises(PromptError, match=r"shape \(T>0, 128\)"):
        lm.forward(np.zeros((2, 64), dtype=np.float32), lm.new_cache())
    assert lm.embed([]).shape == (0, 128)


def test_huge_context_allocates_only_what_is_used(models: tuple[LlamaForCausalLM, LanguageModel],
                                                  backend: Backend) -> None:
    """A context of 2**24 positions (the limit a file may state): the RoPE tables and the cache are sized by the
    positions used, and the logits are those of the same model with a small context."""
    ref, lm = models
    weights = {name: t.detach().numpy().copy() for name, t in ref.state_dict().items()}
    if lm.cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    big = LanguageModel(replace(lm.cfg, max_position_embeddings=2**24), weights, backend)
    cache, ids = big.new_cache(), prompt(20)
    logits = big.forward(big.embed(ids), cache, all_logits=True)
    assert big.rope_cos.shape[0] == 256 and cache.k.shape[1] == INITIAL_POSITIONS and cache.free == 2**24 - 20
    np.testing.assert_allclose(logits, lm.forward(lm.embed(ids), lm.new_cache(), all_logits=True), rtol=1e-5,
                               atol=1e-5)


def test_weight_problems_listed_together() -> None:
    ref, lm = tiny_llama(kv=2, tie=False)
    weights = {name: t.detach().numpy() for name, t in ref.state_dict().items()}
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.norm.weight"] = np.ones(64, dtype=np.float32)
    with pytest.raises(WeightsError) as err:
        LanguageModel(lm.cfg, weights, lm.bk)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "wrong shape (1): model.norm.weight (file [64], expected [128])" in str(err.value)


@pytest.mark.parametrize("head_dim, n_pos, theta", [(32, 256, 1e4), (64, 2048, 1e4), (80, 2048, 1e4), (64, 4096, 5e5)])
def test_rope_tables_match_transformers(head_dim: int, n_pos: int, theta: float) -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=n_pos,
                         rope_theta=theta)
    cos_ref, sin_ref = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1), torch.arange(n_pos)[None])
    cos, sin = rope_tables(head_dim, n_pos, theta)
    # torch's float32 cos/sin are not correctly rounded; ours are, so they differ by at most 1 ulp (6e-8 at 1.0).
    np.testing.assert_allclose(np.concatenate([cos, cos], 1), cos_ref[0].numpy(), rtol=0, atol=6e-8)
    np.testing.assert_allclose(np.concatenate([sin, sin], 1), sin_ref[0].numpy(), rtol=0, atol=6e-8)
