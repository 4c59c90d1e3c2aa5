"""Load llama.cpp GGUF files: a LLaMA LLM (config, tokenizer and chat template from its metadata, weights by name),
and with it, optionally, llama.cpp's MobileVLM image encoder (an "mmproj" file: CLIP tower and LDP / LDPv2).

LLM. Q4_0 / Q4_1 / Q8_0 / Q6_K matrices feed the quantized kernels as they are (their blocks are only re-laid-out,
once), and so do Q4_K and Q5_0, as the q4_1 and q8_0 matrices they equal (kernels/quant.from_gguf_tensor): a
Q4_K_M file loads bit-exact. The other quantized kinds (Q5_1, Q5_K) are dequantized and
requantized to Q8_0 (quantize.CONVERTED_KIND);
F32 / F16 / BF16 become float32, or are quantized by `quant` with the same block kinds as every other path
(quantize.BLOCK_KINDS). Every quantized matrix is converted only when the backend packs it, one at a time
(kernels/packing.Deferred): MobileLLaMA-1.4B's load peak went from 2011 to 1275 MiB (Q4_0) and from 2431 to 1624
MiB (Q4_K_M). The q and k rows that llama.cpp's converter permuted are put back in Hugging Face order (a
row permutation, so quantized blocks move whole). A tied model (no output.weight) uses the embedding table as its
head, kept quantized for the matvec and float for lookups. MobileVLM LLM files carry no chat template, so they
keep MobileVLM's v1 template.

mmproj (../shared/design/mobilevlm.md section 3.6). Tensors are renamed by weights/names.py's MMPROJ_NAMES (in
which transformers' `mlp.fc1` became `ffn_down`), the squeezed conv kernels get their size-1 axes back, and the
configs come from the `clip.*` metadata (config.vision_configs_from_mmproj). For a LLaVA-style file the converter
dropped the tower's last layer (block_count 23 for ViT-L): the stored layers produce exactly hidden_states[-2],
the features the official code selects, and tinyvlm runs them all. llama.cpp's own graph stops one layer earlier,
so its features are not a reference.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinyvlm.backends import Backend
from tinyvlm.config import ModelConfig
from tinyvlm.config.gguf import text_config_from_gguf, vision_configs_from_mmproj
from tinyvlm.errors import ConfigError, TokenizerError, WeightsError
from tinyvlm.limits import short, text
from tinyvlm.kernels.packing import Deferred
from tinyvlm.kernels.quant import (EXACT_GGUF_KINDS, EXACT_GGUF_TYPES, GROUP, QuantizedMatrix, from_gguf_tensor,
                                   quantize)
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.projector import build_projector
from tinyvlm.prompt import detect
from tinyvlm.quantize import CONVERTED_KIND, Progress, block_kind
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, vision_needed_names
from tinyvlm.vlm import VLM
from tinyvlm.weights.checked import check_layer_count, check_tensors, listing
from tinyvlm.weights.gguf import GGUFTensor, read_gguf, to_float32
from tinyvlm.weights.names import hf_name, mmproj_name, unpermute_qk, unsqueeze
from tinyvlm.weights.pages import release
from tinyvlm.weights.store import file_kind

FLOAT_TYPES = ("F32", "F16", "BF16")


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    try:
        return path.is_file() and file_kind(path) == "GGUF"  # is_file first: a FIFO would block open()
    except (WeightsError, ValueError):  # unreadable, an impossible name: the other paths say why
        return False


def to_quantized(tensor: GGUFTensor) -> QuantizedMatrix:
    """A weight (out, in) of one of quant.EXACT_GGUF_TYPES as the kernels' QuantizedMatrix equal to it, without
    dequantizing it."""
    if tensor.type_name not in EXACT_GGUF_TYPES or len(tensor.shape) != 2:
        raise WeightsError(f"tensor {short(tensor.name)} is {tensor.type_name} of shape {tensor.shape}; only 2-D "
                           f"{', '.join(EXACT_GGUF_TYPES)} tensors convert directly to a quantized matrix")
    return from_gguf_tensor(tensor.type_name, tensor.raw, tensor.shape)  # type: ignore[arg-type]


def _rows_permuted(qm: QuantizedMatrix, order: np.ndarray) -> QuantizedMatrix:
    """qm with its rows taken in `order` (blocks run along the rows, so they move whole)."""
    return QuantizedMatrix(qm.kind, qm.shape, qm.qs[order], qm.d[order], None if qm.m is None else qm.m[order])


def _permuted(make: Callable[[], QuantizedMatrix], order: np.ndarray) -> QuantizedMatrix:
    return _rows_permuted(make(), order)


def _planned_kind(tensor: GGUFTensor, name: str, quant: str | None) -> str | None:
    """The block kind _convert gives the 2-D weight `name`, or None when it stays float32: from the header alone."""
    if tensor.type_name in EXACT_GGUF_KINDS:
        return EXACT_GGUF_KINDS[tensor.type_name]
    if tensor.shape[1] % GROUP:
        return None
    if tensor.type_name not in FLOAT_TYPES:
        return CONVERTED_KIND
    return None if quant is None else block_kind(quant, name)


def _converted(tensor: GGUFTensor, name: str, quant: str | None) -> np.ndarray | QuantizedMatrix:
    """The 2-D weight `name` (ours) for the kernels (see _convert); the file pages it was copied from are given
    back (weights/pages.py)."""
    w = _convert(tensor, name, quant)
    release(tensor.raw, *((w.qs, w.d, w.m) if isinstance(w, QuantizedMatrix) else (w,)))
    return w


def _matrix(tensor: GGUFTensor, name: str, quant: str | None) -> np.ndarray | Deferred:
    """A float32 weight now, or a quantized one as a Deferred: the backend converts it when it packs it, so that
    the converted copies of every matrix never exist at once (kernels/packing.py)."""
    kind = _planned_kind(tensor, name, quant)
    if kind is None:
        return _converted(tensor, name, quant)
    return Deferred(kind, tuple(tensor.shape), functools.partial(_converted, tensor, name, quant))  # type: ignore


def _convert(tensor: GGUFTensor, name: str, quant: str | None) -> np.ndarray | QuantizedMatrix:
    """Direct kinds as stored, other quantized kinds converted, floats as float32 unless `quant` asks for blocks
    (the kind _planned_kind chose)."""
    if tensor.type_name in EXACT_GGUF_TYPES:
        return to_quantized(tensor)
    kind = _planned_kind(tensor, name, quant)
    w = to_float32(tensor)
    return w if kind is None else quantize(w, kind)


def load_gguf(path: str | Path, quant: str | None, backend: Backend,
              progress: Progress | None = None, mmproj: str | Path | None = None) -> VLM:
    """A VLM from an LLM GGUF file (llama architecture): text-only, or with the image side of an mmproj file."""
    path = Path(path)
    f = read_gguf(path)
    try:
        text_cfg = text_config_from_gguf(f.metadata, f.tensors)
    except (ConfigError, WeightsError) as e:
        raise type(e)(f"{path}: {e}") from None
    try:
        tokenizer = Tokenizer.from_gguf(f.metadata)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    mm = None if mmproj is None else _read_mmproj(Path(mmproj), text_cfg.hidden_size, backend)  # fails fast
    ours = {name: hf_name(name) for name in f.tensors}
    unknown = [name for name, hf in ours.items() if hf is None]
    if unknown:
        raise WeightsError(f"{path}: tensors the llama name table does not know: {listing(unknown, 10)}")
    check_tensors({hf: f.tensors[name].shape for name, hf in ours.items()}, language_expected_shapes(text_cfg),
                  str(path), optional=["lm_head.weight"])  # before anything is converted
    weights: dict[str, np.ndarray | Deferred] = {}
    for done, (name, hf) in enumerate(ours.items(), 1):
        tensor = f.tensors[name]
        if hf == "model.embed_tokens.weight":
            weights[hf] = to_float32(tensor)  # (V, D): rows are looked up, never multiplied
            if text_cfg.tie_word_embeddings:
                weights["lm_head.weight"] = _matrix(tensor, "lm_head.weight", quant)
        elif len(tensor.shape) == 2:
            weights[hf] = _matrix(tensor, hf, quant)
        else:
            weights[hf] = to_float32(tensor)
        if hf.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = text_cfg.num_attention_heads if "q_proj" in hf else text_cfg.num_key_value_heads
            w = weights[hf]
            if isinstance(w, Deferred):
                order = unpermute_qk(np.arange(w.shape[0])[:, None], heads)[:, 0]
                weights[hf] = Deferred(w.kind, w.shape, functools.partial(_permuted, w.make, order))
            else:
                weights[hf] = unpermute_qk(w, heads)
        if progress is not None:
            progress(done, len(f.tensors))
    language = LanguageModel(text_cfg, weights, backend)
    if mm is None:
        vlm = VLM(ModelConfig(text=text_cfg, raw=dict(f.metadata)), tokenizer, language, path=path)
    else:
        vision_cfg, projector_cfg, vision, projector = mm
        model_cfg = ModelConfig(text=text_cfg, vision=vision_cfg, projector=projector_cfg, raw=dict(f.metadata))
        vlm = VLM(model_cfg, tokenizer, language, vision, projector, path=path)
    template = f.metadata.get("tokenizer.chat_template")
    vlm.template = detect(None if template is None else text(template, f"{path}: tokenizer.chat_template",
                                                             TokenizerError))
    kinds = {t.type_name for t in f.tensors.values() if len(t.shape) == 2}
    vlm.quant = quant or "/".join(sorted(k for k in kinds if k not in FLOAT_TYPES)) or None
    return vlm


def _read_mmproj(path: Path, hidden_size: int, backend: Backend) -> tuple:
    """(vision config, projector config, tower, projector) of an mmproj file, for an LLM of width `hidden_size`."""
    f = read_gguf(path)
    meta = f.metadata
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder", False):
        raise WeightsError(f"{path}: not an mmproj file (expected general.architecture 'clip' with a vision "
                           f"encoder; found {short(meta.get('general.architecture'))})")
    vision_cfg, projector_cfg = vision_configs_from_mmproj(meta, hidden_size, path)
    stored_layers = meta["clip.vision.block_count"]  # checked by vision_configs_from_mmproj
    check_layer_count(f.tensors, r"v\.blk\.([^.]+)\.", stored_layers, "clip.vision.block_count", str(path))
    needed = vision_needed_names(vision_cfg)
    vision_w: dict[str, np.ndarray] = {}
    projector_w: dict[str, np.ndarray] = {}
    unknown = []
    for name, tensor in f.tensors.items():
        ours = mmproj_name(name)
        if ours is None:
            unknown.append(name)
        elif ours.startswith("vision_model."):
            if ours in needed:  # post_ln and layers past the selected one never run
                vision_w[ours] = to_float32(tensor)
        else:
            projector_w[ours] = unsqueeze(ours, to_float32(tensor))
    if unknown:
        raise WeightsError(f"{path}: tensors the mmproj name table does not know: {listing(unknown, 10)}")
    try:
        vision = VisionTower(vision_cfg, vision_w, backend)
        projector = build_projector(projector_cfg, projector_w, backend)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err} (names after mapping the mmproj names; D = {hidden_size} is the "
                           "LLM's hidden size)") from None
    return vision_cfg, projector_cfg, vision, projector
