"""Reader for PyTorch `pytorch_model.bin` files (the zip-pickle format of torch.save since torch 1.6), torch-free.

Layout (mobilevlm.md 3.5): a zip archive with `<root>/data.pkl` (a pickle of the state dict) and one member
`<root>/data/<key>` per storage, raw little-endian bytes, plus `<root>/byteorder` in recent files. Tensors in
the pickle are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls, sometimes wrapped in
`torch._tensor._rebuild_from_type_v2(func, torch.Tensor, args, state)` or `torch._utils._rebuild_parameter`;
storages arrive through `persistent_load(('storage', <StorageType>, key, location, numel))`.

A pickle can call any importable function, so the unpickler here resolves only those rebuild globals (to our
own NumPy versions) and refuses every other global before anything runs. Storage members are stored
uncompressed by torch, so they are zero-copy views into one memory map of the whole file; a compressed member
(a re-zipped checkpoint) is read into memory, at most INFLATE_RATIO times the file's size in all, so that a zip
bomb is refused. Every tensor is a view that fits its storage; one whose elements share memory (an expanded
tensor, stride 0) counts its bytes against the same budget, since reading it makes them.
"""
from __future__ import annotations

import collections
import io
import lzma
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from tinyvlm.errors import WeightsError
from tinyvlm.limits import MAX_DIMS, MAX_ELEMENTS, MAX_PICKLE_BYTES, MAX_TENSORS, elements, short
from tinyvlm.weights.safetensors import DTYPES, RawTensor, map_file

ZIP_MAGIC = b"PK\x03\x04"
INFLATE_RATIO = 16  # compressed members may inflate to this many times the file's size (plus INFLATE_SLACK)
INFLATE_SLACK = 64 * 2**20
# What zipfile raises for a corrupt archive, besides BadZipFile: RuntimeError for an encrypted member,
# NotImplementedError for an unknown compression method, UnicodeDecodeError (a ValueError) for a name that is not
# UTF-8, and the decompressors' own errors.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError, OSError,
              ValueError, struct.error, zlib.error, lzma.LZMAError, OverflowError)

# torch.<Name>Storage -> dtype tag. These globals only ever appear as markers inside persistent ids.
STORAGE_TAGS = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


class _StorageType(NamedTuple):
    """What the unpickler hands out for `torch.FloatStorage` and friends: just the dtype tag."""

    tag: str


class _TensorType:
    """What the unpickler hands out for `torch.Tensor` (the only type `_rebuild_from_type_v2` may rebuild)."""


_TENSOR_TYPE = _TensorType()


class _Storage(NamedTuple):
    """One storage: its dtype tag and a flat read-only view of its elements."""

    tag: str
    data: np.ndarray


