"""MobileLLaMA / LLaMA decoder in NumPy: embedding, RMSNorm, rotary attention with GQA, SwiGLU MLP, lm_head.

Follows the Hugging Face `LlamaForCausalLM` eager path (transformers 5.23, `models/llama/modeling_llama.py`) and
../shared/design/mobilevlm.md section 3.1. Weights keep their Hugging Face names and (out, in) layout, so
`y = x @ W.T`; BLAS takes the transposed view without a copy, and storing W transposed measured no faster
for decode (T = 1) or prefill. Everything runs in float32; the numeric ops come from tinyvlm.kernels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tinyvlm.cache import KVCache
from tinyvlm.config import TextConfig
from tinyvlm.errors import PromptError, WeightsError
from tinyvlm import backend
from tinyvlm.backend import fuse, linear, linear_split
from tinyvlm.kernels import grouped_attention, rope_tables
from tinyvlm.kernels.quant import QuantizedMatrix, pack_together

Weight = np.ndarray | QuantizedMatrix  # a linear layer's (out, in) matrix, dense or quantized


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

    input_layernorm: np.ndarray  # (D,)
    qkv: list[Weight]  # q_proj (Hq*Dh, D), k_proj and v_proj (Hkv*Dh, D), stacked when quantized (backend.fuse)
    o_proj: Weight  # (D, Hq*Dh)
    post_attention_layernorm: np.ndarray  # (D,)
    gate_up: list[Weight]  # gate_proj and up_proj (F, D), stacked when quantized
    down_proj: Weight  # (D, F)


def _float32(weights: Mapping[str, Weight], name: str) -> Weight:
    """A weight as contiguous float32 (no copy when it already is, so memory-mapped files stay lazy);
    a quantized matrix (tinyvlm.quantize) is kept as it is."""
    w = weights[name]
    return w if isinstance(w, QuantizedMatrix) else np.ascontiguousarray(w, dtype=np.float32)


def _load_layer(weights: Mapping[str, Weight], i: int) -> _Layer:
    p = f"model.layers.{i}."
    return _Layer(
        input_layernorm=_float32(weights, p + "input_layernorm.weight"),
        qkv=fuse([_float32(weights, p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
        o_proj=_float32(weights, p + "self_attn.o_proj.weight"),
        post_attention_layernorm=_float32(weights, p + "post_attention_layernorm.weight"),
        gate_up=fuse([_float32(weights, p + "mlp.gate_proj.weight"), _float32(weights, p + "mlp.up_proj.weight")]),
        down_proj=_float32(weights, p + "mlp.down_proj.weight"),
    )


# ---------------------------------------------------------------- the decoder

def _mlp(layer: _Layer, x: np.ndarray) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)); (T, D) -> (T, D)."""
    if len(layer.gate_up) == 1:  # gate and up stacked (backend.fuse): one (T, 2F) output
        hidden = backend.swiglu_(linear(x, layer.gate_up[0]))  # (T, 2F) -> (T, F), in its gate half
    else:
        gate, up = (linear(x, w) for w in layer.gate_up)  # (T, D) -> (T, F) each
        hidden = backend.silu_mul_(gate, up)  # silu(gate) * up, in gate's memory
    return linear(hidden, layer.down_proj)  # (T, F) -> (T, D)


