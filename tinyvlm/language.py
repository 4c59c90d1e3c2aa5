"""MobileLLaMA / LLaMA decoder in NumPy: embedding, RMSNorm, rotary attention with GQA, SwiGLU MLP, lm_head.

Follows the Hugging Face `LlamaForCausalLM` eager path (transformers 5.23, `models/llama/modeling_llama.py`) and
../shared/design/mobilevlm.md section 3.1. Weights keep their Hugging Face names and (out, in) layout, so
`y = x @ W.T`; BLAS takes the transposed view without a copy, and storing W transposed measured no faster
for decode (T = 1) or prefill. Everything runs in float32, and every op is the model's backend's
(tinyvlm/backends), which also prepares the weights and allocates the KV cache.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tinyvlm.backends import Array, Backend, Weight
from tinyvlm.cache import KVCache
from tinyvlm.config import TextConfig
from tinyvlm.errors import PromptError
from tinyvlm.weights.checked import read_checked


# ---------------------------------------------------------------- weights

def language_expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every LLM tensor in a Hugging Face checkpoint (no lm_head when it is tied)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out = cfg.num_attention_heads * cfg.head_dim  # Hq*Dh
    kv_out = cfg.num_key_value_heads * cfg.head_dim  # Hkv*Dh
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, D)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, D)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, q_out)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
    shapes["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass(frozen=True)
class _Layer:
    """One decoder block's weights, named as in the checkpoint (`model.layers.{i}.<part>.<name>.weight`)."""

    input_layernorm: Array  # (D,)
    qkv: list[Weight]  # q_proj (Hq*Dh, D), k_proj and v_proj (Hkv*Dh, D), as the backend prepared them
    o_proj: Weight  # (D, Hq*Dh)
    post_attention_layernorm: Array  # (D,)
    gate_up: list[Weight]  # gate_proj and up_proj (F, D), as the backend prepared them
    down_proj: Weight  # (D, F)


_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # the linear layers, by the input they read


