"""Load a LLaMA from a llama.cpp GGUF file: config, tokenizer and chat template from its metadata, weights by name.

Q4_0 / Q4_1 / Q8_0 matrices feed the quantized kernels as they are (their blocks are only re-laid-out, once);
K-quants (Q4_K, Q5_K, Q6_K) are dequantized and requantized to Q8_0, which keeps their accuracy (measured in
tinyvlm/weights/gguf_quants.py); F32 / F16 / BF16 become float32. The q and k rows that llama.cpp's converter
permuted are put back in Hugging Face order (a row permutation, so quantized blocks move whole). A tied model
(no output.weight) uses the embedding table as its head, kept quantized for the matvec and float for lookups.

With `mmproj`, llama.cpp's MobileVLM image encoder file (tinyvlm.mmproj) adds the CLIP tower and the LDP / LDPv2
projector. MobileVLM LLM files carry no chat template, so they keep MobileVLM's v1 template.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinyvlm.chat_template import detect
from tinyvlm.config import ModelConfig
from tinyvlm.errors import WeightsError
from tinyvlm.kernels.quant import GROUP, QuantizedMatrix, quantize
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.mmproj import read_mmproj
from tinyvlm.quantize import check_quant
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vlm import VLM
from tinyvlm.weights.gguf import GGUFTensor, read_gguf, to_float32, to_quantized
from tinyvlm.weights.names import hf_name, text_config_from_gguf, unpermute_qk

GGUF_MAGIC = b"GGUF"
DIRECT_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
FLOAT_TYPES = ("F32", "F16", "BF16")


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _rows_permuted(qm: QuantizedMatrix, order: np.ndarray) -> QuantizedMatrix:
    """qm with its rows taken in `order` (blocks run along the rows, so they move whole)."""
    return QuantizedMatrix(qm.kind, qm.shape, qm.qs[order], qm.d[order], None if qm.m is None else qm.m[order])


def _matrix(tensor: GGUFTensor, quant: str | None) -> np.ndarray | QuantizedMatrix:
    """A 2-D weight for the kernels: GGUF quant blocks kept (K-quants -> Q8_0), floats as float32."""
    if tensor.type_name in DIRECT_KINDS:
        return to_quantized(tensor)
    w = to_float32(tensor)
    if tensor.type_name not in FLOAT_TYPES and w.shape[1] % GROUP == 0:
        return quantize(w, "q8_0")  # a K-quant
    if quant is not None and w.shape[1] % GROUP == 0:
        return quantize(w, "q4_0" if quant == "int4" else "q8_0")
    return w


def load_gguf(path: str | Path, *, quant: str | None = None,
              progress: Callable[[int, int], None] | None = None, mmproj: str | Path | None = None) -> VLM:
    """A VLM from an LLM GGUF file (llama architecture): text-only, or with the image side of an mmproj file."""
    check_quant(quant)
    path = Path(path)
    f = read_gguf(path)
    cfg = text_config_from_gguf(f.metadata, f.tensors)
    tokenizer = Tokenizer.from_gguf(f.metadata)
    expected = language_expected_shapes(cfg)
    mm = None if mmproj is None else read_mmproj(mmproj, cfg.hidden_size)  # before the LLM: fails fast
    weights: dict[str, np.ndarray | QuantizedMatrix] = {}
    unknown = []
    for done, (name, tensor) in enumerate(f.tensors.items(), 1):
        hf = hf_name(name)
        if hf is None:
            unknown.append(name)
            continue
        if hf == "model.embed_tokens.weight":
            weights[hf] = to_float32(tensor)  # (V, D): rows are looked up, never multiplied
            if cfg.tie_word_embeddings:
                weights["lm_head.weight"] = _matrix(tensor, quant)
        elif len(tensor.shape) == 2:
            weights[hf] = _matrix(tensor, quant)
        else:
            weights[hf] = to_float32(tensor)
        if hf.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads
            w = weights[hf]
            if isinstance(w, QuantizedMatrix):
                order = unpermute_qk(np.arange(w.shape[0])[:, None], heads)[:, 0]
                weights[hf] = _rows_permuted(w, order)
            else:
                weights[hf] = unpermute_qk(w, heads)
        if progress is not None:
            progress(done, len(f.tensors))
    if unknown:
        raise WeightsError(f"{path}: tensors the llama name table does not know: {', '.join(unknown[:10])}"
                           + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    problems = [f"{n} {tuple(weights[n].shape)} (expected {s})" for n, s in expected.items()
                if n in weights and tuple(weights[n].shape) != s]
    missing = [n for n in expected if n not in weights]
    if problems or missing:
        raise WeightsError(f"{path}: the tensors do not match the config; missing: {', '.join(missing) or 'none'}; "
                           f"wrong shape: {', '.join(problems) or 'none'}")
    language = LanguageModel(cfg, weights)
    if mm is None:
        vlm = VLM(ModelConfig(text=cfg, raw=dict(f.metadata)), tokenizer, language, path=path)
    else:
        model_cfg = ModelConfig(text=cfg, vision=mm.vision_config, projector=mm.projector_config,
                                raw=dict(f.metadata))
        vlm = VLM(model_cfg, tokenizer, language, mm.vision, mm.projector, mm.vision_config, path=path)
    vlm.template = detect(f.metadata.get("tokenizer.chat_template"))
    kinds = {t.type_name for t in f.tensors.values() if len(t.shape) == 2}
    vlm.quant = quant or "/".join(sorted(k for k in kinds if k not in FLOAT_TYPES)) or None
    return vlm
