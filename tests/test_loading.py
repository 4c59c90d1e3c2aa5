"""tinyvlm.loading: what load() reads and counts, the backend it builds, and one quantization policy for every path.

(Every stage of a loaded model against transformers: tests/test_vlm.py; llama.cpp's GGUF pair:
tests/test_loading_gguf.py; the Hugging Face cache: tests/test_loading_hub.py.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tinyvlm
from tests.test_loading_gguf import write_llm
from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels.quant import QuantizedMatrix
from tinyvlm.quantize import BLOCK_KINDS, block_kind


@pytest.mark.parametrize("name", ["v1", "v2", "v2-safetensors", "text"])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_progress_counts_each_tensor_read_once(checkpoints: dict, name: str, quant: str | None) -> None:
    """The total and the ticks come from one list of what is read: the bar ends exactly at total/total."""
    calls: list[tuple[int, int]] = []
    tinyvlm.load(checkpoints[name].path, quant=quant, progress=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1
    total = totals.pop()
    assert [done for done, _ in calls] == list(range(1, total + 1))
    cfg = tinyvlm.load(checkpoints[name].path).config
    llm = 2 + 9 * cfg.text.num_hidden_layers + (0 if cfg.text.tie_word_embeddings else 1)
    vision = 0 if cfg.vision is None else 5 + 16 * cfg.vision.layers_to_run
    projector = {None: 0, "ldpnetv2": 6, "ldpnet": 24}[cfg.projector.projector_type if cfg.projector else None]
    assert total == llm + vision + projector


def test_the_model_holds_the_backend_it_was_loaded_with(checkpoints: dict, backend_name: str) -> None:
    vlm = tinyvlm.load(checkpoints["v2"].path)
    assert vlm.backend.name == backend_name  # TINYVLM_BACKEND, set per module by conftest
    assert vlm.backend is vlm.language.bk is vlm.vision.bk is vlm.projector.bk
    other = tinyvlm.load(checkpoints["v2"].path, backend="numpy", threads=1)
    assert other.backend.name == "numpy" and other.backend.threads == 1 and other.backend is not vlm.backend
    with pytest.raises(TinyVLMError, match="unknown backend 'gpu'"):
        tinyvlm.load(checkpoints["v2"].path, backend="gpu")


def test_block_kinds_are_one_table() -> None:
    assert block_kind("int4", "lm_head.weight") == "q8_0"  # llama.cpp keeps the output matrix at higher precision
    assert block_kind("int4", "model.layers.3.mlp.down_proj.weight") == "q4_0"
    assert {kinds["lm_head"] for kinds in BLOCK_KINDS.values()} == {"q8_0"}


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_a_float_gguf_quantizes_as_a_checkpoint_does(checkpoints: dict, shared_data: Path, tmp_path: Path,
                                                      quant: str) -> None:
    """The same request gives the same model: an F32 GGUF of the checkpoint's LLM, quantized at load, has the
    checkpoint's block kinds (lm_head Q8_0 under int4 on both paths) and its logits."""
    ref = checkpoints["text"]
    gguf_path = write_llm(tmp_path / "llm.gguf", ref.llama, shared_data / "llama-spm-vocab" /
                          "ggml-vocab-llama-spm.gguf", False)
    from_dir, from_gguf = tinyvlm.load(ref.path, quant=quant), tinyvlm.load(gguf_path, quant=quant)
    for vlm in (from_dir, from_gguf):
        head = vlm.language.lm_head
        assert isinstance(head, QuantizedMatrix) and head.kind == BLOCK_KINDS[quant]["lm_head"]
        mats = [w for layer in vlm.language.layers for w in (*layer.qkv, layer.o_proj, layer.down_proj)]
        assert {w.kind for w in mats} == {BLOCK_KINDS[quant]["layers"]}
    ids = from_dir.prompt_ids("Hello there")
    np.testing.assert_allclose(from_gguf.logits(ids), from_dir.logits(ids), rtol=0, atol=1e-4)


def test_mmproj_needs_a_gguf_llm(checkpoints: dict) -> None:
    with pytest.raises(TinyVLMError, match="not an LLM GGUF file; mmproj=x.gguf goes only with one"):
        tinyvlm.load(checkpoints["v2"].path, mmproj="x.gguf")
