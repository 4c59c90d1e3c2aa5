"""Hostile weight files, one kind each: every one is a WeightsError naming the file and what is wrong, read in
process and bounded (nothing here recurses on the file's nesting or allocates from a size the file has not backed).
The fuzz tests (tests/test_fuzz.py) mutate whole models at random; these pin down each kind by hand."""
from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_weights import StorageRef, TensorSpec, TorchLikePickler, write_safetensors, zip_with_pickle
from tests.test_weights_gguf import _str, error_of, pack_gguf
from tinyvlm.errors import WeightsError
from tinyvlm.limits import MAX_ARRAY_ITEMS, MAX_NESTING, MAX_TENSORS
from tinyvlm.weights import open_file

BACKEND_FREE = True
F32 = np.arange(6, dtype="<f4").tobytes()  # 24 bytes


def refused(path: Path, pattern: str) -> str:
    with pytest.raises(WeightsError, match=pattern) as info:
        open_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 1000
    return message


# ---- safetensors: the layout the reference implementation validates ----

@pytest.mark.parametrize("offsets, message", [
    ([[0, 12], [8, 20]], r"'b' starts at data offset 8, expected 12: it overlaps the tensor before it"),
    ([[0, 12], [16, 28]], r"'b' starts at data offset 16, expected 12: it leaves a hole before it"),
    ([[4, 16], [16, 28]], r"'a' starts at data offset 4, expected 0: it leaves a hole"),  # shifted
    ([[0, 12], [12, 24]], None),
])
def test_safetensors_offsets_tile_the_buffer(tmp_path: Path, offsets: list, message: str | None) -> None:
    header = {name: {"dtype": "F32", "shape": [3], "data_offsets": o} for name, o in zip("ab", offsets)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, header, F32 + bytes(max(0, offsets[-1][1] - 24)))
    if message is None:
        assert open_file(path).get("b").tolist() == [3, 4, 5]
    else:
        refused(path, message)


