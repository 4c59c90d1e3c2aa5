"""`load()`: a model directory or Hugging Face id -> a ready VLM, with strict checking of every tensor.

Which CLIP tower is used follows the official loader (../shared/design/mobilevlm.md section 2): V2 checkpoints
use the copy stored inside them; V1 loads the tower named by `mm_vision_tower` (its stored copy is only a
fallback). `vision_tower=PATH` overrides both. Only the vision layers that run are read.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path


from tinyvlm.config import ModelConfig, VisionConfig, load_config, read_json, vision_config_from_dict
from tinyvlm.errors import ModelNotFound, TinyVLMError, WeightsError
from tinyvlm.gguf_loader import is_gguf, load_gguf
from tinyvlm.hub import resolve_model
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.projector import build_projector, projector_expected_shapes
from tinyvlm.quantize import QuantizedView, check_quant, quantize_language, read_quantized, stored_shapes
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, infer_vision_config, vision_expected_shapes, vision_needed_names
from tinyvlm.vlm import VLM
from tinyvlm.weights import TensorStore, is_ignorable_buffer, open_checkpoint

PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."  # inside MobileVLM checkpoints
TOWER_NAME_PREFIXES = (TOWER_PREFIX, "vision_tower.", "")  # a standalone CLIP repo has no prefix

Progress = Callable[[int, int], None]


def _tower_prefix(store: TensorStore) -> str | None:
    """The prefix under which `store` holds a CLIP vision tower, or None."""
    for prefix in TOWER_NAME_PREFIXES:
        if prefix + "vision_model.embeddings.class_embedding" in store:
            return prefix
    return None


def _tower_shapes(store: TensorStore, prefix: str) -> dict[str, tuple[int, ...]]:
    return {n[len(prefix):]: store.shape(n) for n in store.names() if n.startswith(prefix + "vision_model.")}


def _find_tower_dir(name: str | None) -> Path | None:
    if not name:
        return None
    try:
        return resolve_model(name)
    except ModelNotFound:
        return None


def _tower_config(config_dir: Path | None, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> VisionConfig:
    layer = int(cfg.raw.get("mm_vision_select_layer", -2))
    feature = str(cfg.raw.get("mm_vision_select_feature", "patch"))
    if config_dir is not None and (config_dir / "config.json").is_file():
        return vision_config_from_dict(read_json(config_dir / "config.json"), layer, feature)
    return infer_vision_config(shapes, select_layer=layer, select_feature=feature)


def console_progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    print(f"\rloading weights [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr)


def load(
    path_or_repo_id: str | Path,
    *,
    quant: str | None = None,
    vision_tower: str | Path | None = None,
    progress: Progress | bool | None = None,
    mmproj: str | Path | None = None,
) -> VLM:
    """Load a MobileVLM (V1 or V2) or a text-only MobileLLaMA / LLaMA checkpoint.

    `path_or_repo_id`: a directory, an id such as `mtgv/MobileVLM_V2-1.7B` found in the Hugging Face cache, or
    an LLM GGUF file of llama.cpp (text only; tinyvlm.gguf_loader).
    `quant`: "int4" or "int8" quantizes the LLM's linear layers while loading (tinyvlm.quantize); a file written
    by `python -m tinyvlm quantize` is already quantized and loads by memory map.
    `vision_tower`: a CLIP directory or id to use instead of the one the config names.
    `progress`: True for a console bar on stderr, or a callback(done, total).
    `mmproj`: with an LLM GGUF file, llama.cpp's image encoder file of the same model (tinyvlm.mmproj).
    """
    check_quant(quant)
    report: Progress | None = console_progress if progress is True else (progress or None)
    if is_gguf(path_or_repo_id):
        return load_gguf(path_or_repo_id, quant=quant, progress=report, mmproj=mmproj)
    if mmproj is not None:
        raise TinyVLMError(f"{path_or_repo_id}: not an LLM GGUF file; mmproj={mmproj} goes only with one "
                           "(llama.cpp's pair: LLM .gguf + mmproj .gguf)")
    model_dir = resolve_model(path_or_repo_id)
    cfg = load_config(model_dir)
    store = open_checkpoint(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    files = ", ".join(map(str, store.files()))
    file_kinds = read_quantized(store.metadata, files, store.names())
    file_quant = store.metadata.get("quant") if file_kinds else None
    if file_kinds and quant not in (None, file_quant):
        raise TinyVLMError(f"{files}: already quantized as {file_quant}; it cannot be loaded as {quant}")

    lang_shapes = language_expected_shapes(cfg.text)
    expected = {n: s for n, s in lang_shapes.items() if n not in file_kinds}
    for name, kind in file_kinds.items():
        if name not in lang_shapes and name != "lm_head.weight":
            raise WeightsError(f"{files}: quantized tensor {name!r} is not part of this model")
        shape = lang_shapes.get(name, (cfg.text.vocab_size, cfg.text.hidden_size))
        expected.update(stored_shapes(name, kind, shape))
    optional: set[str] = set()
    vision_cfg = tower_store = None
    tower_prefix = ""
    if cfg.projector is not None:
        expected.update({PROJECTOR_PREFIX + n: s for n, s in projector_expected_shapes(cfg.projector).items()})
        vision_cfg, tower_store, tower_prefix = _choose_tower(cfg, store, model_dir, vision_tower)
        own_prefix = _tower_prefix(store)
        if own_prefix is not None:  # the checkpoint's own copy of CLIP is part of its published layout
            own_cfg = _tower_config(None, _tower_shapes(store, own_prefix), cfg)
            own = {own_prefix + n: s for n, s in vision_expected_shapes(own_cfg).items()}
            expected.update(own)
            if tower_store is not store:
                optional.update(own)
    if cfg.text.tie_word_embeddings or "lm_head.weight" not in store:
        optional.add("lm_head.weight")
    store.check(expected, optional=optional, ignore=is_ignorable_buffer)

    # Read the tensors (only the vision layers that run), ticking the progress bar.
    lang_names = {n for n in lang_shapes if n in store} | set(file_kinds)
    vision_names = vision_needed_names(vision_cfg) if vision_cfg is not None else set()
    proj_names = set(projector_expected_shapes(cfg.projector)) if cfg.projector is not None else set()
    total = len(lang_names) + len(vision_names) + len(proj_names)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if report is not None:
            report(done, total)

    if file_kinds:
        full_shapes = {**lang_shapes, "lm_head.weight": (cfg.text.vocab_size, cfg.text.hidden_size)}
        lang_weights = QuantizedView(store, lang_names, file_kinds, full_shapes, on_read=tick)
    else:
        lang_weights = store.view(lang_names, on_read=tick)
    quant_report = None
    if quant is not None and not file_kinds:
        lang_weights, quant_report = quantize_language(cfg.text, lang_weights, quant)
    language = LanguageModel(cfg.text, lang_weights)
    vision = projector = None
    if cfg.projector is not None and vision_cfg is not None and tower_store is not None:
        if tower_store is not store:
            tower_store.check(
                {tower_prefix + n: s for n, s in vision_expected_shapes(vision_cfg).items() if n in vision_names},
                ignore=lambda n: True,
            )
        vision = VisionTower(vision_cfg, tower_store.view(vision_names, tower_prefix, tick))
        projector = build_projector(cfg.projector, store.view(proj_names, PROJECTOR_PREFIX, tick))
    vlm = VLM(cfg, tokenizer, language, vision, projector, vision_cfg, path=model_dir)
    vlm.quant = quant or file_quant
    vlm.quant_report = quant_report
    return vlm


def _choose_tower(
    cfg: ModelConfig, store: TensorStore, model_dir: Path, override: str | Path | None
) -> tuple[VisionConfig, TensorStore, str]:
    """(vision config, store holding the tower, name prefix in that store) for a multimodal checkpoint."""
    assert cfg.projector is not None
    if override is not None:
        tower_dir = resolve_model(override)
        return _open_tower(tower_dir, cfg)
    own_prefix = _tower_prefix(store)
    named_dir = _find_tower_dir(cfg.mm_vision_tower)
    is_v1 = cfg.projector.projector_type == "ldpnet"
    if is_v1 and named_dir is not None:
        return _open_tower(named_dir, cfg)
    if own_prefix is not None:
        if is_v1:
            warnings.warn(
                f"{model_dir}: vision tower {cfg.mm_vision_tower!r} not found; using the copy stored in the "
                "checkpoint (the official V1 path reloads it from the named CLIP repo)",
                stacklevel=3,
            )
        shapes = _tower_shapes(store, own_prefix)
        return _tower_config(named_dir, shapes, cfg), store, own_prefix
    raise ModelNotFound(
        f"{model_dir}: the checkpoint holds no vision tower and {cfg.mm_vision_tower!r} was not found locally; "
        "download it (e.g. `huggingface-cli download openai/clip-vit-large-patch14-336`) or pass vision_tower=PATH"
    )


def _open_tower(tower_dir: Path, cfg: ModelConfig) -> tuple[VisionConfig, TensorStore, str]:
    tower_store = open_checkpoint(tower_dir)
    prefix = _tower_prefix(tower_store)
    if prefix is None:
        raise WeightsError(f"{tower_dir}: no CLIP vision tower found (no vision_model.embeddings.class_embedding)")
    return _tower_config(tower_dir, _tower_shapes(tower_store, prefix), cfg), tower_store, prefix
