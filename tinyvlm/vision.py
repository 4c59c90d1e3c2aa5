"""CLIP ViT vision tower in NumPy float32 (MobileVLM uses openai/clip-vit-large-patch14-336).

Follows mobilevlm.md sections 3.4, 4.2 and 4.3, i.e. transformers' CLIPVisionModel: patch conv (no bias), CLS token,
learned positions, `pre_layrnorm`, pre-LN encoder layers (MHA with biases and no mask, quick_gelu MLP), then
`hidden_states[select_layer]` without `post_layernorm`, CLS dropped for `select_feature = "patch"`. Only the layers
that produce the selected hidden state are read and run (23 of 24 for select_layer -2).
Weight names are the checkpoint's own, relative to the tower (`vision_model.…`).
"""
from __future__ import annotations

from collections.abc import Mapping

from tinyvlm.backends import Array, Backend
from tinyvlm.config import VisionConfig
from tinyvlm.errors import ImageError
from tinyvlm.weights.checked import check_shapes, read_checked
from tinyvlm.weights.names import CLIP_EMBEDDINGS as _EMB
from tinyvlm.weights.names import CLIP_LAYER as _LAYER

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_NORMS = ("layer_norm1", "layer_norm2")


# ----------------------------------------------------------------------------------------------------------------
# Layout: names and shapes


def _layer_shapes(cfg: VisionConfig, j: int) -> dict[str, tuple[int, ...]]:
    C, F = cfg.hidden_size, cfg.intermediate_size
    out_in = {"self_attn.q_proj": (C, C), "self_attn.k_proj": (C, C), "self_attn.v_proj": (C, C),
              "self_attn.out_proj": (C, C), "mlp.fc1": (F, C), "mlp.fc2": (C, F)}
    prefix = _LAYER.format(j=j)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in _NORMS:
        shapes[f"{prefix}{name}.weight"] = (C,)
        shapes[f"{prefix}{name}.bias"] = (C,)
    for name, (n_out, n_in) in out_in.items():
        shapes[f"{prefix}{name}.weight"] = (n_out, n_in)
        shapes[f"{prefix}{name}.bias"] = (n_out,)
    return shapes


def _stem_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    C, p = cfg.hidden_size, cfg.patch_size
    return {
        _EMB + "class_embedding": (C,),
        _EMB + "patch_embedding.weight": (C, 3, p, p),
        _EMB + "position_embedding.weight": (cfg.num_patches + 1, C),
        "vision_model.pre_layrnorm.weight": (C,),
        "vision_model.pre_layrnorm.bias": (C,),
    }


def vision_expected_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published CLIP vision layout (all layers, post_layernorm; not position_ids)."""
    shapes = _stem_shapes(cfg)
    for j in range(cfg.num_hidden_layers):
        shapes.update(_layer_shapes(cfg, j))
    shapes["vision_model.post_layernorm.weight"] = (cfg.hidden_size,)
    shapes["vision_model.post_layernorm.bias"] = (cfg.hidden_size,)
    return shapes


def _needed_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    shapes = _stem_shapes(cfg)
    for j in range(cfg.layers_to_run):
        shapes.update(_layer_shapes(cfg, j))
    return shapes


def vision_needed_names(cfg: VisionConfig) -> set[str]:
    """The tensors VisionTower actually reads: the stem and the layers that run."""
    return set(_needed_shapes(cfg))


# ----------------------------------------------------------------------------------------------------------------
# Forward


class _Layer:
    """One pre-LN encoder layer's weights as (weight, bias) pairs in the backend (linear weights are [out, in],
    float32 or q8_0 blocks: the backend's vision_weights)."""

    def __init__(self, w: Mapping[str, Array], prefix: str, backend: Backend) -> None:
        pair = {name: (backend.dense(w[f"{prefix}{name}.weight"]), backend.dense(w[f"{prefix}{name}.bias"]))
                for name in _NORMS}
        pair.update({name: (backend.vision_matrix(w[f"{prefix}{name}.weight"]),
                            backend.dense(w[f"{prefix}{name}.bias"])) for name in _LINEARS})
        self.ln1, self.ln2 = pair["layer_norm1"], pair["layer_norm2"]
        self.q, self.k, self.v = pair["self_attn.q_proj"], pair["self_attn.k_proj"], pair["self_attn.v_proj"]
        self.o, self.fc1, self.fc2 = pair["self_attn.out_proj"], pair["mlp.fc1"], pair["mlp.fc2"]


