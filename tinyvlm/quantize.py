"""Quantize the LLM's linear layers (int4 = GGUF Q4_0 blocks, int8 = Q8_0), and tinyvlm's quantized file.

`quantize_language` turns a language model's float weights into QuantizedMatrix objects at load time and
reports the error it made. `save_quantized` writes a model directory whose `model.safetensors` holds the
quantized arrays (`<name>.qs`, `<name>.d`, `<name>.m`) and says what it is in its metadata (format, version,
quant, group size, the kind of every quantized tensor, source), so that `load` memory-maps it (the language
model then packs the arrays into one buffer: packing.pack_together) and never has to infer anything from a
file name. The lm_head is kept at int8 under int4, as llama.cpp keeps the output
matrix at higher precision; the embedding table stays float (only one row per token is read).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tinyvlm.config import ModelConfig, TextConfig
from tinyvlm.errors import TinyVLMError, WeightsError
from tinyvlm.kernels.quant import GROUP, QuantizedMatrix, dequantize, from_arrays, quantize, to_arrays
from tinyvlm.limits import parse_json, short

if TYPE_CHECKING:
    from tinyvlm.weights import TensorStore

QUANTS = ("int4", "int8")
# The one table of block kinds, for every path that quantizes (a checkpoint at load, `quantize`, a GGUF's float
# matrices): quant -> the kind of the decoder's linear layers and of the lm_head.
BLOCK_KINDS = {"int4": {"layers": "q4_0", "lm_head": "q8_0"}, "int8": {"layers": "q8_0", "lm_head": "q8_0"}}
# A GGUF file's quantized kinds other than kernels/quant.EXACT_GGUF_TYPES (Q5_1, Q5_K) are converted to
# CONVERTED_KIND, which keeps their accuracy (tinyvlm/weights/gguf_quants.py).
CONVERTED_KIND = "q8_0"
LINEAR_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FILE_FORMAT = "tinyvlm-quantized"
FILE_VERSION = "1"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class QuantReport:
    """What quantization did: how many weights, how many bytes, and the error (relative Frobenius norm)."""

    quant: str
    matrices: int
    weights: int
    bytes_before: int  # float32
    bytes_after: int
    rel_error: float  # sqrt(sum |W - W'|^2 / sum |W|^2) over all quantized matrices
    worst: tuple[str, float]  # the matrix with the largest relative error

    def __str__(self) -> str:
        return (f"{self.quant}: {self.matrices} matrices, {self.weights / 1e6:.1f} M weights, "
                f"{self.bytes_before / 2**20:.0f} MiB -> {self.bytes_after / 2**20:.0f} MiB, relative error "
                f"{self.rel_error:.4f} (worst {self.worst[0]}: {self.worst[1]:.4f})")


def check_quant(quant: str | None) -> None:
    if quant is not None and quant not in QUANTS:
        raise TinyVLMError(f"unknown quantization {short(quant)}; expected one of {', '.join(QUANTS)} (or none)")


def block_kind(quant: str, name: str) -> str:
    """The block kind `quant` gives the matrix `name` (Hugging Face name)."""
    return BLOCK_KINDS[quant]["lm_head" if name == "lm_head.weight" else "layers"]


def quantized_kinds(cfg: TextConfig, quant: str) -> dict[str, str]:
    """Tensor name -> block kind for every matrix that `quant` quantizes."""
    names = [f"model.layers.{i}.{part}.weight" for i in range(cfg.num_hidden_layers) for part in LINEAR_PARTS]
    return {name: block_kind(quant, name) for name in [*names, "lm_head.weight"]}


def _qbytes(qm: QuantizedMatrix) -> int:
    return sum(a.nbytes for a in to_arrays(qm).values())


def quantize_language(
    cfg: TextConfig, weights: Mapping[str, np.ndarray], quant: str, progress: Progress | None = None
) -> tuple[dict[str, np.ndarray | QuantizedMatrix], QuantReport]:
    """Quantize the linear layers (and lm_head) of a LLaMA's weights; everything else passes through."""
    check_quant(quant)
    kinds = quantized_kinds(cfg, quant)
    if "lm_head.weight" not in weights:  # tied: the head is a quantized copy of the embedding table
        kinds.pop("lm_head.weight")
        kinds_source = {**kinds, "lm_head.weight": block_kind(quant, "lm_head.weight")}
    else:
        kinds_source = kinds
    out: dict[str, np.ndarray | QuantizedMatrix] = {n: weights[n] for n in weights if n not in kinds}
    err2 = ref2 = 0.0
    n_weights = bytes_after = 0
    worst = ("", 0.0)
    for done, (name, kind) in enumerate(kinds_source.items(), 1):
        source = weights["model.embed_tokens.weight" if name not in weights else name]
        w = np.ascontiguousarray(source, dtype=np.float32)  # (out, in)
        if w.shape[1] % GROUP:
            raise WeightsError(f"{name}: {w.shape[1]} inputs is not a multiple of the group size {GROUP}")
        qm = quantize(w, kind)
        diff = float(np.square(dequantize(qm) - w, dtype=np.float64).sum())
        norm = float(np.square(w, dtype=np.float64).sum())
        err2, ref2 = err2 + diff, ref2 + norm
        rel = math.sqrt(diff / norm) if norm else 0.0
        worst = max(worst, (name, rel), key=lambda t: t[1])
        n_weights += w.size
        bytes_after += _qbytes(qm)
        out[name] = qm
        if progress is not None:
            progress(done, len(kinds_source))
    report = QuantReport(quant, len(kinds_source), n_weights, 4 * n_weights, bytes_after,
                         math.sqrt(err2 / ref2) if ref2 else 0.0, worst)
    return out, report


