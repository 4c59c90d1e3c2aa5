"""Tiny random MobileVLM checkpoints in the exact published layouts, and their PyTorch reference.

The reference is transformers' CLIPVisionModel and LlamaForCausalLM plus tests/torch_ldp.py (LDP / LDPv2 written
from the spec in torch). Weights get enough spread that logits are not near ties. When a checkpoint is stored in
bf16, the reference modules hold the same bf16-rounded values, so both sides compute on identical numbers.
torch and transformers are imported by the functions that use them: importing TEXT or VISION needs neither.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER_MODEL = SHARED_DATA / "llama-spm-vocab" / "tokenizer.model"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              image_size=336, patch_size=14, projection_dim=64, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _spread(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Re-draw every parameter: norms near 1, everything else normal(0, std)."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def _clip_state(clip: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """CLIP vision weights under their published names (`vision_model.*`); transformers 5 drops that prefix."""
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in clip.state_dict().items()}


def _round_bf16(module: torch.nn.Module) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


@dataclass
class Reference:
    """A checkpoint on disk and the torch modules that compute what it should compute."""

    path: Path
    kind: str  # "ldpnet" or "ldpnetv2"
    clip: CLIPVisionModel  # the tower the official code would use
    projector: torch.nn.Module
    llama: LlamaForCausalLM

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Official preprocessing: expand2square with the mean colour, then CLIPImageProcessor (PIL bicubic)."""
        from transformers import CLIPImageProcessor

        image = image.convert("RGB")
        w, h = image.size
        fill = tuple(int(m * 255) for m in CLIP_MEAN)
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                  resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        return proc(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.clip(torch.from_numpy(pixels)[None], output_hidden_states=True)
        return out.hidden_states[-2][0, 1:].numpy()  # (P, C)

    def image_tokens(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.projector(torch.from_numpy(self.features(pixels))[None])[0].numpy()  # (N, D)

    def embeds(self, ids: list[int], image_tokens: np.ndarray | None) -> torch.Tensor:
        """Splice as the official prepare_inputs_labels_for_multimodal does: each -200 becomes the image."""
        import torch

        parts, run = [], []
        table = self.llama.get_input_embeddings()
        with torch.no_grad():
            for t in ids + [None]:
                if t is None or t == -200:
                    if run:
                        parts.append(table(torch.tensor(run)))
                        run = []
                    if t == -200:
                        parts.append(torch.from_numpy(image_tokens))
                else:
                    run.append(t)
            return torch.cat(parts)[None]  # (1, T', D)

    def logits(self, ids: list[int], image_tokens: np.ndarray | None) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.llama(inputs_embeds=self.embeds(ids, image_tokens)).logits[0].numpy()  # (T', V)

    def greedy(self, ids: list[int], image_tokens: np.ndarray | None, steps: int) -> list[int]:
        """Greedy ids by full recomputation each step (no cache), stopping at EOS."""
        import torch

        embeds = self.embeds(ids, image_tokens)
        table = self.llama.get_input_embeddings()
        out: list[int] = []
        with torch.no_grad():
            for _ in range(steps):
                tok = int(self.llama(inputs_embeds=embeds).logits[0, -1].argmax())
                if tok == TEXT["eos_token_id"]:
                    break
                out.append(tok)
                embeds = torch.cat([embeds, table(torch.tensor([[tok]]))], dim=1)
        return out


def _config_json(kind: str | None, vision_tower: str) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "pretraining_tp": 1, "rope_scaling": None,
           "max_sequence_length": TEXT["max_position_embeddings"], **TEXT}
    if kind is None:
        return cfg
    cfg.update({
        "architectures": ["MobileLlamaForCausalLM"], "model_type": "mobilevlm",
        "mm_vision_tower": vision_tower, "vision_tower_type": "clip", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_hidden_size": VISION["hidden_size"], "mm_projector_type": kind,
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_grid_pinpoints": None, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
        # lit-gpt leftovers as in the real 3B configs: must be ignored
        "n_head": 1, "n_query_groups": 1, "n_embd": TEXT["hidden_size"], "n_layer": 7,
    })
    return cfg


def _write_tokenizer(out: Path) -> None:
    shutil.copy(TOKENIZER_MODEL, out / "tokenizer.model")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 2048}))


def build(root: Path, name: str, kind: str | None, fmt: str, seed: int = 0) -> Reference:
    """Write a checkpoint under root/name.

    kind: "ldpnet" (V1), "ldpnetv2" (V2) or None (text-only MobileLLaMA).
    fmt: "bin-bf16" (pytorch_model.bin in bf16, as mtgv ships), "bin-fp16", or "safetensors-sharded" (fp32, 2 shards).
    V1 checkpoints name a separate fp32 CLIP directory in mm_vision_tower and carry a bf16 copy of it too.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from tests.torch_ldp import LDPNetProjector, LDPNetV2Projector

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = root / name
    out.mkdir(parents=True)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    _spread(clip, gen, 0.1)
    llama = LlamaForCausalLM(LlamaConfig(**TEXT, attn_implementation="eager")).eval()
    _spread(llama, gen, 0.1)
    state: dict[str, torch.Tensor] = dict(llama.state_dict())
    projector: torch.nn.Module = torch.nn.Identity()
    tower_ref = clip
    vision_tower = "openai/clip-vit-large-patch14-336"
    if kind is not None:
        cls = LDPNetV2Projector if kind == "ldpnetv2" else LDPNetProjector
        projector = cls(VISION["hidden_size"], TEXT["hidden_size"]).eval()
        _spread(projector, gen, 0.1)
        if kind == "ldpnet":  # V1: the official path uses the named (fp32) CLIP repo, not the stored copy
            clip_dir = root / f"{name}-clip"  # laid out like openai/clip-vit-large-patch14-336
            clip_dir.mkdir()
            save_file({k: v.contiguous() for k, v in _clip_state(clip).items()}, str(clip_dir / "model.safetensors"))
            clip.config.to_json_file(clip_dir / "config.json")
            vision_tower = str(clip_dir)
            tower_ref = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
            tower_ref.load_state_dict(clip.state_dict())
        state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
        if fmt == "bin-bf16":
            _round_bf16(clip)
            _round_bf16(projector)
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in _clip_state(clip).items()})
        # buffers older transformers saved: the loader must ignore them
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    if fmt == "bin-bf16":
        _round_bf16(llama)
    state.update({k: v for k, v in llama.state_dict().items()})
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    if fmt == "bin-bf16":
        torch.save({k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()},
                   out / "pytorch_model.bin")
    elif fmt == "bin-fp16":
        torch.save({k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in state.items()},
                   out / "pytorch_model.bin")
        with torch.no_grad():
            for module in (llama, clip, projector):
                for p in module.parameters():
                    p.copy_(p.to(torch.float16).to(torch.float32))
    elif fmt == "safetensors-sharded":
        names = sorted(state)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for file, keys in shards.items():
            save_file({k: state[k].contiguous() for k in keys}, str(out / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in keys})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    (out / "config.json").write_text(json.dumps(_config_json(kind, vision_tower), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    _write_tokenizer(out)
    return Reference(out, kind or "text", tower_ref, projector, llama)