class _Workspace:
    """The activations of one layer, allocated once per image and reused by all of its layers.

    Fresh arrays of this size (1-9 MB) come from the kernel page by page on first touch; on the reference VM
    those page faults cost as much as the elementwise ops themselves, and a workspace pays them once.
    """

    def __init__(self, backend: Backend, T: int, C: int, F: int, H: int) -> None:
        self.h = backend.empty((T, C))  # LayerNorm output
        self.q = backend.empty((T, C))
        self.k = backend.empty((T, C))
        self.v = backend.empty((T, C))
        self.heads = backend.empty((T, H, C // H))  # attention output per head, token-major
        self.out = backend.empty((T, C))  # out_proj or fc2 output
        self.mlp = backend.empty((T, F))  # fc1 output, then its activation


class VisionTower:
    """CLIP ViT forward for one image: pixels [3, H, W] -> features [P, C] (or [P+1, C] for cls_patch)."""

    def __init__(self, cfg: VisionConfig, weights: Mapping[str, Array], backend: Backend) -> None:
        self.cfg, self.bk = cfg, backend
        check_shapes(weights, _needed_shapes(cfg), "vision tower")  # every shape, before anything is converted
        w = read_checked(weights, _stem_shapes(cfg), "vision tower")
        C, p = cfg.hidden_size, cfg.patch_size
        self.patch_w = backend.dense(w[_EMB + "patch_embedding.weight"].reshape(C, 3 * p * p))  # conv as [C, 3*p*p]
        self.cls = backend.dense(w[_EMB + "class_embedding"][None, :])  # (1, C)
        self.pos = backend.dense(w[_EMB + "position_embedding.weight"])  # (P+1, C)
        self.pre_ln = (backend.dense(w["vision_model.pre_layrnorm.weight"]),
                       backend.dense(w["vision_model.pre_layrnorm.bias"]))
        # Layer by layer: a file's float16 weights become float32 (and maybe q8_0) one layer at a time, never all
        # at once (ViT-L/14: 1.2 GB of float32 that int8 vision weights would hold for a moment only).
        self.layers = [_Layer(read_checked(weights, _layer_shapes(cfg, j), f"vision tower layer {j}"),
                              _LAYER.format(j=j), backend) for j in range(cfg.layers_to_run)]

    def embed(self, pixels: Array) -> Array:
        """Patch conv as a matmul, CLS, positions, pre_layrnorm: [3, H, W] -> hidden_states[0] [P+1, C]."""
        bk = self.bk
        p, g = self.cfg.patch_size, self.cfg.image_size // self.cfg.patch_size
        patches = pixels.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4)  # (3, H, W) -> (g, g, 3, p, p)
        patches = patches.reshape(g * g, 3 * p * p)  # row-major: patch = row * g + col -> (P, 3*p*p)
        x = bk.concat([self.cls, bk.linear(patches, self.patch_w)]) + self.pos  # (P, C) -> (P+1, C)
        return bk.layer_norm(x, *self.pre_ln, self.cfg.layer_norm_eps)

    def _attention(self, layer: _Layer, ws: _Workspace) -> Array:
        """Self-attention of the normalised tokens ws.h (T, C); returns out_proj's output, ws.out (T, C)."""
        bk = self.bk
        T, C = ws.h.shape  # T = P+1 tokens
        H = self.cfg.num_attention_heads
        Dh = C // H
        q = bk.linear(ws.h, *layer.q, out=ws.q).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, C) -> (H, T, Dh)
        k = bk.linear(ws.h, *layer.k, out=ws.k).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, C) -> (H, T, Dh)
        v = bk.linear(ws.h, *layer.v, out=ws.v).reshape(T, H, Dh).transpose(1, 0, 2)  # (T, C) -> (H, T, Dh)
        bk.attention(q, k, v, Dh ** -0.5, out=ws.heads)  # -> (T, H, Dh), no mask
        return bk.linear(ws.heads.reshape(T, C), *layer.o, out=ws.out)

    def _layer(self, x: Array, layer: _Layer, ws: _Workspace) -> None:
        """One pre-LN encoder layer, updating the residual stream x (T, C) in place."""
        bk, eps = self.bk, self.cfg.layer_norm_eps
        bk.layer_norm(x, *layer.ln1, eps, out=ws.h)
        x += self._attention(layer, ws)
        bk.layer_norm(x, *layer.ln2, eps, out=ws.h)
        h = bk.quick_gelu_(bk.linear(ws.h, *layer.fc1, out=ws.mlp))  # (T, C) -> (T, F), activated in place
        x += bk.linear(h, *layer.fc2, out=ws.out)  # (T, F) -> (T, C)

    def _workspace(self, T: int) -> _Workspace:
        return _Workspace(self.bk, T, self.cfg.hidden_size, self.cfg.intermediate_size, self.cfg.num_attention_heads)

    def features(self, pixels: Array) -> Array:
        """hidden_states[select_layer] for one image, CLS dropped when select_feature is "patch"."""
        size = self.cfg.image_size
        if tuple(pixels.shape) != (3, size, size):
            raise ImageError(f"pixels have shape {tuple(pixels.shape)}; expected (3, {size}, {size})")
        self.bk.activate()
        x = self.embed(self.bk.asarray(pixels))  # (3, H, W) -> (P+1, C)
        if self.layers:
            ws = self._workspace(x.shape[0])
            for layer in self.layers:
                self._layer(x, layer, ws)
        return x[1:] if self.cfg.select_feature == "patch" else x  # (P+1, C) -> (P, C)

    def warm_up(self) -> None:
        """Run one encoder layer on two tokens and the pre-LN on them, so that a backend that compiles its kernels
        does so now (or loads them from its cache), with the types a real image uses."""
        if self.layers:
            x = self.bk.layer_norm(self.pos[:2].copy(), *self.pre_ln, self.cfg.layer_norm_eps)  # (2, C)
            self._layer(x, self.layers[0], self._workspace(2))
