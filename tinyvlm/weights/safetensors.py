"""Reader for the safetensors format, written from its published layout (huggingface/safetensors README).

A file is: an 8-byte little-endian header length N, N bytes of JSON, then one flat data buffer.
The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
buffer), plus an optional "__metadata__" dict of strings. The file is memory-mapped once; every tensor is a
read-only zero-copy view into that map. Every entry is validated before any view is made, as the reference
implementation validates it: a header that lies about dtypes, shapes or offsets, or whose tensors overlap, leave
holes or do not end where the file ends, is a WeightsError naming the tensor and the file.

This module also defines the dtype tags and the `RawTensor` record that the .bin reader shares.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinyvlm.errors import WeightsError
from tinyvlm.limits import MAX_DIMS, MAX_ELEMENTS, MAX_JSON_BYTES, MAX_TENSORS, elements, parse_json, short

# Tag -> storage dtype, always little endian. BF16 has no NumPy dtype: its raw 16-bit patterns are kept as uint16.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16"})


class RawTensor(NamedTuple):
    """A tensor as stored: its dtype tag and a read-only view with the storage dtype (uint16 for BF16)."""

    dtype: str
    data: np.ndarray


def map_file(path: Path) -> np.ndarray:
    """Memory-map a whole file read-only as bytes (a plain ndarray whose base is the np.memmap)."""
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: file is empty")
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


def read_safetensors(path: Path) -> dict[str, RawTensor]:
    """Parse and validate one .safetensors file; return name -> RawTensor views into one memory map."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path: Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """As read_safetensors, plus the header's "__metadata__" (a dict of strings, empty when absent)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, the header length alone takes 8)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_JSON_BYTES or 8 + header_len > size:
            raise WeightsError(
                f"{path}: truncated or not a safetensors file: header of {header_len} bytes claimed, "
                f"file has {size} bytes"
            )
        header_bytes = f.read(header_len)
    header = parse_json(header_bytes, f"{path}: safetensors header", WeightsError)
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: safetensors __metadata__ must map strings to strings")

    if len(header) > MAX_TENSORS:
        raise WeightsError(f"{path}: {len(header)} tensors; the limit is {MAX_TENSORS}")
    buffer_len = size - 8 - header_len
    entries = {name: _validate_entry(path, name, info, buffer_len) for name, info in header.items()}
    _check_layout(path, entries, buffer_len)
    if not entries:
        return {}, metadata
    data = map_file(path)[8 + header_len :]  # the flat buffer; offsets below are relative to it
    tensors = {}
    for name, (tag, shape, begin, end) in entries.items():
        view = data[begin:end].view(DTYPES[tag]).reshape(shape)
        tensors[name] = RawTensor(tag, view)
    return tensors, metadata


def _validate_entry(path: Path, name: str, info: object, buffer_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """Check one header entry against itself and the buffer size; return (tag, shape, begin, end)."""
    where = f"{path}: tensor {short(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise WeightsError(f"{where}: header entry must have exactly dtype, shape and data_offsets, got {short(info)}")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str) or tag not in DTYPES:
        raise WeightsError(f"{where}: unsupported dtype {short(tag)} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape) \
            or elements(shape) > MAX_ELEMENTS:
        raise WeightsError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers of at most "
                           f"{MAX_ELEMENTS} elements, got {short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise WeightsError(f"{where}: data_offsets must be two non-negative integers, got {short(offsets)}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[tag].itemsize
    if end < begin or end - begin != nbytes:
        raise WeightsError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, but {tag} {shape} needs {nbytes}"
        )
    if end > buffer_len:
        raise WeightsError(
            f"{where}: data_offsets {offsets} run past the end of the data ({buffer_len} bytes); file truncated?"
        )
    return tag, tuple(shape), begin, end


def _check_layout(path: Path, entries: dict[str, tuple[str, tuple[int, ...], int, int]], buffer_len: int) -> None:
    """The tensors must tile the data buffer exactly, in offset order: no overlap, no hole, no bytes left over."""
    expected_begin = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != expected_begin:
            what = "overlaps the tensor before it" if begin < expected_begin else "leaves a hole before it"
            raise WeightsError(f"{path}: tensor {short(name)} starts at data offset {begin}, expected {expected_begin}: "
                               f"it {what}")
        expected_begin = end
    if expected_begin != buffer_len:
        raise WeightsError(f"{path}: the tensors end at data offset {expected_begin}, but the data buffer has "
                           f"{buffer_len} bytes")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