def test_safetensors_bytes_left_over(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "t.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, F32)
    refused(tmp_path / "t.safetensors", "the tensors end at data offset 12, but the data buffer has 24 bytes")


@pytest.mark.parametrize("entry, message", [
    ({"dtype": ["F32"], "shape": [6], "data_offsets": [0, 24]}, r"unsupported dtype \['F32'\]"),
    ({"dtype": {"F32": 1}, "shape": [6], "data_offsets": [0, 24]}, "unsupported dtype"),
    ({"dtype": "F32", "shape": [1] * 9 + [6], "data_offsets": [0, 24]}, "at most 8 non-negative integers"),
    ({"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 24]}, "of at most 281474976710656 elements"),
    ({"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 24]}, "span 24 bytes, but F32"),
    ({"dtype": "F32", "shape": [6.0], "data_offsets": [0, 24]}, "shape must be"),
    ({"dtype": "F32", "shape": [6], "data_offsets": [0, 24.0]}, "data_offsets must be"),
])
def test_safetensors_header_types(tmp_path: Path, entry: dict, message: str) -> None:
    write_safetensors(tmp_path / "t.safetensors", {"w": entry}, F32)
    refused(tmp_path / "t.safetensors", message)


@pytest.mark.parametrize("header, message", [
    (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deep"),
    (b'{"w": {"dtype": "F32", "shape": [' + b"6" * 5000 + b'], "data_offsets": [0, 24]}}', "5000 digits"),
    (b'{"__metadata__": {"a": 5}}', "must map strings to strings"),
])
def test_safetensors_hostile_json(tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + F32)
    refused(path, message)


def test_relabelled_dtype_is_not_a_weight(tmp_path: Path) -> None:
    """bf16 bits relabelled I16 parse as a valid file, but a model never reads integers as weights."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(4, 4, dtype=torch.bfloat16)}, str(path))
    data = bytearray(path.read_bytes())
    at = data.index(b'"BF16"')
    data[at:at + 6] = b'"I16" '  # same length, still JSON
    path.write_bytes(bytes(data))
    store = open_file(path)
    assert store.dtype("w") == "I16"
    with pytest.raises(WeightsError, match=r"tensor 'w' is stored as I16; a weight must be one of BF16, F16, F32"):
        store.view(["w"])["w"]


# ---- torch zip ----

def _rezip(src: Path, dst: Path, edit) -> None:
    """Copy a zip, letting `edit(raw_bytes)` patch the result."""
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))


def test_zip_member_name_not_utf8(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(3)}, tmp_path / "a.bin")

    def edit(data: bytearray) -> None:  # set the UTF-8 flag on every entry and break one name's bytes
        for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            pos = data.find(sig)
            while pos >= 0:
                data[pos + flag_at] |= 0x08  # bit 11 (0x800) is in the flags' high byte
                data[pos + flag_at + 1] |= 0x08
                pos = data.find(sig, pos + 4)
        name = data.rfind(b"data.pkl")
        data[name] = 0xFF
    _rezip(tmp_path / "a.bin", tmp_path / "b.bin", edit)
    refused(tmp_path / "b.bin", "corrupt zip archive|not exactly one")


def test_zip_encrypted_flag(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(3)}, tmp_path / "a.bin")

    def edit(data: bytearray) -> None:
        for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            pos = data.find(sig)
            while pos >= 0:
                data[pos + flag_at] |= 0x01  # "encrypted"
                pos = data.find(sig, pos + 4)
    _rezip(tmp_path / "a.bin", tmp_path / "b.bin", edit)
    refused(tmp_path / "b.bin", r"corrupt zip archive \(RuntimeError: .*encrypted")


def test_zip_bomb_member(tmp_path: Path) -> None:
    """A compressed storage that would inflate far past the file's size is refused before it is inflated."""
    numel = 2**27  # 512 MiB of float32 from a file of about 0.5 MiB
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump({"w": TensorSpec(StorageRef("0", numel), 0, (numel,), (1,))})
    path = tmp_path / "bomb.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", bytes(numel * 4))
    assert path.stat().st_size < 2**20
    refused(path, "compressed storage 'archive/data/0' would make the checkpoint inflate past 16 times")


def test_stride_bomb(tmp_path: Path) -> None:
    """A tensor of 2**40 elements over one stored float (stride 0): reading it would make 4 TiB."""
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump({"w": TensorSpec(StorageRef("0", 1), 0, (2**20, 2**20), (0, 0))})
    zip_with_pickle(tmp_path / "s.bin", buf.getvalue())
    with zipfile.ZipFile(tmp_path / "s.bin", "a") as z:
        z.writestr("archive/data/0", bytes(4))
    refused(tmp_path / "s.bin", r"a tensor of size \(1048576, 1048576\) from 1 elements would make the checkpoint")


def test_pickle_geometry_types(tmp_path: Path) -> None:
    for size, stride in (([3], [1]), ((3.0,), (1,)), ((True,), (1,)), ((1,) * 9, (1,) * 9)):
        buf = io.BytesIO()
        TorchLikePickler(buf, protocol=2).dump({"w": TensorSpec(StorageRef("0", 3), 0, size, stride)})
        zip_with_pickle(tmp_path / "g.bin", buf.getvalue())
        with zipfile.ZipFile(tmp_path / "g.bin", "a") as z:
            z.writestr("archive/data/0", bytes(12))
        refused(tmp_path / "g.bin", "bad tensor geometry")


def test_deep_pickle_is_one_line(tmp_path: Path) -> None:
    """A persistent id nested 100k deep: the unpickler does not recurse and the message is shortened."""
    # PROTO 2, EMPTY_TUPLE, TUPLE1 x 100k (each wraps the one before), BINPERSID, STOP
    zip_with_pickle(tmp_path / "d.bin", b"\x80\x02" + b")" + b"\x85" * 100_000 + b"Q.")
    refused(tmp_path / "d.bin", r"unexpected persistent id in data.pkl: \(\(\(")


# ---- GGUF header ----

def _array_header(depth: int) -> bytes:
    """A metadata value: arrays of one array, `depth` deep, ending in an empty array of uint8."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)


def test_gguf_nested_arrays(tmp_path: Path) -> None:
    ok = pack_gguf(_str("k") + struct.pack("<I", 9) + _array_header(MAX_NESTING), 1)
    (tmp_path / "ok.gguf").write_bytes(ok)
    deep = pack_gguf(_str("k") + struct.pack("<I", 9) + _array_header(100_000), 1)
    assert f"nests arrays more than {MAX_NESTING} deep" in error_of(tmp_path, deep)


@pytest.mark.parametrize("kv, message", [
    (_str("k") + struct.pack("<IIQ", 9, 8, 2**40), r"length is 1099511627776, but \d+ bytes are left"),  # strings
    (_str("k") + struct.pack("<IIQ", 9, 4, 2**62), "length is 4611686018427387904"),
    (_str("k") + struct.pack("<IIQ", 9, 0, MAX_ARRAY_ITEMS + 1) + bytes(MAX_ARRAY_ITEMS + 1),
     f"the metadata arrays may hold {MAX_ARRAY_ITEMS} in all"),
])
def test_gguf_array_lengths(tmp_path: Path, kv: bytes, message: str) -> None:
    assert re.search(message, error_of(tmp_path, pack_gguf(kv, 1)))


def test_gguf_dims_with_a_zero(tmp_path: Path) -> None:
    """0 bytes pass any bounds check: the other dimensions are bounded on their own (found by the fuzz tests)."""
    bad = pack_gguf(infos=[("w", [0, 2**63, 2**64 - 1, 64], 0, 0)])
    assert "'w' has dimensions [0, 9223372036854775808, 18446744073709551615, 64], more than" in error_of(tmp_path, bad)


def test_gguf_counts_against_the_file(tmp_path: Path) -> None:
    assert "metadata count is 1152921504606846976, but" in error_of(tmp_path, pack_gguf(n_kv=2**60))
    lie = bytearray(pack_gguf())
    lie[8:16] = struct.pack("<Q", 2**40)  # tensor count
    assert "tensor count 1099511627776 cannot fit" in error_of(tmp_path, bytes(lie))


def test_tensor_and_key_counts_are_bounded(tmp_path: Path) -> None:
    many = pack_gguf(b"".join(_str(f"k{i}") + struct.pack("<IB", 0, 0) for i in range(MAX_TENSORS + 1)),
                     MAX_TENSORS + 1)
    assert f"the limit is {MAX_TENSORS} each" in error_of(tmp_path, many)
    header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    write_safetensors(tmp_path / "t.safetensors", header, b"")
    with pytest.raises(WeightsError, match=f"{MAX_TENSORS + 1} tensors; the limit is {MAX_TENSORS}"):
        open_file(tmp_path / "t.safetensors")


@pytest.mark.parametrize("label", ["1" * 5000, "01", "\u0661", "x"])
def test_layer_numbers_are_compared_as_written(label: str) -> None:
    """A 5,000-digit layer number (int() would refuse it), a leading zero or an Arabic-Indic digit (int() would
    read them as layer 1) is never a layer: the count check refuses the file."""
    from tinyvlm.weights.checked import check_layer_count

    names = ["blk.0.attn_norm.weight", f"blk.{label}.attn_norm.weight"]
    with pytest.raises(WeightsError, match=r"^f.gguf: block_count is 2, but the weights hold layers 0 to 0 \(1 in "
                                           r"all\), and layers numbered "):
        check_layer_count(names, r"blk\.([^.]+)\.", 2, "block_count", "f.gguf")
    check_layer_count(["blk.0.a", "blk.1.a"], r"blk\.([^.]+)\.", 2, "block_count", "f.gguf")
    with pytest.raises(WeightsError, match=r"block_count is 2147483648, but the weights hold layers 0 to 1 \(2 in"):
        check_layer_count(["blk.0.a", "blk.1.a"], r"blk\.([^.]+)\.", 2**31, "block_count", "f.gguf")  # no set of 2**31


def test_listing_shortens_names_from_files() -> None:
    from tinyvlm.weights.checked import listing

    text = listing(["a", "x" * 10_000, "b\nc", *map(str, range(30))])
    assert text.startswith("a, 'xxx") and "'b\\nc'" in text and text.endswith("... and 13 more") and len(text) < 400