class LanguageModel:
    """The decoder: `embed(ids)` gives input embeddings, `forward(embeds, cache)` gives next-token logits."""

    def __init__(self, cfg: TextConfig, weights: Mapping[str, Weight], backend: Backend) -> None:
        self.cfg, self.bk = cfg, backend
        expected = language_expected_shapes(cfg)
        if "lm_head.weight" in weights:  # a tied model may still carry a (quantized) copy of its head
            expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
        w = read_checked(weights, expected, "language model")
        dense = backend.dense
        self.embed_tokens = dense(w["model.embed_tokens.weight"])  # (V, D)
        self.norm = dense(w["model.norm.weight"])  # (D,)
        # One call prepares every linear layer (the backend may stack and pack them together), the head last.
        groups = [[w[f"model.layers.{i}.{name}.weight"] for name in group]
                  for i in range(cfg.num_hidden_layers) for group in _GROUPS]
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied: the embedding serves as the head
        *prepared, (self.lm_head,) = backend.linears([*groups, [head]])  # lm_head (V, D)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            qkv, (o_proj,), gate_up, (down_proj,) = prepared[4 * i:4 * i + 4]
            self.layers.append(_Layer(dense(w[f"model.layers.{i}.input_layernorm.weight"]), qkv, o_proj,
                                      dense(w[f"model.layers.{i}.post_attention_layernorm.weight"]), gate_up,
                                      down_proj))
        self.rope_cos = self.rope_sin = backend.zeros((0, cfg.head_dim // 2))  # (positions so far, Dh/2): see _rope

    def embed(self, ids: Sequence[int]) -> Array:
        """Token ids -> (T, D) float32 embeddings. The image placeholder -200 must be spliced out before."""
        arr = np.asarray(ids)  # host ids, checked here before they index the table
        if arr.size == 0:
            return self.bk.zeros((0, self.cfg.hidden_size))  # (0, D)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise PromptError(f"token ids must be a flat sequence of integers, got {arr.dtype} of shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= self.cfg.vocab_size)]
        if bad.size:
            raise PromptError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return self.bk.embedding(self.embed_tokens, arr)  # (T,) -> (T, D)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty float32 cache for up to `max_len` positions (default: the model's context length)."""
        limit = self.cfg.max_position_embeddings
        n = limit if max_len is None else max_len
        if not 1 <= n <= limit:
            raise PromptError(f"cache length {n} must be between 1 and the model's context of {limit} positions")
        return KVCache(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, n, self.cfg.head_dim, self.bk)

    def forward(self, embeds: Array, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T new positions through the decoder, append their keys/values to the cache, return logits.

        The chunk takes positions cache.pos .. cache.pos+T-1; each of its tokens attends to the whole cache
        before it and causally within the chunk, so one call on T tokens equals T calls on one token.
        Returns host (T, V) float32 logits with `all_logits`, else (V,) for the last position only.
        """
        logits = self._logits(embeds, cache, all_logits)  # (T, V) or (1, V), in the backend's memory
        return self.bk.to_host(logits if all_logits else logits[0])

    def greedy_next(self, embeds: Array, cache: KVCache) -> int:
        """forward() for the last position, then the id of its largest logit (the first of equals), found by the
        backend: on a GPU only that id comes back to the host."""
        return self.bk.argmax(self._logits(embeds, cache, False)[0])

    def _logits(self, embeds: Array, cache: KVCache, all_logits: bool) -> Array:
        cfg, bk = self.cfg, self.bk
        bk.activate()
        x = bk.asarray(embeds)  # (T, D)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != cfg.hidden_size:
            raise PromptError(f"embeddings must have shape (T>0, {cfg.hidden_size}), got {x.shape}")
        cache.check_room(x.shape[0])
        x = self._blocks(x, cache, self.layers)
        if not all_logits:
            x = x[-1:]  # (T, D) -> (1, D): only the last position's logits are needed
        return bk.linear(bk.rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head)  # (T, D) -> (T, V)

    def warm_up(self) -> None:
        """Run every op of the decoder once, on a prompt of the backend's longest short input plus one (its long-prompt
        path) and one more token through layer 0 and the head, so that a backend that compiles its kernels does so
        now (or loads them from its cache) with the types a real run uses."""
        long_prompt = self.bk.short_input_tokens + 1
        cache = self.new_cache(min(long_prompt + 1, self.cfg.max_position_embeddings))
        for T in (long_prompt, 1):
            if cache.free < T:
                break
            x = self._blocks(self.embed([0] * T), cache, self.layers[:1])  # (T, D)
            self.bk.linear(self.bk.rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head)

    def _rope(self, pos: int, T: int) -> tuple[Array, Array]:
        """RoPE's cos and sin for positions pos .. pos+T-1. The tables grow (doubling) as positions are used, never
        past the context: the context length comes from the model file. Each row depends only on its position, so
        a grown table starts with the same rows."""
        if pos + T > self.rope_cos.shape[0]:
            n = min(self.cfg.max_position_embeddings, max(pos + T, 2 * self.rope_cos.shape[0], 256))
            self.rope_cos, self.rope_sin = self.bk.rope_tables(self.cfg.head_dim, n, self.cfg.rope_theta)
        return self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]

    def _blocks(self, x: Array, cache: KVCache, layers: Sequence[_Layer]) -> Array:
        """The (T, D) chunk x through `layers` (the first len(layers) of the model) at positions cache.pos ..
        cache.pos+T-1, which are then committed; returns the (T, D) residual stream."""
        T, pos = x.shape[0], cache.pos
        cos, sin = self._rope(pos, T)  # (T, Dh/2) each
        x = x.copy()  # the residual stream, added to in place from here on (the caller's embeddings stay as given)
        for i, layer in enumerate(layers):
            x = self._block(i, layer, x, cache, cos, sin)
        cache.advance(T)
        return x

    def _block(self, i: int, layer: _Layer, x: Array, cache: KVCache, cos: Array, sin: Array) -> Array:
        """Decoder block i on the (T, D) chunk x; returns the new (T, D) residual stream."""
        bk, eps = self.bk, self.cfg.rms_norm_eps
        heads = self._attention(i, layer, bk.rms_norm(x, layer.input_layernorm, eps), cache, cos, sin)
        x = bk.residual_linear(x, heads, layer.o_proj)  # x += (T, Hq*Dh) -> (T, D)
        hidden = bk.swiglu(bk.rms_norm(x, layer.post_attention_layernorm, eps), layer.gate_up)  # (T, D) -> (T, F)
        return bk.residual_linear(x, hidden, layer.down_proj)  # x += (T, F) -> (T, D)

    def _attention(self, i: int, layer: _Layer, x: Array, cache: KVCache, cos: Array, sin: Array) -> Array:
        """Grouped-query self-attention of a (T, D) chunk over the cache of layer i; returns the heads' outputs
        (T, Hq*Dh), before o_proj."""
        cfg, bk = self.cfg, self.bk
        T, Hq, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = bk.linear_split(x, layer.qkv, [Hq * Dh, Hkv * Dh, Hkv * Dh])  # (T, D) -> (T, H*Dh) each
        q = q.reshape(T, Hq, Dh).transpose(1, 0, 2)  # (T, Hq*Dh) -> (Hq, T, Dh)
        k = k.reshape(T, Hkv, Dh).transpose(1, 0, 2)  # (T, Hkv*Dh) -> (Hkv, T, Dh)
        v = v.reshape(T, Hkv, Dh).transpose(1, 0, 2)  # (T, Hkv*Dh) -> (Hkv, T, Dh)
        q, k = bk.apply_rope(q, cos, sin), bk.apply_rope(k, cos, sin)
        cache.write(i, k, v)
        scale = Dh ** -0.5
        if T == 1:  # one query: over the layer's whole cache, of which the first pos+1 positions count
            out = bk.decode_attention(q[:, 0], *cache.layer(i), scale)  # (Hq, Dh)
        else:
            out = bk.causal_attention(q, cache.keys(i), cache.values(i), scale, cache.pos)  # (Hq, T, Dh)
        return out.reshape(Hq, T, Dh).transpose(1, 0, 2).reshape(T, Hq * Dh)  # -> (T, Hq*Dh)
