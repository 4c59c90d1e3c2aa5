"""Tiny seed models for the fuzz tests, one per format family, each a few hundred KB and quick to load.

Weights are plain random NumPy arrays under the published names (nothing is compared with a reference here: a seed
only has to load and generate). The vocabulary is the first 320 pieces of ../shared/data's LLaMA tokenizer.model
(<unk>, <s>, </s>, the 256 byte pieces and the first merges), cut with tests/fuzz/formats.py's protobuf codec
(sentencepiece's *_pb2 module needs protobuf, which is not a test dependency).

    build_all(root) -> {family: Seed}; Seed.path is what tinyvlm.load takes (and Seed.mmproj for "gguf-mmproj").
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.fuzz.formats import proto_encode, proto_fields, write_safetensors
from tests.gguf_header import add_llama_header

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SPM = SHARED_DATA / "llama-spm-vocab" / "tokenizer.model"
V, D, F, LAYERS, HEADS, KV_HEADS, CONTEXT = 320, 32, 64, 2, 4, 2, 256  # context: the v1 system prompt fits
C, CF, V_LAYERS, IMAGE, PATCH = 32, 64, 2, 56, 14  # the CLIP tower: a 4 x 4 grid -> 2 x 2 image tokens
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FAMILIES = ("bin", "safetensors", "sharded", "v2", "quantized", "gguf", "gguf-mmproj", "tokenizer-json")
TOWER = "model.vision_tower.vision_tower."


@dataclass(frozen=True)
class Seed:
    family: str
    path: Path  # a model directory, or the LLM .gguf
    mmproj: Path | None = None


# ---------------------------------------------------------------- the vocabulary

def small_spm(n_pieces: int = V) -> bytes:
    """../shared/data's LLaMA tokenizer.model cut to its first n_pieces pieces (trainer_spec.vocab_size too)."""
    fields, kept, out = proto_fields(SPM.read_bytes()), 0, []
    for number, wire, value in fields:
        if number == 1:
            kept += 1
            if kept > n_pieces:
                continue
        elif number == 2:  # TrainerSpec: field 4 is vocab_size
            value = proto_encode([(n, w, n_pieces if n == 4 else v) for n, w, v in proto_fields(value)])
        out.append((number, wire, value))
    return proto_encode(out)


