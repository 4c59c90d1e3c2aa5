"""TensorStore: one read-only, name-addressed view over a checkpoint's weight files, with strict loading.

Opens Hugging Face checkpoint directories as shipped (mobilevlm.md 1.2): a single `model.safetensors` or
`pytorch_model.bin`, or shards listed in `*.index.json` (`weight_map`: tensor name -> shard file). The format
of each file is told by its first bytes (a zip signature or a safetensors header), not by its suffix.
Names are the checkpoint's own (style.md b2); `check` compares them with what a model expects, nanoGPT-style
but reporting every problem at once (style.md b3).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from tinyvlm.errors import ModelNotFound, WeightsError
from tinyvlm.limits import read_json_object, short
from tinyvlm.weights.checked import check_tensors
from tinyvlm.weights.gguf import MAGIC as GGUF_MAGIC
from tinyvlm.weights.pages import release
from tinyvlm.weights.safetensors import FLOAT_TAGS, RawTensor, read_safetensors_with_metadata
from tinyvlm.weights.torch_bin import ZIP_MAGIC, read_torch_bin

# Looked for in this order inside a model directory.
CHECKPOINT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def is_ignorable_buffer(name: str) -> bool:
    """Non-persistent buffers that some checkpoints carry and the model recomputes (RoPE inv_freq, position ids)."""
    return name.endswith("rotary_emb.inv_freq") or name.rsplit(".", 1)[-1] == "position_ids"


class TensorStore:
    """Read-only access by name to the tensors of one or more weight files."""

    def __init__(
        self, tensors: dict[str, RawTensor], files: dict[str, Path], metadata: dict[str, str] | None = None
    ) -> None:
        self._tensors = tensors
        self._files = files  # tensor name -> the file it lives in
        self.metadata: dict[str, str] = metadata or {}  # safetensors "__metadata__" (first shard's)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._raw(name).data.shape)

    def dtype(self, name: str) -> str:
        """The stored dtype tag: "F32", "F16", "BF16", "I64", ..."""
        return self._raw(name).dtype

    def file_of(self, name: str) -> Path:
        self._raw(name)
        return self._files[name]

    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def view(self, names: Iterable[str], prefix: str = "", on_read: Callable[[], None] | None = None) -> "StoreView":
        """A read-only Mapping of `names` (looked up as prefix + name) to float32 arrays, read on access (`weight`)."""
        return StoreView(self, set(names), prefix, on_read)

    def stored(self, name: str) -> np.ndarray:
        """The tensor as stored, zero-copy (BF16 as its raw uint16 patterns)."""
        return self._raw(name).data

    def get(self, name: str) -> np.ndarray:
        """The tensor as a C-contiguous array: float32 for float tensors, the stored dtype otherwise.

        A contiguous F32 tensor is returned as a read-only view of the memory-mapped file (no copy);
        F16/BF16/F64 and non-contiguous tensors are converted into a new array.
        """
        raw = self._raw(name)
        if raw.dtype == "BF16":
            # bf16 is the top half of a float32: put the 16 bits there and reinterpret. In place with a uint32
            # shift count, so that a 0-d tensor stays a uint32 array on NumPy 1.x too (`<< 16` made it an int64
            # scalar there, which cannot be viewed as float32)
            bits = raw.data.astype(np.uint32, order="C")
            np.left_shift(bits, np.uint32(16), out=bits)
            release(raw.data)  # the file's pages: copied (weights/pages.py)
            return bits.view(np.float32)
        if raw.dtype in FLOAT_TAGS:
            if raw.data.dtype == np.float32 and raw.data.flags.c_contiguous:
                return raw.data
            converted = raw.data.astype(np.float32, order="C")
            release(raw.data)
            return converted
        return np.ascontiguousarray(raw.data)

    def weight(self, name: str) -> np.ndarray:
        """`get` for a tensor that must be a float weight: a WeightsError if it is stored as integers or bools (a
        file whose dtypes were relabelled, BF16 read as I16, would otherwise load integers as weights)."""
        tag = self._raw(name).dtype
        if tag not in FLOAT_TAGS:
            raise WeightsError(f"{self.file_of(name)}: tensor {short(name)} is stored as {tag}; a weight must be one of "
                               f"{', '.join(sorted(FLOAT_TAGS))}")
        return self.get(name)

    def check(
        self,
        expected: dict[str, tuple[int, ...]],
        *,
        optional: Iterable[str] = (),
        ignore: Callable[[str], bool] | None = None,
    ) -> None:
        """Raise one WeightsError listing every missing, unexpected and mis-shaped tensor; return if none.

        `optional` names may be absent (and, when present, are not unexpected); `ignore(name)` marks present
        tensors that the model does not use (e.g. is_ignorable_buffer). Optional names found in `expected`
        are still shape-checked.
        """
        shapes = {n: self.shape(n) for n in self._tensors}
        check_tensors(shapes, expected, ", ".join(str(f) for f in self.files()), optional=optional, ignore=ignore)

    def _raw(self, name: str) -> RawTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise WeightsError(f"no tensor {short(name)} in {', '.join(str(f) for f in self.files())}") from None


class StoreView(Mapping[str, np.ndarray]):
    """Some of a store's tensors as a Mapping, read (and converted to float32) only when accessed."""

    def __init__(self, store: TensorStore, names: set[str], prefix: str, on_read: Callable[[], None] | None) -> None:
        self.store, self.names, self.prefix, self.on_read = store, names, prefix, on_read

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        if self.on_read is not None:
            self.on_read()
        return self.store.weight(self.prefix + name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header: nothing is read (weights/checked.check_shapes)."""
        if name not in self.names:
            raise KeyError(name)
        return self.store.shape(self.prefix + name)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def open_file(path: Path) -> TensorStore:
    """Open one weight file (safetensors or torch zip-pickle, told apart by its first bytes)."""
    path = Path(path)
    tensors, metadata = _read_any(path)
    return TensorStore(tensors, dict.fromkeys(tensors, path), metadata)


def open_checkpoint(model_dir: Path) -> TensorStore:
    """Open the weights of a Hugging Face model directory (see CHECKPOINT_FILES for the order tried)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFound(f"{model_dir}: not a directory; expected a model directory holding the weight files")
    for filename in CHECKPOINT_FILES:
        path = model_dir / filename
        if path.is_file():
            return _open_index(path) if filename.endswith(".index.json") else open_file(path)
    raise WeightsError(f"{model_dir}: no weight file found; looked for {', '.join(CHECKPOINT_FILES)}")


def _open_index(index_path: Path) -> TensorStore:
    """Open the shards an index's weight_map names, checking that each shard holds the tensors mapped to it."""
    weight_map = read_json_object(index_path, WeightsError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    tensors: dict[str, RawTensor] = {}
    files: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for shard_name in sorted(set(weight_map.values())):
        plain = Path(shard_name).name == shard_name and shard_name.isprintable() and len(shard_name.encode()) <= 255
        if not plain:
            raise WeightsError(f"{index_path}: shard {short(shard_name)} is not a plain file name in the same "
                               "directory")
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise WeightsError(f"{index_path}: names shard {shard_name}, which is missing from {index_path.parent}")
        shard_tensors, shard_metadata = _read_any(shard)
        metadata = metadata or shard_metadata
        for name, raw in shard_tensors.items():
            if name in tensors:
                raise WeightsError(f"{index_path}: tensor {short(name)} is in both {files[name].name} and {shard_name}")
            tensors[name], files[name] = raw, shard
    for name, shard_name in weight_map.items():
        if files.get(name, Path()).name != shard_name:
            raise WeightsError(f"{index_path}: maps {short(name)} to {shard_name}, but that shard does not hold it")
    return TensorStore(tensors, files, metadata)


def file_kind(path: Path) -> str | None:
    """What a weight file is by its first bytes: "GGUF", "safetensors", "PyTorch zip" or None."""
    head = _head(path, 9)
    if head[:4] == GGUF_MAGIC:
        return "GGUF"
    if head[:4] == ZIP_MAGIC:
        return "PyTorch zip"
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else None


def first_bytes(path: Path, n: int = 8) -> str:
    """The first n bytes of a file in hex and as text, for messages about a file of unknown kind."""
    head = _head(path, n)
    return f"{head.hex(' ')} ({head!r})" if head else "none: the file is empty"


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:  # no permission, a directory, ...
        raise WeightsError(f"{path}: cannot read it ({e.strerror or e})") from None


def _read_any(path: Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """(tensors, metadata); dispatch on magic bytes: a zip is a torch checkpoint, a length + '{' safetensors."""
    kind = file_kind(path)
    if kind == "PyTorch zip":
        return read_torch_bin(path), {}
    if kind == "safetensors":
        return read_safetensors_with_metadata(path)
    raise WeightsError(f"{path}: neither a safetensors file nor a PyTorch zip checkpoint (first bytes: "
                       f"{first_bytes(path)})")
