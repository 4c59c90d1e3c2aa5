"""llama.cpp's MobileVLM pair (an LLM GGUF plus an mmproj GGUF) against the original checkpoint it was made from.

The pair is written from the tiny random checkpoints (tests/checkpoints.py) with the `gguf` package, the way
llama.cpp converts MobileVLM: the LLM as convert_hf_to_gguf.py writes a llama (names from gguf-py's own
TensorNameMap, q/k rows permuted, the LLaMA SentencePiece vocabulary of ../shared/data); the image side as
llava_surgery.py + convert_image_encoder_to_gguf.py write it (the converter's chain of string renames, the last
ViT layer and post_layernorm dropped, block_count = the layers kept, projector tensors squeezed).

Tolerances. All-F32 pair: vision features, projector output and logits equal to the checkpoint loaded by
tinyvlm.load(directory) within 1e-6 of the largest magnitude (measured: 0, the same numbers through the same code),
and within 1e-4 of the torch reference, as in test_vlm.py; greedy tokens identical for 16 steps. F16 pair (as
the converter's default writes it, with the LLM's matrices in F16): storage rounding only, projector output and
logits within 5e-3 of the largest magnitude of the torch reference (measured 4.5e-4 for V1, whose fp32 CLIP and
LLM round to f16; V2's bf16 weights are exact in f16).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import pytest
from PIL import Image

import tinyvlm
from tests.checkpoints import TEXT, VISION
from tests.gguf_header import add_llama_header
from tinyvlm.errors import ConfigError, TinyVLMError, WeightsError
from tinyvlm.config import GenerationConfig
from tinyvlm.generate import generate_tokens
from tinyvlm.weights.names import permute_qk

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the image?"
EXACT, REL_TORCH, REL_F16 = 1e-6, 1e-4, 5e-3
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llm(path: Path, llama: torch.nn.Module, vocab_file: Path, f16: bool) -> Path:
    """The LLM as convert_hf_to_gguf.py writes a llama; 2-D matrices in F16 when f16, everything else F32."""
    cfg = TEXT  # the config.json values of the checkpoint
    w = gguf.GGUFWriter(path, arch="llama")
    add_llama_header(w, "MobileVLM-tiny", context=cfg["max_position_embeddings"], width=cfg["hidden_size"],
                     layers=cfg["num_hidden_layers"], ffn=cfg["intermediate_size"], heads=cfg["num_attention_heads"],
                     kv_heads=cfg["num_key_value_heads"], eps=cfg["rms_norm_eps"], rope_base=cfg["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    vocab = gguf.GGUFReader(vocab_file)
    for name, field in vocab.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for hf, t in llama.state_dict().items():
        data = t.numpy().astype(np.float32)
        if hf.endswith("q_proj.weight"):
            data = permute_qk(data, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            data = permute_qk(data, cfg["num_key_value_heads"])
        if f16 and data.ndim == 2:
            data = data.astype(np.float16)
        w.add_tensor(names.get_name(hf, try_suffixes=(".weight", ".bias")), data)
    _finish(w)
    return path


def converter_name(name: str) -> str:
    """convert_image_encoder_to_gguf.py's renaming of a CLIP or (after llava_surgery) projector tensor."""
    if "mm_projector" in name:
        name = name.replace("model.mm_projector", "mm")
        name = re.sub(r"mm\.mlp\.mlp", "mm.model.mlp", name, count=1)
        return re.sub(r"mm\.peg\.peg", "mm.model.peg", name, count=1)
    for old, new in [("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""),
                     ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"), ("mlp.fc1", "ffn_down"),
                     ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"), ("layrnorm", "ln")]:
        name = name.replace(old, new)
    return name


def write_mmproj(path: Path, clip: torch.nn.Module, projector: torch.nn.Module, kind: str, f16: bool,
                 projector_type: str | None = None) -> Path:
    """The image encoder file of a LLaVA-style conversion: f16 as the converter's default, else all F32."""
    v = VISION  # the CLIP config.json values
    w = gguf.GGUFWriter(path, arch="clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(1 if f16 else 0)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", projector_type or {"ldpnet": "ldp", "ldpnetv2": "ldpv2"}[kind])
    w.add_uint32("clip.vision.image_size", v["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", v["projection_dim"])
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v["layer_norm_eps"])
    w.add_uint32("clip.vision.block_count", v["num_hidden_layers"] - 1)  # the last layer is dropped
    w.add_array("clip.vision.image_mean", CLIP_MEAN)
    w.add_array("clip.vision.image_std", CLIP_STD)
    w.add_bool("clip.use_gelu", False)
    for name, t in projector.state_dict().items():
        data = t.numpy()
        big = data.ndim in (2, 4)
        data = data.squeeze().astype(np.float16 if f16 and big else np.float32)
        w.add_tensor(converter_name("model.mm_projector." + name), data)
    last = f"encoder.layers.{v['num_hidden_layers'] - 1}."
    for name, t in clip.state_dict().items():
        name = name if name.startswith("vision_model.") else "vision_model." + name  # transformers 5 drops it
        if last in name or "post_layernorm" in name or name.endswith("position_ids"):
            continue
        data = t.numpy().squeeze()
        half = f16 and (data.ndim == 4 or (data.ndim == 2 and name.endswith(".weight")))  # conv: always f16 in
        # the converter; the F32 pair keeps it F32 for an exact comparison
        w.add_tensor(converter_name(name), data.astype(np.float16 if half else np.float32))
    _finish(w)
    return path


@pytest.fixture(scope="module")
def pairs(checkpoints, shared_data, tmp_path_factory) -> dict:
    """(LLM gguf, mmproj gguf) per (checkpoint, "f32" / "f16")."""
    root = tmp_path_factory.mktemp("mmproj")
    vocab = shared_data / "llama-spm-vocab" / "ggml-vocab-llama-spm.gguf"
    out = {}
    for name in ("v1", "v2"):
        ref = checkpoints[name]
        for dtype in ("f32", "f16"):
            f16 = dtype == "f16"
            out[name, dtype] = (write_llm(root / f"{name}-{dtype}-llm.gguf", ref.llama, vocab, f16),
                                write_mmproj(root / f"{name}-{dtype}-mmproj.gguf", ref.clip, ref.projector,
                                             ref.kind, f16))
    return out


@pytest.fixture(scope="module")
def photo(shared_data):
    return Image.open(shared_data / "images" / "test-1.jpeg")


@pytest.fixture(scope="module")
def original(checkpoints, backend_name) -> dict:
    return {name: tinyvlm.load(checkpoints[name].path) for name in ("v1", "v2")}


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_f32_pair_equals_the_checkpoint(name, checkpoints, pairs, original, photo):
    ref, direct = checkpoints[name], original[name]
    llm, mmproj = pairs[name, "f32"]
    vlm = tinyvlm.load(llm, mmproj=mmproj)
    assert vlm.config.projector.projector_type == ref.kind
    assert len(vlm.vision.layers) == 2  # block_count 2 in the file: both stored layers run = hidden_states[-2]

    pixels = ref.pixels(photo)
    assert np.abs(vlm.preprocess(photo) - pixels).max() <= 1e-5
    feats = vlm.vision_features(pixels)
    assert rel_err(feats, direct.vision_features(pixels)) <= EXACT
    assert rel_err(feats, ref.features(pixels)) <= REL_TORCH
    tokens = vlm.encode_image(pixels)
    tokens_ref = ref.image_tokens(pixels)
    assert rel_err(tokens, direct.encode_image(pixels)) <= EXACT
    assert rel_err(tokens, tokens_ref) <= REL_TORCH

    ids = vlm.prompt_ids(QUESTION)
    assert ids == direct.prompt_ids(QUESTION)  # v1 template (the file has no chat template), same tokenizer
    logits = vlm.logits(ids, image=pixels)
    assert rel_err(logits, direct.logits(ids, image=pixels)) <= EXACT
    assert rel_err(logits, ref.logits(ids, tokens_ref)) <= REL_TORCH

    greedy_ref = ref.greedy(ids, tokens_ref, 16)
    embeds = vlm.embed(ids, [tokens])
    ours = list(generate_tokens(vlm.language, embeds, vlm.language.new_cache(), GenerationConfig(max_new_tokens=16),
                                stop_ids={2}, history=[t for t in ids if t >= 0]))
    assert len(greedy_ref) >= 8 and ours == greedy_ref


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_f16_pair_is_close(name, checkpoints, pairs, photo):
    ref = checkpoints[name]
    vlm = tinyvlm.load(pairs[name, "f16"][0], mmproj=pairs[name, "f16"][1])
    pixels = ref.pixels(photo)
    tokens_ref = ref.image_tokens(pixels)
    assert rel_err(vlm.encode_image(pixels), tokens_ref) <= REL_F16
    ids = vlm.prompt_ids(QUESTION)
    assert rel_err(vlm.logits(ids, image=pixels), ref.logits(ids, tokens_ref)) <= REL_F16


def test_cli_chat_with_mmproj(checkpoints, pairs, original, shared_data):
    llm, mmproj = pairs["v2", "f32"]
    image = shared_data / "images" / "test-1.jpeg"
    expected = original["v2"].generate(QUESTION, image=image, max_new_tokens=8)
    proc = subprocess.run([sys.executable, "-m", "tinyvlm", "chat", str(image), "--model", str(llm),
                           "--mmproj", str(mmproj), "-p", QUESTION, "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert expected.strip()


def test_cli_missing_mmproj_is_one_line(pairs, shared_data, tmp_path):
    missing = tmp_path / "nope.gguf"
    proc = subprocess.run([sys.executable, "-m", "tinyvlm", "chat", str(shared_data / "images" / "test-1.jpeg"),
                           "--model", str(pairs["v2", "f32"][0]), "--mmproj", str(missing), "-p", "hi"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and str(missing) in errors[0] and "not found" in errors[0]


def test_errors(checkpoints, pairs, tmp_path):
    llm, mmproj = pairs["v2", "f32"]
    with pytest.raises(WeightsError, match="nope.gguf: not found"):
        tinyvlm.load(llm, mmproj=tmp_path / "nope.gguf")

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(mmproj.read_bytes()[:2000])
    with pytest.raises(WeightsError, match="broken.gguf"):
        tinyvlm.load(llm, mmproj=broken)

    with pytest.raises(WeightsError, match="not an mmproj file"):
        tinyvlm.load(llm, mmproj=llm)

    ref = checkpoints["v2"]
    mlp = write_mmproj(tmp_path / "mlp.gguf", ref.clip, ref.projector, ref.kind, False, projector_type="mlp")
    with pytest.raises(ConfigError, match=r"clip.projector_type is 'mlp'; expected one of 'ldp', 'ldpv2'"):
        tinyvlm.load(llm, mmproj=mlp)

    with pytest.raises(TinyVLMError, match="not an LLM GGUF file"):
        tinyvlm.load(ref.path, mmproj=mmproj)

    # projector_type "ldp" over LDPv2 tensors: one error naming what is missing
    mixed = write_mmproj(tmp_path / "mixed.gguf", ref.clip, ref.projector, "ldpnet", False)
    with pytest.raises(WeightsError, match=r"mixed.gguf: ldpnet projector weights: the weights do not match the model; missing \(24\): "
                                           r"model.mb_block"):
        tinyvlm.load(llm, mmproj=mixed)