def spm_pieces(data: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a ModelProto."""
    pieces = []
    for number, _, value in proto_fields(data):
        if number == 1:
            sub = {n: v for n, _, v in proto_fields(value)}
            pieces.append((sub[1].decode("utf-8"), struct.unpack("<f", sub.get(2, b"\0" * 4))[0], sub.get(3, 1)))
    return pieces


# ---------------------------------------------------------------- tensors

def _rand(rng: np.random.Generator, shape: tuple[int, ...], norm: bool = False) -> np.ndarray:
    if norm:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(shape)).astype(np.float32)


def llama_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Hugging Face LLaMA names -> float32 arrays (GQA: 4 query heads, 2 key-value heads of width 8)."""
    dh = D // HEADS
    t = {"model.embed_tokens.weight": _rand(rng, (V, D))}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _rand(rng, (D,), True)
        t[p + "self_attn.q_proj.weight"] = _rand(rng, (HEADS * dh, D))
        t[p + "self_attn.k_proj.weight"] = _rand(rng, (KV_HEADS * dh, D))
        t[p + "self_attn.v_proj.weight"] = _rand(rng, (KV_HEADS * dh, D))
        t[p + "self_attn.o_proj.weight"] = _rand(rng, (D, HEADS * dh))
        t[p + "post_attention_layernorm.weight"] = _rand(rng, (D,), True)
        t[p + "mlp.gate_proj.weight"] = _rand(rng, (F, D))
        t[p + "mlp.up_proj.weight"] = _rand(rng, (F, D))
        t[p + "mlp.down_proj.weight"] = _rand(rng, (D, F))
    t["model.norm.weight"] = _rand(rng, (D,), True)
    t["lm_head.weight"] = _rand(rng, (V, D))
    return t


def clip_tensors(rng: np.random.Generator, layers: int = V_LAYERS) -> dict[str, np.ndarray]:
    """transformers' CLIPVisionModel names (`vision_model.*`) -> float32 arrays."""
    e = "vision_model.embeddings."
    grid = IMAGE // PATCH
    t = {e + "class_embedding": _rand(rng, (C,)), e + "patch_embedding.weight": _rand(rng, (C, 3, PATCH, PATCH)),
         e + "position_embedding.weight": _rand(rng, (grid * grid + 1, C)),
         "vision_model.pre_layrnorm.weight": _rand(rng, (C,), True), "vision_model.pre_layrnorm.bias": _rand(rng, (C,))}
    for j in range(layers):
        p = f"vision_model.encoder.layers.{j}."
        for norm in ("layer_norm1", "layer_norm2"):
            t[f"{p}{norm}.weight"], t[f"{p}{norm}.bias"] = _rand(rng, (C,), True), _rand(rng, (C,))
        for name, (o, i) in {"self_attn.q_proj": (C, C), "self_attn.k_proj": (C, C), "self_attn.v_proj": (C, C),
                             "self_attn.out_proj": (C, C), "mlp.fc1": (CF, C), "mlp.fc2": (C, CF)}.items():
            t[f"{p}{name}.weight"], t[f"{p}{name}.bias"] = _rand(rng, (o, i)), _rand(rng, (o,))
    t["vision_model.post_layernorm.weight"] = _rand(rng, (C,), True)
    t["vision_model.post_layernorm.bias"] = _rand(rng, (C,))
    return t


def ldpv2_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """LDPv2 projector names after `model.mm_projector.`."""
    return {"mlp.mlp.0.weight": _rand(rng, (D, C)), "mlp.mlp.0.bias": _rand(rng, (D,)),
            "mlp.mlp.2.weight": _rand(rng, (D, D)), "mlp.mlp.2.bias": _rand(rng, (D,)),
            "peg.peg.0.weight": _rand(rng, (D, 1, 3, 3)), "peg.peg.0.bias": _rand(rng, (D,))}


# ---------------------------------------------------------------- directories

def config_json(multimodal: bool) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "vocab_size": V, "max_position_embeddings": CONTEXT,
           "max_sequence_length": CONTEXT, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16", "rope_scaling": None}
    if multimodal:
        cfg.update({"architectures": ["MobileLlamaForCausalLM"], "model_type": "mobilevlm",
                    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "vision_tower_type": "clip",
                    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": C,
                    "mm_projector_type": "ldpnetv2", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
                    "mm_use_im_patch_token": False, "use_mm_proj": True})
    return cfg


def _common_files(out: Path, multimodal: bool = False, tokenizer: str = "model") -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config_json(multimodal), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": CONTEXT}))
    if tokenizer == "model":
        (out / "tokenizer.model").write_bytes(small_spm())
    else:
        (out / "tokenizer.json").write_text(tokenizer_json())


def tokenizer_json() -> str:
    """The cut SentencePiece vocabulary as a `tokenizers` tokenizer.json (byte-fallback BPE, LLaMA-style)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = spm_pieces(small_spm())
    ids = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == 1}
    merges = sorted((-pieces[i][1], i, p[:k], p[k:]) for p, i in ids.items() for k in range(1, len(p))
                    if p[:k] in ids and p[k:] in ids)
    tk = Tokenizer(models.BPE(vocab={p: i for i, (p, _, _) in enumerate(pieces)},
                              merges=[(a, b) for _, _, a, b in merges], unk_token="<unk>", byte_fallback=True,
                              fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in ("<unk>", "<s>", "</s>")])
    return tk.to_str()


def _torch_save(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    import torch

    tdtype = {"F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    state = {k: (torch.from_numpy(v).to(tdtype) if v.dtype.kind == "f" else torch.from_numpy(v))
             for k, v in tensors.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer the loader must ignore
    torch.save(state, path)


def _v2_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = llama_tensors(rng)
    t.update({"model.mm_projector." + k: v for k, v in ldpv2_tensors(rng).items()})
    t.update({TOWER + k: v for k, v in clip_tensors(rng).items()})
    t[TOWER + "vision_model.embeddings.position_ids"] = np.arange((IMAGE // PATCH) ** 2 + 1, dtype=np.int64)[None]
    return t


def build_all(root: Path) -> dict[str, Seed]:
    """Write every seed under root; return {family: Seed}."""
    from tinyvlm.loading.hf import quantize_dir

    root = Path(root)
    rng = np.random.default_rng(0)
    seeds = {}
    d = root / "bin"
    _common_files(d)
    _torch_save(d / "pytorch_model.bin", llama_tensors(rng), "F16")
    seeds["bin"] = Seed("bin", d)
    d = root / "safetensors"
    _common_files(d)
    write_safetensors(d / "model.safetensors", llama_tensors(rng), "BF16", {"format": "pt"})
    seeds["safetensors"] = Seed("safetensors", d)
    d = root / "sharded"
    _common_files(d)
    tensors = llama_tensors(rng)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        write_safetensors(d / shard, {k: tensors[k] for k in keys}, "F32", {"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    seeds["sharded"] = Seed("sharded", d)
    d = root / "v2"
    _common_files(d, multimodal=True)
    _torch_save(d / "pytorch_model.bin", _v2_tensors(rng), "BF16")
    seeds["v2"] = Seed("v2", d)
    quantize_dir(seeds["safetensors"].path, root / "quantized", "int8")
    seeds["quantized"] = Seed("quantized", root / "quantized")
    llm = write_gguf_llm(root / "llm.gguf", rng)
    seeds["gguf"] = Seed("gguf", llm)
    pair = root / "pair"
    pair.mkdir()
    seeds["gguf-mmproj"] = Seed("gguf-mmproj", write_gguf_llm(pair / "llm.gguf", rng),
                                write_mmproj(pair / "mmproj.gguf", rng))
    d = root / "tokenizer-json"
    _common_files(d, tokenizer="json")
    write_safetensors(d / "model.safetensors", llama_tensors(rng), "F16")
    seeds["tokenizer-json"] = Seed("tokenizer-json", d)
    return seeds


# ---------------------------------------------------------------- GGUF

def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf_llm(path: Path, rng: np.random.Generator) -> Path:
    """A llama GGUF: Q8_0 attention / MLP matrices, F16 embedding and head, F32 norms, a SentencePiece vocab."""
    import gguf

    w = gguf.GGUFWriter(path, arch="llama")
    add_llama_header(w, "fuzz-seed", context=CONTEXT, width=D, layers=LAYERS, ffn=F, heads=HEADS, kv_heads=KV_HEADS,
                     eps=1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    pieces = spm_pieces(small_spm())
    w.add_tokenizer_model("llama")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([k for _, _, k in pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for hf, a in llama_tensors(rng).items():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if a.ndim == 2 and "layers" in hf:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a.astype(np.float16) if a.ndim == 2 else a)
    _finish(w)
    return path


def write_mmproj(path: Path, rng: np.random.Generator) -> Path:
    """llama.cpp's mmproj file for the tower and LDPv2 projector (LLaVA-style: the last ViT layer dropped)."""
    import gguf

    w = gguf.GGUFWriter(path, arch="clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(0)
    w.add_string("clip.projector_type", "ldpv2")
    for key, value in (("image_size", IMAGE), ("patch_size", PATCH), ("embedding_length", C),
                       ("feed_forward_length", CF), ("projection_dim", 16), ("attention.head_count", 2),
                       ("block_count", V_LAYERS - 1)):
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_array("clip.vision.image_mean", CLIP_MEAN)
    w.add_array("clip.vision.image_std", CLIP_STD)
    w.add_bool("clip.use_gelu", False)
    for name, a in ldpv2_tensors(rng).items():
        w.add_tensor(_mmproj_name("model.mm_projector." + name), a.squeeze())
    for name, a in clip_tensors(rng, V_LAYERS - 1).items():
        if "post_layernorm" not in name:
            w.add_tensor(_mmproj_name(name), a.squeeze())
    _finish(w)
    return path


def _mmproj_name(name: str) -> str:
    """convert_image_encoder_to_gguf.py's renaming (see tests/test_loading_gguf.py converter_name)."""
    if "mm_projector" in name:
        return name.replace("model.mm_projector.mlp.mlp", "mm.model.mlp").replace("model.mm_projector.peg.peg",
                                                                                   "mm.model.peg")
    for old, new in [("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""),
                     ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"), ("mlp.fc1", "ffn_down"),
                     ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"), ("layrnorm", "ln")]:
        name = name.replace(old, new)
    return name