def read_torch_bin(path: Path) -> dict[str, RawTensor]:
    """Read a torch.save'd state dict; return name -> RawTensor views (uint16 patterns for bf16)."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != ZIP_MAGIC:
        legacy = magic[:1] == b"\x80"  # a bare pickle: the format torch.save wrote before 1.6
        hint = " (it looks like the pre-1.6 torch format; re-save it with a newer torch)" if legacy else ""
        raise WeightsError(f"{path}: not a PyTorch zip checkpoint (no zip signature){hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            return _ZipCheckpoint(path, archive).load()
    except ZIP_ERRORS as e:
        raise WeightsError(f"{path}: truncated or corrupt zip archive ({type(e).__name__}: {e})") from None


class _ZipCheckpoint:
    """The open archive plus what the unpickler needs: the storage loader and the rebuild functions."""

    def __init__(self, path: Path, archive: zipfile.ZipFile) -> None:
        self.path = path
        self.archive = archive
        self.root = self._find_root()
        self.byteorder = self._read_byteorder()
        self.file_bytes: np.ndarray | None = None  # the memory map, made on the first stored member
        self.storages: dict[str, _Storage] = {}
        self.inflate_budget = INFLATE_RATIO * Path(path).stat().st_size + INFLATE_SLACK  # bytes left to decompress

    def load(self) -> dict[str, RawTensor]:
        pickle_info = self.archive.getinfo(f"{self.root}/data.pkl")
        if pickle_info.file_size > MAX_PICKLE_BYTES:
            raise WeightsError(f"{self.path}: data.pkl has {pickle_info.file_size} bytes, above the limit of "
                               f"{MAX_PICKLE_BYTES}")
        with self.archive.open(pickle_info) as member:
            pickled = member.read(MAX_PICKLE_BYTES + 1)
        unpickler = _RestrictedUnpickler(io.BytesIO(pickled), self)
        try:
            state = unpickler.load()
        except WeightsError:
            raise
        except Exception as e:  # anything a malformed pickle can raise; no foreign code has run
            raise WeightsError(f"{self.path}: malformed data.pkl ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise WeightsError(f"{self.path}: expected a state dict (name -> tensor), found {type(state).__name__}")
        if len(state) > MAX_TENSORS:
            raise WeightsError(f"{self.path}: {len(state)} tensors; the limit is {MAX_TENSORS}")
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, RawTensor):
                raise WeightsError(
                    f"{self.path}: expected a state dict (name -> tensor), found {type(value).__name__} at "
                    f"{short(name)}"
                )
        return dict(state)

    def _find_root(self) -> str:
        names = self.archive.namelist()
        roots = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1:
            raise WeightsError(f"{self.path}: zip archive without exactly one <root>/data.pkl; not a torch checkpoint")
        return roots[0]

    def _read_byteorder(self) -> str:
        try:
            info = self.archive.getinfo(f"{self.root}/byteorder")
        except KeyError:
            return "little"  # files from before the member existed are little endian
        with self.archive.open(info) as member:
            order = member.read(16).decode("ascii", "replace").strip()  # 16 bytes at most: it may be a zip bomb
        if order not in ("little", "big"):
            raise WeightsError(f"{self.path}: unknown byteorder {short(order)}")
        return order

    def storage(self, tag: str, key: str, numel: int) -> _Storage:
        """The storage `<root>/data/<key>` as `numel` elements of `tag`, loaded once per key."""
        if key not in self.storages:
            dtype = DTYPES[tag] if self.byteorder == "little" else DTYPES[tag].newbyteorder(">")
            raw = self._member_bytes(f"{self.root}/data/{key}", numel * dtype.itemsize)
            self.storages[key] = _Storage(tag, raw.view(dtype))
        storage = self.storages[key]
        if storage.tag != tag or storage.data.size != numel:
            raise WeightsError(f"{self.path}: storage {short(key)} is referenced with two different dtypes or sizes")
        return storage

    def _member_bytes(self, member: str, nbytes: int) -> np.ndarray:
        """The first `nbytes` of a member: a view of the memory map if stored, else decompressed into memory."""
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise WeightsError(
                f"{self.path}: the pickle refers to storage {short(member)}, which is not in the archive"
            ) from None
        if info.file_size < nbytes:
            raise WeightsError(f"{self.path}: storage {short(member)} has {info.file_size} bytes, the pickle needs {nbytes}")
        if info.compress_type != zipfile.ZIP_STORED:
            self._inflate(nbytes, f"compressed storage {short(member)}")
            with self.archive.open(info) as f:
                data = f.read(nbytes)
            if len(data) < nbytes:
                raise WeightsError(f"{self.path}: compressed storage {short(member)} ends after {len(data)} of {nbytes} "
                                   "bytes")
            return np.frombuffer(data, dtype=np.uint8)
        if self.file_bytes is None:
            self.file_bytes = map_file(self.path)
        start = self._data_offset(info)
        if start + info.file_size > self.file_bytes.size:
            raise WeightsError(f"{self.path}: storage {short(member)} runs past the end of the file; truncated?")
        return self.file_bytes[start : start + nbytes]

    def _inflate(self, nbytes: int, what: str) -> None:
        """Spend `nbytes` of the budget for bytes that are not in the file as such (see the module docstring)."""
        if nbytes > self.inflate_budget:
            raise WeightsError(f"{self.path}: {what} would make the checkpoint inflate past {INFLATE_RATIO} times "
                               "the file's size in memory; refused as a zip or stride bomb")
        self.inflate_budget -= nbytes

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its 30-byte local header, name and extra field."""
        header = bytes(self.file_bytes[info.header_offset : info.header_offset + 30])
        if len(header) < 30 or header[:4] != ZIP_MAGIC:
            raise WeightsError(f"{self.path}: bad local zip header for {short(info.filename)}; truncated?")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        return info.header_offset + 30 + name_len + extra_len

    # ---- the rebuild functions the pickle may call (our versions of torch's) ----

    def rebuild_tensor(self, storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> RawTensor:
        """torch._utils._rebuild_tensor_v2: a strided view of a storage, bounds-checked before it is made."""
        if not isinstance(storage, _Storage):
            raise WeightsError(f"{self.path}: a tensor is rebuilt from something that is not a storage")
        if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride) \
                or len(size) > MAX_DIMS or not all(type(i) is int and i >= 0 for i in (offset, *size, *stride)) \
                or elements(size) > MAX_ELEMENTS:
            raise WeightsError(f"{self.path}: bad tensor geometry: offset {short(offset)}, size {short(size)}, "
                               f"stride {short(stride)}")
        count = math.prod(size)
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if count else 0
        if count > storage.data.size:  # dims of stride 0 (an expanded tensor): reading it copies the shared elements
            self._inflate(count * storage.data.itemsize, f"a tensor of size {size} from {storage.data.size} elements")
        if extent > storage.data.size:
            raise WeightsError(
                f"{self.path}: a tensor of size {tuple(size)}, stride {tuple(stride)} at offset {offset} "
                f"does not fit its storage of {storage.data.size} elements"
            )
        flat = storage.data[offset:]
        if _is_contiguous(size, stride):
            view = flat[:count].reshape(size)
        else:
            strides = [s * flat.itemsize for s in stride]
            view = np.lib.stride_tricks.as_strided(flat, shape=size, strides=strides, writeable=False)
        return RawTensor(storage.tag, view)

    def rebuild_from_type(self, func: Callable[..., Any], new_type: object, args: tuple, _state: object) -> Any:
        """torch._tensor._rebuild_from_type_v2: only plain torch.Tensor; Python attributes (state) are dropped."""
        if new_type is not _TENSOR_TYPE:
            raise WeightsError(f"{self.path}: refuses to load: a tensor of a type other than torch.Tensor")
        return func(*args)

    def rebuild_parameter(self, data: RawTensor, *_: Any) -> RawTensor:
        """torch._utils._rebuild_parameter: an nn.Parameter is just its tensor here."""
        return data


