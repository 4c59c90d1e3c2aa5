"""GGUF K-quant files end to end, without torch: a tiny LLaMA whose matrices are Q4_K (and, as in a Q4_K_M file,
Q6_K for the output, attn_v and ffn_down of the last layer), loaded by tinyvlm.load, against its float twin: the same
model written as F32 from the gguf package's own dequantizer (gguf.quants.dequantize, a reference nobody here wrote).

The blocks are random bytes with finite float16 scales, sized so that the weights have std about 1/sqrt(in).
Q4_K becomes the q4_1 matrix it equals and Q6_K our q6_k (both bit-exact: tests/test_weights_gguf.py), so with
float32 activations the only difference from the twin is the order of float32 sums.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.gguf_header import add_llama_header, add_tiny_vocab

V, D, F, LAYERS, HEADS, KV_HEADS, CONTEXT = 97, 256, 512, 2, 4, 2, 64  # K-quant rows: multiples of 256
PROMPT = [1, 17, 42, 5, 88, 23, 61, 9, 70, 33, 3, 54, 20, 11, 7, 90, 2, 64]  # 18 tokens: past the int8 path
MATRICES = {"attn_q": (D, D), "attn_k": (KV_HEADS * D // HEADS, D), "attn_v": (KV_HEADS * D // HEADS, D),
            "attn_output": (D, D), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
# max |logits - twin's| / max |twin's|, float32 activations. Measured over both files and backends: at most 3.6e-6
# (18-token prefill) and 1.5e-6 (one decode step); 0 where the prefill's dequantized tiles meet the same BLAS calls.
RTOL = 1e-5
# int8 activations (one token, and inputs of up to 16): the bound tests/test_int8_activations.py states. Measured:
# 0.035 (all Q4_K), 0.021 (with Q6_K).
RTOL_INT8 = 0.06


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols/256 * block bytes) uint8 of random Q4_K or Q6_K blocks, weights of std ~1/sqrt(cols)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_values
    blocks = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    std = 1.0 / np.sqrt(cols)

    def f16(scale: float) -> np.ndarray:
        return (rng.standard_normal((n, 1)) * scale).astype(np.float16).view(np.uint8)

    if kind == "Q4_K":  # w = d sc q - dmin mn: sc, mn ~ 32, q ~ 7.5 +- 4.6
        blocks[:, 0:2], blocks[:, 2:4] = f16(std / (32 * 4.6)), f16(std / 32 * 7.5)
    else:  # Q6_K, d last: w = d sc (q - 32): sc ~ +-74, q - 32 ~ +-18.5
        blocks[:, 208:210] = f16(std / (74 * 18.5))
    return blocks.reshape(rows, -1)


def write_pair(directory: Path, q4_k_m: bool) -> tuple[Path, Path]:
    """The K-quant GGUF and its F32 twin (same metadata, every quantized tensor dequantized by gguf)."""
    import gguf

    rng = np.random.default_rng(7)
    tensors: dict[str, tuple[np.ndarray, str]] = {"token_embd.weight": (random_blocks("Q4_K", V, D, rng), "Q4_K")}
    for i in range(LAYERS):
        for name in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{name}.weight"] = ((1 + 0.2 * rng.standard_normal(D)).astype(np.float32), "F32")
        for name, (rows, cols) in MATRICES.items():
            kind = "Q6_K" if q4_k_m and i == LAYERS - 1 and name in ("attn_v", "ffn_down") else "Q4_K"
            tensors[f"blk.{i}.{name}.weight"] = (random_blocks(kind, rows, cols, rng), kind)
    tensors["output_norm.weight"] = ((1 + 0.2 * rng.standard_normal(D)).astype(np.float32), "F32")
    tensors["output.weight"] = (random_blocks("Q6_K" if q4_k_m else "Q4_K", V, D, rng), "Q6_K" if q4_k_m else "Q4_K")
    paths = []
    for twin in (False, True):
        path = directory / f"{'q4_k_m' if q4_k_m else 'q4_k'}{'-f32' if twin else ''}.gguf"
        w = gguf.GGUFWriter(path, arch="llama")
        add_llama_header(w, "k-quant-tiny-llama", context=CONTEXT, width=D, layers=LAYERS, ffn=F, heads=HEADS,
                         kv_heads=KV_HEADS, eps=1e-5)
        add_tiny_vocab(w, V)
        for name, (data, kind) in tensors.items():
            if kind == "F32":
                w.add_tensor(name, data)
            elif twin:
                w.add_tensor(name, gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).astype(np.float32))
            else:
                w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(path)
    return paths[0], paths[1]


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=[False, True], ids=["q4_k", "q4_k_m"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bool]:
    return (*write_pair(tmp_path_factory.mktemp("kquant"), request.param), request.param)


def test_k_quant_file_matches_its_float_twin(pair: tuple[Path, Path, bool], backend_name: str) -> None:
    import tinyvlm
    path, twin_path, q4_k_m = pair
    vlm = tinyvlm.load(path, backend=backend_name, decode_activations="float32")
    assert vlm.quant == ("Q4_K/Q6_K" if q4_k_m else "Q4_K")
    twin = tinyvlm.load(twin_path, backend=backend_name)
    ours, ref = vlm.logits(PROMPT), twin.logits(PROMPT)  # (T, V): 18 tokens, the prefill path
    assert rel_diff(ours, ref) <= RTOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    lm = vlm.language
    cache = lm.new_cache(max_len=CONTEXT)
    lm.forward(lm.embed(PROMPT[:-1]), cache)
    step = lm.forward(lm.embed(PROMPT[-1:]), cache)  # (V,): one token, the decode matvecs
    assert rel_diff(step, ref[-1]) <= RTOL


def test_k_quant_file_on_int8_activations(pair: tuple[Path, Path, bool], backend_name: str) -> None:
    import tinyvlm

    path, twin_path, _ = pair
    vlm = tinyvlm.load(path, backend=backend_name, decode_activations="int8")
    ref = tinyvlm.load(twin_path, backend=backend_name).logits(PROMPT[:12])[-1]  # (V,)
    assert rel_diff(vlm.logits(PROMPT[:12])[-1], ref) <= RTOL_INT8  # 12 tokens: the int8 path
