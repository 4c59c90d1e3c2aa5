"""int4 / int8 models: against the float32 model, against float32 on the dequantized weights, and the file format.

Measured on the tiny random checkpoints (tests/checkpoints.py, weights normal(0, 0.1), vocab 32000):
int8 logits are within 5% of the float32 logits' largest magnitude (measured 0.03) and the top-1 token agrees
at >= 90% of positions, but even int8 noise exceeds the 0.2 median gap between the top two of 32000 random
logits at some positions, so greedy continuations can part early; int4 (Q4_0 blocks, ~9% relative error per matrix on Gaussian weights) moves logits by about 30-50%
of their largest magnitude, so int4 greedy ids on random weights are not expected to follow float32 (see the closing note of the milestone). What
pins the int4 path exactly is the float32 model run on dequantize(quantize(W)): same logits to 1e-4, same
greedy ids for 16 steps.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tinyvlm
from tinyvlm.errors import TinyVLMError, WeightsError
from tinyvlm.config import GenerationConfig
from tinyvlm.generate import generate_tokens
from tinyvlm.kernels.quant import QuantizedMatrix, dequantize
from tinyvlm.backends import make
from tinyvlm.language import LanguageModel

QUESTION = "What is in the image?"
IMAGE = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy(vlm, n: int = 16) -> list[int]:
    ids = vlm.prompt_ids(QUESTION)
    images = [vlm.encode_image(IMAGE)] if vlm.vision is not None else []
    return list(generate_tokens(vlm.language, vlm.embed(ids, images), vlm.language.new_cache(),
                                GenerationConfig(max_new_tokens=n), stop_ids={2}, history=[]))


@pytest.fixture(scope="module")
def quantized(checkpoints, backend_name):
    """Quantized at load, decoding on float32 activations: the function of the dequantized weights, which these
    tests compare against (int8 activations add their own rounding: tests/test_int8_activations.py)."""
    return {(name, q): tinyvlm.load(ref.path, quant=q, decode_activations="float32")
            for name, ref in checkpoints.items() for q in ("int4", "int8")}


@pytest.mark.parametrize("name", ["v1", "v2", "v2-safetensors", "text"])
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_path_equals_float32_on_dequantized_weights(name, quant, checkpoints, quantized):
    vlm = quantized[(name, quant)]
    lang = vlm.language
    cfg = lang.cfg
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    weights = {"model.embed_tokens.weight": lang.embed_tokens, "model.norm.weight": lang.norm,
               "lm_head.weight": dequantize(lang.lm_head)}
    for i, layer in enumerate(lang.layers):
        # the numba backend stacks matrices quantized alike (one kernel call reads x once); numpy keeps them apart
        assert (len(layer.qkv), len(layer.gate_up)) == ((1, 1) if lang.bk.name == "numba" else (3, 2))
        qkv = np.concatenate([dequantize(w) for w in layer.qkv])
        gate_up = np.concatenate([dequantize(w) for w in layer.gate_up])
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": layer.input_layernorm,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm,
            p + "self_attn.q_proj.weight": qkv[:q_rows],
            p + "self_attn.k_proj.weight": qkv[q_rows:q_rows + kv_rows],
            p + "self_attn.v_proj.weight": qkv[q_rows + kv_rows:],
            p + "self_attn.o_proj.weight": dequantize(layer.o_proj),
            p + "mlp.gate_proj.weight": gate_up[:cfg.intermediate_size],
            p + "mlp.up_proj.weight": gate_up[cfg.intermediate_size:],
            p + "mlp.down_proj.weight": dequantize(layer.down_proj),
        })
    assert isinstance(lang.layers[0].o_proj, QuantizedMatrix) and isinstance(lang.lm_head, QuantizedMatrix)
    reference = LanguageModel(lang.cfg, weights, make(lang.bk.name))  # one backend object per model
    ids = vlm.prompt_ids(QUESTION)
    images = [vlm.encode_image(IMAGE)] if vlm.vision is not None else []
    embeds = vlm.embed(ids, images)
    ours = lang.forward(embeds, lang.new_cache(), all_logits=True)
    ref = reference.forward(embeds, reference.new_cache(), all_logits=True)
    assert rel_err(ours, ref) <= 1e-4
    cfg = GenerationConfig(max_new_tokens=16)
    a = list(generate_tokens(lang, embeds, lang.new_cache(), cfg, stop_ids={2}, history=[]))
    b = list(generate_tokens(reference, embeds, reference.new_cache(), cfg, stop_ids={2}, history=[]))
    assert a == b and len(a) == 16


def float_and_quantized_logits(f, q):
    """Logits of the float and the quantized model for the test question (with the image when f has a tower)."""
    ids = f.prompt_ids(QUESTION)
    image = IMAGE if f.vision is not None else None
    return f.logits(ids, image), q.logits(ids, image)


@pytest.mark.parametrize("name", ["v1", "v2", "v2-safetensors", "text"])
def test_int8_close_to_float32(name, loaded_float, quantized):
    lf, lq = float_and_quantized_logits(loaded_float[name], quantized[(name, "int8")])
    assert rel_err(lq, lf) <= 0.05  # measured 0.02-0.03
    assert (lq.argmax(-1) == lf.argmax(-1)).mean() >= 0.9  # top-1 at every position; measured 0.95-0.97


@pytest.mark.parametrize("name", ["v1", "v2", "v2-safetensors", "text"])
def test_int4_logits_bound(name, loaded_float, quantized):
    q = quantized[(name, "int4")]
    lf, lq = float_and_quantized_logits(loaded_float[name], q)
    assert rel_err(lq, lf) <= 0.6  # measured 0.30-0.50 on these random checkpoints
    corr = np.corrcoef(lq.ravel(), lf.ravel())[0, 1]
    assert corr >= 0.9  # measured 0.93-0.98
    report = q.quant_report
    assert report.quant == "int4" and 0.0 < report.rel_error < 0.1
    assert "relative error" in str(report)


@pytest.fixture(scope="module")
def loaded_float(checkpoints, backend_name):
    return {name: tinyvlm.load(ref.path) for name, ref in checkpoints.items()}


def test_unknown_quant():
    with pytest.raises(TinyVLMError, match="int3"):
        tinyvlm.load("anything", quant="int3")


# ---------------------------------------------------------------- the quantized file


@pytest.fixture(scope="module")
def saved(checkpoints, tmp_path_factory):
    from tinyvlm.loading.hf import quantize_dir

    out = tmp_path_factory.mktemp("quantized") / "v2-int4"
    quantize_dir(checkpoints["v2"].path, out, "int4")
    return out


def test_file_round_trip_by_memory_map(saved, quantized):
    vlm = tinyvlm.load(saved, decode_activations="float32")  # as `quantized`
    assert vlm.quant == "int4"
    # Read through the memory map; the numba backend then packs it into one huge-page buffer (packing.pack_together)
    lm = vlm.language
    mats = [m for layer in lm.layers for m in (*layer.qkv, layer.o_proj, *layer.gate_up, layer.down_proj)]
    assert all(isinstance(m, QuantizedMatrix) for m in mats) and isinstance(lm.lm_head, QuantizedMatrix)
    if lm.bk.name == "numba":
        bases = {id(a.base) for m in [*mats, lm.lm_head] for a in (m.qs, m.d)}
        assert len(bases) == 1  # every array a view of the one buffer
        assert all(a.ctypes.data % 64 == 0 for m in mats for a in (m.qs, m.d))
    ref = quantized[("v2", "int4")]
    ids = ref.prompt_ids(QUESTION)
    assert rel_err(vlm.logits(ids, IMAGE), ref.logits(ids, IMAGE)) <= 1e-4
    assert greedy(vlm) == greedy(ref)
    meta = _metadata(saved / "model.safetensors")
    assert meta["format"] == "tinyvlm-quantized" and meta["quant"] == "int4" and meta["group_size"] == "32"
    assert json.loads(meta["kinds"])["model.layers.0.self_attn.q_proj.weight"] == "q4_0"


def _metadata(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8: 8 + n])["__metadata__"]


def _rewrite_header(path, change):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("change, message", [
    (lambda h: h["__metadata__"].update(version="9"), "version"),
    (lambda h: h["__metadata__"].update(group_size="64"), "group size"),
    (lambda h: h["__metadata__"].update(kinds=json.dumps({"model.layers.0.self_attn.q_proj.weight": "q8_0"})),
     "q_proj"),
    (lambda h: h["__metadata__"].update(kinds="not json"), "kinds"),
])
def test_mislabelled_file_refused(saved, tmp_path, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    _rewrite_header(bad / "model.safetensors", change)
    with pytest.raises(WeightsError, match=message):
        tinyvlm.load(bad)


def test_corrupted_file_refused(saved, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(saved, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="model.safetensors"):
        tinyvlm.load(bad)


def test_loading_a_quantized_file_as_another_quant_is_refused(saved):
    with pytest.raises(TinyVLMError, match="already quantized as int4"):
        tinyvlm.load(saved, quant="int8")
