"""A model directory or Hugging Face id -> a ready VLM, with strict checking of every tensor.

Which CLIP tower is used follows the official loader (../shared/design/mobilevlm.md section 2): V2 checkpoints
use the copy stored inside them; V1 loads the tower named by `mm_vision_tower` (its stored copy is only a
fallback). `vision_tower=PATH` overrides both. Only the vision layers that run are read, and the progress bar
counts exactly the tensors that are read.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tinyvlm.backends import Backend
from tinyvlm.config import ModelConfig
from tinyvlm.config.hf import load_config, vision_config_from_dict, vision_config_from_shapes
from tinyvlm.errors import ConfigError, ModelNotFound, TinyVLMError, WeightsError
from tinyvlm.limits import read_json_object, short
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.loading.hub import resolve_model
from tinyvlm.projector import build_projector, projector_expected_shapes
from tinyvlm.quantize import (Progress, QuantizedView, QuantReport, quantize_language, quantized_kinds, read_quantized,
                              save_quantized, stored_shapes)
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, vision_expected_shapes, vision_needed_names
from tinyvlm.vlm import VLM
from tinyvlm.weights import TensorStore, is_ignorable_buffer, open_checkpoint
from tinyvlm.weights.checked import check_layer_count, check_tensors

PROJECTOR_PREFIX = "model.mm_projector."
TOWER_NAME_PREFIXES = ("model.vision_tower.vision_tower.", "vision_tower.", "")  # MobileVLM's; a CLIP repo's has none

class _Tower:
    """Where a CLIP vision tower's tensors are (a store and a name prefix) and its config."""

    def __init__(self, store: TensorStore, prefix: str, config_dir: Path | None, cfg: ModelConfig,
                 warn: bool = True) -> None:
        self.store, self.prefix = store, prefix
        shapes = {n[len(prefix):]: store.shape(n) for n in store.names() if n.startswith(prefix + "vision_model.")}
        layer, feature = cfg.select_layer, cfg.select_feature
        if config_dir is not None and (config_dir / "config.json").is_file():
            path = config_dir / "config.json"
            self.config = vision_config_from_dict(read_json_object(path, ConfigError), path, layer, feature)
        else:
            try:
                self.config = vision_config_from_shapes(shapes, cfg.mm_vision_tower, layer, feature, warn=warn)
            except ConfigError as e:
                raise ConfigError(f"{', '.join(map(str, store.files()))}: {e}") from None

    def published(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the tower's published layout, with the store's names."""
        return {self.prefix + n: s for n, s in vision_expected_shapes(self.config).items()}


def _tower_prefix(store: TensorStore) -> str | None:
    """The prefix under which `store` holds a CLIP vision tower, or None."""
    return next((p for p in TOWER_NAME_PREFIXES if p + "vision_model.embeddings.class_embedding" in store), None)


def load_dir(path_or_repo_id: str | Path, quant: str | None, backend: Backend, progress: Progress | None,
             vision_tower: str | Path | None, fetch: bool = False) -> VLM:
    """A MobileVLM (V1 or V2) or a text-only MobileLLaMA / LLaMA from a directory or a cached id; with `fetch`, an id
    not in the cache is downloaded first, and a V1 model's CLIP tower too (loading/download.py)."""
    model_dir = resolve_model(path_or_repo_id, fetch=fetch, whole=True)
    cfg = load_config(model_dir)
    store = open_checkpoint(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    files = ", ".join(map(str, store.files()))
    file_kinds = read_quantized(store.metadata, files, store.names())
    file_quant = store.metadata.get("quant") if file_kinds else None
    check_layer_count(store.names(), r"model\.layers\.([^.]+)\.", cfg.text.num_hidden_layers,
                      f"{model_dir / 'config.json'} num_hidden_layers", files)
    if file_kinds and quant not in (None, file_quant):
        raise TinyVLMError(f"{files}: already quantized as {file_quant}; it cannot be loaded as {quant}")

    # What the files must hold: the LLM (quantized tensors as their stored arrays), the projector, the tower(s).
    lang_shapes = language_expected_shapes(cfg.text)
    head_shape = (cfg.text.vocab_size, cfg.text.hidden_size)
    expected = {n: s for n, s in lang_shapes.items() if n not in file_kinds}
    linear = quantized_kinds(cfg.text, "int8")  # the matrices a quantized file may hold quantized
    for name, kind in file_kinds.items():
        if name not in linear:
            raise WeightsError(f"{files}: quantized tensor {short(name)} is not a linear layer of this model")
        expected.update(stored_shapes(name, kind, lang_shapes.get(name, head_shape)))
    optional: set[str] = set()
    tower = None
    if cfg.projector is not None:
        expected.update({PROJECTOR_PREFIX + n: s for n, s in projector_expected_shapes(cfg.projector).items()})
        own_prefix = _tower_prefix(store)
        own = None if own_prefix is None else _Tower(store, own_prefix, None, cfg, warn=False)  # for its layout
        tower = _choose_tower(cfg, own, model_dir, vision_tower, fetch)
        try:
            cfg = replace(cfg, vision=tower.config)  # ModelConfig checks that the tower fits the projector
        except ConfigError as e:
            raise ConfigError(f"{model_dir}: {e}") from None
        if own is not None:  # the checkpoint's own copy of CLIP is part of its published layout
            expected.update(own.published())
            if tower is not own:
                optional.update(own.published())
    if cfg.text.tie_word_embeddings or "lm_head.weight" not in store:
        optional.add("lm_head.weight")
    store.check(expected, optional=optional, ignore=is_ignorable_buffer)

    # What is read, tensor by tensor: the one list the progress bar counts.
    lang_names = {n for n in lang_shapes if n in store} | set(file_kinds)
    vision_names = vision_needed_names(tower.config) if tower is not None else set()
    proj_names = set(projector_expected_shapes(cfg.projector)) if cfg.projector is not None else set()
    tick = _counter(len(lang_names) + len(vision_names) + len(proj_names), progress)
    if file_kinds:
        lang_weights = QuantizedView(store, lang_names, file_kinds, {**lang_shapes, "lm_head.weight": head_shape},
                                     on_read=tick)
    else:
        lang_weights = store.view(lang_names, on_read=tick)
    quant_report = None
    if quant is not None and not file_kinds:
        lang_weights, quant_report = quantize_language(cfg.text, lang_weights, quant)
    language = LanguageModel(cfg.text, lang_weights, backend)
    vision = projector = None
    if tower is not None and cfg.projector is not None:
        if tower.store is not store:
            tower.store.check({n: s for n, s in tower.published().items() if n[len(tower.prefix):] in vision_names},
                              ignore=lambda n: True)
        vision = VisionTower(tower.config, tower.store.view(vision_names, tower.prefix, tick), backend)
        projector = build_projector(cfg.projector, store.view(proj_names, PROJECTOR_PREFIX, tick), backend)
    vlm = VLM(cfg, tokenizer, language, vision, projector, path=model_dir)
    vlm.quant = quant or file_quant
    vlm.quant_report = quant_report
    return vlm


def _counter(total: int, progress: Progress | None) -> Callable[[], None]:
    """A tick() that reports (done, total) to `progress` once per tensor read."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick


def _choose_tower(cfg: ModelConfig, own: _Tower | None, model_dir: Path, override: str | Path | None,
                  fetch: bool) -> _Tower:
    """The CLIP tower a multimodal checkpoint runs: `override`, else V1's named tower (downloaded with `fetch` when
    it is not in the cache), else the stored copy."""
    assert cfg.projector is not None
    if override is not None:
        return _open_tower(resolve_model(override), cfg)
    named_dir = None
    is_v1 = cfg.projector.projector_type == "ldpnet"
    if cfg.mm_vision_tower:
        try:
            named_dir = resolve_model(cfg.mm_vision_tower, fetch=fetch and is_v1, tower=True, whole=True)
        except (ModelNotFound, WeightsError):  # not there, or not a directory: the stored copy is the fallback
            pass
    if is_v1 and named_dir is not None:
        return _open_tower(named_dir, cfg)
    if own is not None:
        if is_v1:
            warnings.warn(
                f"{model_dir}: vision tower {short(cfg.mm_vision_tower)} not found; using the copy stored in the "
                "checkpoint (the official V1 path reloads it from the named CLIP repo)",
                stacklevel=4,
            )
        return _Tower(own.store, own.prefix, named_dir, cfg)
    raise ModelNotFound(
        f"{model_dir}: the checkpoint holds no vision tower and {short(cfg.mm_vision_tower)} was not found locally; "
        "download it (e.g. `huggingface-cli download openai/clip-vit-large-patch14-336`) or pass vision_tower=PATH"
    )


def _open_tower(tower_dir: Path, cfg: ModelConfig) -> _Tower:
    tower_store = open_checkpoint(tower_dir)
    prefix = _tower_prefix(tower_store)
    if prefix is None:
        raise WeightsError(f"{tower_dir}: no CLIP vision tower found (no vision_model.embeddings.class_embedding)")
    return _Tower(tower_store, prefix, tower_dir, cfg)


def quantize_dir(src: str | Path, out_dir: str | Path, quant: str, progress: Progress | None = None) -> QuantReport:
    """Write a quantized copy of the checkpoint `src` (a directory or cached id) into the new directory `out_dir`."""
    src_dir = resolve_model(src)
    cfg, store = load_config(src_dir), open_checkpoint(src_dir)
    files = ", ".join(map(str, store.files()))
    if read_quantized(store.metadata, files, store.names()):
        raise TinyVLMError(f"{files}: already quantized as {store.metadata.get('quant')}")
    check_layer_count(store.names(), r"model\.layers\.([^.]+)\.", cfg.text.num_hidden_layers,
                      f"{src_dir / 'config.json'} num_hidden_layers", files)
    lang_shapes = language_expected_shapes(cfg.text)  # the language model is read and quantized: check it first
    check_tensors({n: store.shape(n) for n in store.names() if n in lang_shapes}, lang_shapes, files,
                  optional=["lm_head.weight"])
    return save_quantized(src_dir, cfg, store, out_dir, quant, progress, source=str(src))