def _is_contiguous(size: tuple, stride: tuple) -> bool:
    """Whether (size, stride) is the C-order layout (dims of size 1 may have any stride)."""
    expected = 1
    for n, s in reversed(list(zip(size, stride))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the tensor-rebuild globals; every other global is refused before it can be called."""

    def __init__(self, file: io.BytesIO, checkpoint: _ZipCheckpoint) -> None:
        super().__init__(file)
        self.checkpoint = checkpoint
        self.allowed: dict[str, object] = {
            "torch._utils._rebuild_tensor_v2": checkpoint.rebuild_tensor,
            "torch._tensor._rebuild_from_type_v2": checkpoint.rebuild_from_type,
            "torch._utils._rebuild_parameter": checkpoint.rebuild_parameter,
            "torch.Tensor": _TENSOR_TYPE,
            "collections.OrderedDict": collections.OrderedDict,
        }
        self.allowed.update({f"torch.{name}": _StorageType(tag) for name, tag in STORAGE_TAGS.items()})

    def find_class(self, module: str, name: str) -> object:
        qualified = f"{module}.{name}"
        if qualified not in self.allowed:
            raise WeightsError(
                f"{self.checkpoint.path}: refuses to load: the pickle asks for global {short(qualified)}; "
                "only tensor data is allowed"
            )
        return self.allowed[qualified]

    def persistent_load(self, pid: Any) -> _Storage:
        """('storage', StorageType, key, location, numel) -> the storage's elements."""
        ok = (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[4] >= 0
        )
        if not ok:
            raise WeightsError(f"{self.checkpoint.path}: unexpected persistent id in data.pkl: {short(pid)}")
        _, kind, key, _location, numel = pid
        return self.checkpoint.storage(kind.tag, key, numel)
