"""Every configuration: one dataclass per model part and GenerationConfig, built in this package and nowhere else:
    hf.py    from a Hugging Face config.json, and a vision tower's config from its shapes
    gguf.py  from GGUF metadata (an LLM file, or llama.cpp's mmproj image encoder file)

Only the Hugging Face keys are read (`num_attention_heads`, never the leftover lit-gpt `n_head` that the
real MobileVLM-3B configs also carry). See ../shared/design/mobilevlm.md sections 1, 2 and 4.2.

Shape glossary, used in comments across the package:
    T   tokens in the current chunk            S   KV-cache length (context)
    D   LLM hidden size                        Hq / Hkv  query / key-value heads
    Dh  head dim (D / Hq)                      F   LLM feed-forward size
    V   vocabulary size                        P   image patches (576 = 24 x 24)
    C   vision hidden size (1024 for ViT-L)    N   image tokens after the projector (144 = 12 x 12)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyvlm.errors import ConfigError, PromptError
from tinyvlm.limits import MAX_HEAD_WIDTH, MAX_PATCHES, Check, flag, integers, reals, text

PROJECTOR_TYPES = ("ldpnetv2", "ldpnet")
# OpenAI CLIP's pixel normalisation (every MobileVLM uses it).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# The checks of the config tables (config.hf, config.gguf): a value read from a file, as a ConfigError.
def int_in(lo: int, hi: int) -> Check:
    return integers(lo, hi, ConfigError)


def real_in(lo: float, hi: float) -> Check:
    """A finite number in (lo, hi]."""
    return reals(lo, hi, ConfigError, above=True)


def is_text(value: object, what: str) -> str:
    return text(value, what, ConfigError)


def is_flag(value: object, what: str) -> bool:
    return flag(value, what, ConfigError)


@dataclass(frozen=True)
class TextConfig:
    """MobileLLaMA / LLaMA decoder."""

    hidden_size: int  # D
    num_hidden_layers: int
    num_attention_heads: int  # Hq
    num_key_value_heads: int  # Hkv
    intermediate_size: int  # F
    vocab_size: int  # V
    max_position_embeddings: int  # S (context length)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    head_dim: int = 0  # Dh; 0 means hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        """How the sizes fit together (each one's type and range is checked where it is read: config.hf, .gguf)."""
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                  f"{self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ConfigError(f"the head size {self.head_dim} is odd; RoPE rotates pairs of values")
        if self.num_attention_heads * self.head_dim > MAX_HEAD_WIDTH * self.hidden_size:
            raise ConfigError(f"{self.num_attention_heads} heads of {self.head_dim} are more than {MAX_HEAD_WIDTH} "
                              f"times hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is not a token id (vocab_size {self.vocab_size})")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (defaults are ViT-L/14-336)."""

    hidden_size: int = 1024  # C
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2  # index into hidden_states (25 entries for 24 layers)
    select_feature: str = "patch"  # "patch" drops CLS; "cls_patch" keeps it

    def __post_init__(self) -> None:
        """How the sizes fit together (each one's type and range is checked where it is read)."""
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                              f"{self.num_attention_heads}")
        if not 0 < self.patch_size <= self.image_size:
            raise ConfigError(f"vision patch_size {self.patch_size} does not fit image_size {self.image_size}")
        if not -(self.num_hidden_layers + 1) <= self.select_layer <= self.num_hidden_layers:
            raise ConfigError(f"mm_vision_select_layer {self.select_layer} is not a hidden state of a "
                              f"{self.num_hidden_layers}-layer tower (-{self.num_hidden_layers + 1} to "
                              f"{self.num_hidden_layers})")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"mm_vision_select_feature {self.select_feature!r}; expected 'patch' or 'cls_patch'")
        if self.num_patches > MAX_PATCHES:
            raise ConfigError(f"the vision tower makes {self.num_patches} patches of an image "
                              f"({self.image_size} / {self.patch_size} squared); the limit is {MAX_PATCHES}")

    @property
    def num_patches(self) -> int:  # P
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_to_run(self) -> int:
        """How many encoder layers produce hidden_states[select_layer] (23 of 24 for select_layer -2)."""
        n = self.select_layer % (self.num_hidden_layers + 1)
        return n


@dataclass(frozen=True)
class ProjectorConfig:
    """LDP (`ldpnet`, MobileVLM V1) or LDPv2 (`ldpnetv2`, MobileVLM V2)."""

    projector_type: str  # "ldpnet" or "ldpnetv2" (normalised from mm_projector_type)
    mm_hidden_size: int  # C, input width
    hidden_size: int  # D, output width


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: the LLM, and for a VLM also the vision tower and projector."""

    text: TextConfig
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    mm_vision_tower: str | None = None  # HF id or path of the CLIP tower (V1 loads it from there)
    image_aspect_ratio: str = "pad"
    select_layer: int = -2  # mm_vision_select_layer and mm_vision_select_feature, for the tower's VisionConfig
    select_feature: str = "patch"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.vision is not None and self.projector is not None:
            check_fit(self.vision, self.projector)

    @property
    def is_multimodal(self) -> bool:
        return self.projector is not None


def check_fit(vision: VisionConfig, projector: ProjectorConfig) -> None:
    """A tower and a projector must fit together: LDP pools a square grid of patch features 2 x 2."""
    grid = vision.image_size // vision.patch_size
    if grid % 2 or vision.select_feature != "patch":
        raise ConfigError(f"the {projector.projector_type} projector pools a grid of patches 2 x 2; the vision tower "
                          f"gives a {grid} x {grid} grid with select_feature {vision.select_feature!r} (expected an "
                          "even grid and 'patch')")
    if projector.mm_hidden_size != vision.hidden_size:
        raise ConfigError(f"mm_hidden_size {projector.mm_hidden_size} is not the vision tower's width "
                          f"{vision.hidden_size}")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, checked when made; temperature 0 means greedy. The CLI and the Python API take their
    defaults from here."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages ids already in the history; 1.0 = off
    seed: int | None = None  # None draws a fresh seed from the OS

    def __post_init__(self) -> None:
        """The one place the generation settings are checked: PromptError naming the first invalid value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise PromptError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise PromptError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise PromptError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise PromptError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise PromptError(f"seed must be an integer >= 0 or None, got {self.seed!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return _is_int(x) or (isinstance(x, (float, np.floating)) and not math.isnan(x))
