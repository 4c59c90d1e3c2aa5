"""GGUF reader (versions 2 and 3): metadata, tensor infos and tensors as zero-copy memory-mapped views.

Follows the GGUF specification (ggml docs/gguf.md) and the layout of gguf-py's reader (style.md b12): the file
is memory-mapped once and a cursor walks the little-endian header:

    magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count
    metadata:     string key, uint32 value type, value          (strings: uint64 length + UTF-8 bytes)
    tensor infos: string name, uint32 n_dims, n_dims x uint64 ne, uint32 ggml type, uint64 offset
    padding to `general.alignment` (default 32), then the data section; offsets are relative to its start.

Every count is checked against the bytes left before anything is built from it, arrays of arrays nest at most
MAX_NESTING deep, the metadata arrays hold at most MAX_ARRAY_ITEMS values in all, and the tensors must lie in the
data section as llama.cpp requires: in order, each at the previous one's end rounded up to the alignment.

ggml lists dimensions fastest first (ne[0] is the contiguous one), so a weight with ne = [in, out] is our
(out, in): shapes are reversed here, once. Block types and dequantizers live in gguf_quants.py.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.errors import WeightsError
from tinyvlm.limits import MAX_ARRAY_ITEMS, MAX_ELEMENTS, MAX_TENSORS, MAX_NESTING, elements, short
from tinyvlm.weights import gguf_quants
from tinyvlm.weights.pages import release

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# Metadata value types (gguf_metadata_value_type): struct formats of the fixed-size ones, in id order uint8,
# int8, uint16, int16, uint32, int32, float32, bool, (string, array), uint64, int64, float64.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True, eq=False)  # eq=False: `raw` is an array
class GGUFTensor:
    """One tensor: its ggml type name ("F32", "Q4_K", ...), our shape (ggml's ne reversed) and its bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8 (bytes,): a read-only view into the memory-mapped file


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file; its tensors stay views of the one memory map."""

    path: Path
    version: int
    metadata: dict[str, Any]  # ints, floats, bools, strings, and lists of those
    tensors: dict[str, GGUFTensor]
    alignment: int
    data_offset: int  # where the data section starts


class _Cursor:
    """Reads little-endian values from the mapped bytes, turning a read past the end into WeightsError."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path
        self.items_left = MAX_ARRAY_ITEMS  # metadata array values still allowed

    def count(self, what: str, min_bytes: int) -> int:
        """A uint64 count of things that take at least `min_bytes` each, checked against the bytes left."""
        n = self.scalar("<Q", what)
        if n * min_bytes > len(self.buf) - self.pos:
            raise WeightsError(f"{self.path}: {what} is {n}, but {len(self.buf) - self.pos} bytes are left for them "
                               f"(each takes at least {min_bytes}): the count is corrupt or the file truncated")
        return n

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise WeightsError(f"{self.path}: truncated GGUF header: {what} at byte {self.pos} needs {n} bytes, "
                               f"the file has {len(self.buf)}")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise WeightsError(f"{self.path}: {what} is not valid UTF-8 ({err})") from None

    def value(self, type_id: int, what: str, depth: int = 0) -> Any:
        if type_id == STRING:
            return self.string(what)
        if type_id == ARRAY:
            if depth >= MAX_NESTING:
                raise WeightsError(f"{self.path}: {what} nests arrays more than {MAX_NESTING} deep")
            return self.array(what, depth + 1)
        if type_id not in _SCALARS:
            raise WeightsError(f"{self.path}: {what} has unknown GGUF value type {type_id}")
        return self.scalar(_SCALARS[type_id], what)

    def array(self, what: str, depth: int) -> list[Any]:
        item_type = self.scalar("<I", what)
        size = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8 if item_type == STRING else 12
        n = self.count(f"{what} length", size)  # a string takes 8 bytes or more, an array 12
        if n > self.items_left:
            raise WeightsError(f"{self.path}: {what} has {n} values; the metadata arrays may hold "
                               f"{MAX_ARRAY_ITEMS} in all")
        self.items_left -= n
        if item_type in _SCALARS:  # fixed size: one NumPy read for the whole array
            values = np.frombuffer(self.buf, dtype=np.dtype(_SCALARS[item_type]), count=n, offset=self.pos).tolist()
            self.pos += n * size
            return values
        return [self.value(item_type, f"{what}[{i}]", depth) for i in range(n)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and map its tensors; see the module docstring for the layout."""
    path = Path(path)
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except (OSError, ValueError) as err:  # ValueError: numpy cannot map an empty file
        raise WeightsError(f"{path}: cannot map it as a GGUF file ({err})") from None
    cur = _Cursor(memoryview(mapped), path)
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        raise WeightsError(f"{path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version in (2 << 24, 3 << 24) else ""
        raise WeightsError(f"{path}: unsupported GGUF version {version}{hint}; tinyvlm reads versions 2 and 3")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.count("metadata count", 8 + 4 + 1)  # key length, value type, one byte of value
    if n_tensors * (8 + 4 + 8 + 4 + 8) > len(cur.buf):  # name length, n_dims, one dim, type, offset
        raise WeightsError(f"{path}: tensor count {n_tensors} cannot fit in {len(cur.buf)} bytes: the count is "
                           "corrupt or the file truncated")
    if max(n_tensors, n_kv) > MAX_TENSORS:
        raise WeightsError(f"{path}: {n_tensors} tensors and {n_kv} metadata keys; the limit is {MAX_TENSORS} each")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise WeightsError(f"{path}: metadata key {short(key)} appears twice")
        metadata[key] = cur.value(cur.scalar("<I", f"type of {short(key)}"), f"metadata {short(key)}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    power_of_two = type(alignment) is int and alignment > 0 and not alignment & (alignment - 1)
    if not power_of_two:
        raise WeightsError(f"{path}: general.alignment is {short(alignment)}, expected a power of two")

    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.pos // alignment) * alignment  # round up
    tensors: dict[str, GGUFTensor] = {}
    expected_offset = 0
    for name, ne, type_id, offset in infos:
        if name in tensors:
            raise WeightsError(f"{path}: tensor {short(name)} appears twice")
        if offset != expected_offset:
            raise WeightsError(f"{path}: tensor {short(name)} is at data offset {offset}, expected {expected_offset} "
                               "(tensors lie in order, each aligned after the one before)")
        tensors[name] = _map_tensor(mapped, path, name, ne, type_id, offset, data_offset)
        expected_offset = -(-(offset + tensors[name].raw.size) // alignment) * alignment
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset)


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, list[int], int, int]:
    name = cur.string(f"tensor {i} name")
    n_dims = cur.scalar("<I", f"tensor {short(name)} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise WeightsError(f"{cur.path}: tensor {short(name)} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    ne = [cur.scalar("<Q", f"tensor {short(name)} dims") for _ in range(n_dims)]
    if elements(ne) > MAX_ELEMENTS:
        raise WeightsError(f"{cur.path}: tensor {short(name)} has dimensions {ne}, more than {MAX_ELEMENTS} elements")
    type_id = cur.scalar("<I", f"tensor {short(name)} type")
    offset = cur.scalar("<Q", f"tensor {short(name)} offset")
    return name, ne, type_id, offset


def _map_tensor(mapped: np.ndarray, path: Path, name: str, ne: list[int], type_id: int, offset: int,
                data_offset: int) -> GGUFTensor:
    kind = gguf_quants.SUPPORTED.get(type_id)
    if kind is None:
        known = gguf_quants.OTHER_TYPE_NAMES.get(type_id)
        what = f"type {known} (ggml type {type_id}), which tinyvlm does not read" if known else \
            f"unknown ggml type {type_id}"
        raise WeightsError(f"{path}: tensor {short(name)} has {what}; supported: {', '.join(gguf_quants.BY_NAME)}")
    if ne[0] % kind.block_size:
        raise WeightsError(f"{path}: tensor {short(name)} has {ne[0]} values per row, not a multiple of the "
                           f"{kind.name} block size {kind.block_size}")
    size = gguf_quants.nbytes(kind.name, math.prod(ne))
    start = data_offset + offset
    if start + size > mapped.size:
        raise WeightsError(f"{path}: tensor {short(name)} ({kind.name}, {size} bytes at byte {start}) runs past the "
                           f"end of the file ({mapped.size} bytes): the file is truncated or corrupt")
    return GGUFTensor(name, kind.name, tuple(reversed(ne)), mapped[start : start + size])


def to_float32(tensor: GGUFTensor) -> np.ndarray:
    """The tensor as float32 in our shape: a read-only view for F32, dequantized (a new array) otherwise."""
    if tensor.type_name == "F32":
        return tensor.raw.view(np.float32).reshape(tensor.shape)
    values = gguf_quants.dequantize(tensor.raw, tensor.type_name, tensor.shape)
    release(tensor.raw)  # the file's pages: copied (weights/pages.py)
    return values