# ---------------------------------------------------------------- the quantized file


def read_quantized(store_metadata: Mapping[str, str], path: str, names: Iterable[str]) -> dict[str, str]:
    """Validate a tinyvlm quantized file's metadata; return tensor name -> block kind ({} for other files)."""
    if store_metadata.get("format") != FILE_FORMAT:
        return {}
    if store_metadata.get("version") != FILE_VERSION:
        raise WeightsError(f"{path}: quantized file version {short(store_metadata.get('version'))}; "
                           f"this tinyvlm reads version {FILE_VERSION}")
    if store_metadata.get("quant") not in QUANTS:
        raise WeightsError(f"{path}: quantized file metadata 'quant' is {short(store_metadata.get('quant'))}; "
                           f"expected one of {', '.join(QUANTS)}")
    if store_metadata.get("group_size") != str(GROUP):
        raise WeightsError(f"{path}: group size {short(store_metadata.get('group_size'))}; expected {GROUP}")
    if "kinds" not in store_metadata:
        raise WeightsError(f"{path}: quantized file metadata has no 'kinds'")
    kinds = parse_json(store_metadata["kinds"], f"{path}: quantized file metadata 'kinds'", WeightsError)
    if not isinstance(kinds, dict) or not all(k in ("q4_0", "q4_1", "q8_0") for k in kinds.values()):
        raise WeightsError(f"{path}: quantized file metadata 'kinds' must map tensor names to block kinds")
    present = set(names)
    for name in kinds:
        if f"{name}.qs" not in present:
            raise WeightsError(f"{path}: metadata lists quantized tensor {short(name)} but the file lacks {name}.qs")
    return kinds


def stored_shapes(name: str, kind: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The arrays a quantized (out, in) matrix is stored as: `<name>.qs`, `<name>.d` (and `<name>.m`)."""
    out, n_in = shape
    shapes = {f"{name}.qs": (out, n_in if kind == "q8_0" else n_in // 2), f"{name}.d": (out, n_in // GROUP)}
    if kind == "q4_1":
        shapes[f"{name}.m"] = (out, n_in // GROUP)
    return shapes


class QuantizedView(Mapping[str, "np.ndarray | QuantizedMatrix"]):
    """Language weights from a quantized file: quantized names come back as QuantizedMatrix, others as float32."""

    def __init__(self, store: "TensorStore", names: set[str], kinds: Mapping[str, str],
                 shapes: Mapping[str, tuple[int, ...]], on_read: Callable[[], None] | None = None) -> None:
        self.store, self.names, self.kinds, self.shapes, self.on_read = store, names, kinds, shapes, on_read

    def __getitem__(self, name: str) -> np.ndarray | QuantizedMatrix:
        if name not in self.names:
            raise KeyError(name)
        if self.on_read is not None:
            self.on_read()
        if name not in self.kinds:
            return self.store.weight(name)
        arrays = {f.rsplit(".", 1)[1]: self.store.stored(f) for f in stored_shapes(name, self.kinds[name], (0, 0))
                  if f in self.store}
        try:
            return from_arrays(self.kinds[name], self.shapes[name], arrays)  # type: ignore[arg-type]
        except WeightsError as e:
            raise WeightsError(f"{', '.join(map(str, self.store.files()))}: {name}: {e}") from None

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self.names

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def save_quantized(src_dir: Path, cfg: ModelConfig, store: "TensorStore", out_dir: str | Path, quant: str,
                   progress: Progress | None = None, vision_dtype: str = "F16", source: str = "") -> QuantReport:
    """Write the checkpoint of `src_dir` (its config and opened weights) quantized into the new model directory
    `out_dir`, atomically: a failure leaves nothing there."""
    from safetensors.numpy import save_file

    from tinyvlm.language import language_expected_shapes
    from tinyvlm.weights import is_ignorable_buffer

    check_quant(quant)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise TinyVLMError(f"{out_dir}: already exists; choose a new output directory")
    lang_names = {n for n in language_expected_shapes(cfg.text) if n in store}
    qweights, report = quantize_language(cfg.text, store.view(lang_names), quant, progress)
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for name, value in qweights.items():
        if isinstance(value, QuantizedMatrix):
            kinds[name] = value.kind
            arrays.update({f"{name}.{part}": a for part, a in to_arrays(value).items()})
        else:
            arrays[name] = np.ascontiguousarray(value, dtype=np.float32)
    for name in store.names():  # vision tower, projector: kept as float, in vision_dtype
        if name in qweights or is_ignorable_buffer(name):
            continue
        value = store.get(name)
        if value.dtype == np.float32 and vision_dtype == "F16":
            value = value.astype(np.float16)
        arrays[name] = np.ascontiguousarray(value)
    metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "quant": quant, "group_size": str(GROUP),
                "kinds": json.dumps(kinds, sort_keys=True), "source": source or str(src_dir), "vision_dtype": vision_dtype,
                "quant_error": f"{report.rel_error:.6f}"}
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(arrays, str(tmp / "model.safetensors"), metadata=metadata)
        for f in src_dir.iterdir():  # config, tokenizer and generation files travel along
            if f.is_file() and f.suffix in (".json", ".model") and not f.name.endswith(".index.json"):
                shutil.copy(f, tmp / f.name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