class LanguageModel:
    """The decoder: `embed(ids)` gives input embeddings, `forward(embeds, cache)` gives next-token logits."""

    def __init__(self, cfg: TextConfig, weights: Mapping[str, Weight]) -> None:
        self.cfg = cfg
        expected = language_expected_shapes(cfg)
        expected.setdefault("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        w = {name: _float32(weights, name) for name in expected if name in weights}  # each read once
        self._check(w, expected)
        self.embed_tokens = w["model.embed_tokens.weight"]  # (V, D)
        self.layers = [_load_layer(w, i) for i in range(cfg.num_hidden_layers)]
        self.norm = w["model.norm.weight"]  # (D,)
        # A tied model uses the embedding as its head, unless a (quantized) copy of the head is given.
        self.lm_head = w.get("lm_head.weight", self.embed_tokens)  # (V, D)
        self._pack_quantized()
        self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

    def _pack_quantized(self) -> None:
        """Move every quantized matrix of the layers and the head into one huge-page buffer (quant.pack_together:
        decode measured 18% faster). Dense matrices are left where they are (memory-mapped files stay lazy)."""
        everything = [m for layer in self.layers for m in (*layer.qkv, layer.o_proj, *layer.gate_up, layer.down_proj)]
        mats = [m for m in [*everything, self.lm_head] if isinstance(m, QuantizedMatrix)]
        if not mats:
            return
        packed = dict(zip(map(id, mats), pack_together(mats)))  # id(old) -> its copy in the buffer

        def swap(m: Weight) -> Weight:
            return packed.get(id(m), m)

        self.layers = [replace(layer, qkv=[swap(m) for m in layer.qkv], o_proj=swap(layer.o_proj),
                               gate_up=[swap(m) for m in layer.gate_up], down_proj=swap(layer.down_proj))
                       for layer in self.layers]
        self.lm_head = swap(self.lm_head)

    @staticmethod
    def _check(weights: Mapping[str, Weight], expected: Mapping[str, tuple[int, ...]]) -> None:
        """Raise one WeightsError naming every missing or mis-shaped tensor (extra tensors are ignored)."""
        problems = []
        for name, shape in expected.items():
            if name == "lm_head.weight" and name not in weights:
                continue  # tied, or an untied checkpoint saved without its head: the embedding serves
            if name not in weights:
                problems.append(f"missing {name} {shape}")
            elif tuple(weights[name].shape) != shape:
                problems.append(f"{name} has shape {tuple(weights[name].shape)}, expected {shape}")
        if problems:
            raise WeightsError("language model weights do not match the config: " + "; ".join(problems))

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """Token ids -> (T, D) float32 embeddings. The image placeholder -200 must be spliced out before."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros((0, self.cfg.hidden_size), dtype=np.float32)  # (0, D)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise PromptError(f"token ids must be a flat sequence of integers, got {arr.dtype} of shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= self.cfg.vocab_size)]
        if bad.size:
            raise PromptError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return self.embed_tokens[arr]  # (T,) -> (T, D)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty float32 cache for up to `max_len` positions (default: the model's context length)."""
        limit = self.cfg.max_position_embeddings
        n = limit if max_len is None else max_len
        if not 1 <= n <= limit:
            raise PromptError(f"cache length {n} must be between 1 and the model's context of {limit} positions")
        return KVCache(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, n, self.cfg.head_dim, np.float32)

    def forward(self, embeds: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T new positions through the decoder, append their keys/values to the cache, return logits.

        The chunk takes positions cache.pos .. cache.pos+T-1; each of its tokens attends to the whole cache
        before it and causally within the chunk, so one call on T tokens equals T calls on one token.
        Returns (T, V) logits with `all_logits`, else (V,) for the last position only.
        """
        cfg = self.cfg
        x = np.asarray(embeds, dtype=np.float32)  # (T, D)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != cfg.hidden_size:
            raise PromptError(f"embeddings must have shape (T>0, {cfg.hidden_size}), got {x.shape}")
        T, pos = x.shape[0], cache.pos
        limit = min(cache.max_len, len(self.rope_cos))
        if pos + T > limit:
            raise PromptError(
                f"a chunk of {T} tokens at position {pos} does not fit the context of {limit} ({limit - pos} free)"
            )
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]  # (T, Dh/2) each
        # Query t (position pos+t) may see keys 0 .. pos+t: -inf above that diagonal.
        mask = np.triu(np.full((T, pos + T), -np.inf, dtype=np.float32), k=pos + 1) if T > 1 else None  # (T, S)
        for i, layer in enumerate(self.layers):
            h = backend.rms_norm(x, layer.input_layernorm, cfg.rms_norm_eps)
            x = x + self._attention(i, layer, h, cache, cos, sin, mask)
            h = backend.rms_norm(x, layer.post_attention_layernorm, cfg.rms_norm_eps)
            x = x + _mlp(layer, h)
        cache.advance(T)
        if not all_logits:
            x = x[-1:]  # (T, D) -> (1, D): only the last position's logits are needed
        logits = linear(backend.rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head)  # (T, D) -> (T, V)
        return logits if all_logits else logits[0]

    def _attention(self, i: int, layer: _Layer, x: np.ndarray, cache: KVCache, cos: np.ndarray,
                   sin: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """Grouped-query self-attention of a (T, D) chunk over the cache of layer i; returns (T, D).

        Decode (T == 1) with quantized layers uses the backend's decode_attention, which runs on Numba's
        threads like the matvecs around it. With dense layers every matvec is OpenBLAS's, and Numba's threads,
        spinning after a parallel kernel between them, cost more than the kernel saves (MobileLLaMA-1.4B fp32
        decode on the reference VM: 5.3 tok/s with NumPy's attention, 4.1 with Numba's).
        """
        cfg = self.cfg
        T, Hq, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = linear_split(x, layer.qkv, [Hq * Dh, Hkv * Dh, Hkv * Dh])  # (T, D) -> (T, H*Dh) each
        q = q.reshape(T, Hq, Dh).transpose(1, 0, 2)  # (T, Hq*Dh) -> (Hq, T, Dh)
        k = k.reshape(T, Hkv, Dh).transpose(1, 0, 2)  # (T, Hkv*Dh) -> (Hkv, T, Dh)
        v = v.reshape(T, Hkv, Dh).transpose(1, 0, 2)  # (T, Hkv*Dh) -> (Hkv, T, Dh)
        q, k = backend.apply_rope(q, cos, sin), backend.apply_rope(k, cos, sin)
        cache.write(i, k, v)
        scale = Dh ** -0.5
        if T == 1 and isinstance(layer.o_proj, QuantizedMatrix):  # one query: a kernel reads the cache in place
            out = backend.decode_attention(q[:, 0], *cache.layer(i), scale)  # (Hq, Dh)
        else:  # dense layers run on OpenBLAS's threads: see _attention's docstring
            out = grouped_attention(q, cache.keys(i), cache.values(i), scale, mask)  # (Hq, T, Dh), over S = pos+T keys
        out = out.reshape(Hq, T, Dh).transpose(1, 0, 2).reshape(T, Hq * Dh)  # -> (T, Hq*Dh)
        return linear(out, layer.o_proj)  # (T, Hq*Dh) -> (T, D)
