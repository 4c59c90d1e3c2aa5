"""Weight readers against files written by the real writers: torch.save and safetensors.torch.save_file.

Values must be bit-exact against `torch_tensor.float()` (bf16/fp16 -> fp32 is exact), compared as uint32 bit
patterns. Hostile or broken files (a pickle that calls os.system, truncated files, headers that lie) must give
a WeightsError naming the file, and never run anything.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tinyvlm.errors import ModelNotFound, WeightsError
from tinyvlm.weights import TensorStore, is_ignorable_buffer, open_checkpoint, open_file
from tinyvlm.weights.torch_bin import read_torch_bin

if TYPE_CHECKING:
    import torch

BACKEND_FREE = True  # no model runs here: kernels, files and text only

FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of torch's float32, float16, bfloat16


def sample_tensors(tag: str) -> dict[str, torch.Tensor]:
    import torch

    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[tag]
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 4, generator=g).to(dtype),
        "model.norm.weight": (torch.randn(4, generator=g) * 1e3).to(dtype),
        "model.mm_projector.peg.0.weight": torch.randn(3, 1, 3, 3, generator=g).to(dtype),
        "scalar": torch.tensor(1.5, dtype=dtype),
        "special": torch.tensor([float("inf"), -0.0, 1e-8, 65504.0], dtype=dtype),
    }


def assert_bit_exact(store: TensorStore, name: str, ref: torch.Tensor) -> None:
    got = store.get(name)
    want = ref.detach().float().contiguous().numpy()
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def memmap_of(a: np.ndarray) -> np.memmap | None:
    """The np.memmap at the end of an array's .base chain, if any (i.e. the array is a view of a mapped file)."""
    while a is not None:
        if isinstance(a, np.memmap):
            return a
        a = a.base
    return None


# ---- torch .bin round trips ----


@pytest.mark.parametrize("tag", FLOAT_DTYPES)
def test_torch_bin_round_trip(tmp_path: Path, tag: str) -> None:
    import torch

    tensors = sample_tensors(tag)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    store = open_checkpoint(tmp_path)
    assert store.names() == sorted(tensors)
    for name, ref in tensors.items():
        assert store.dtype(name) == tag
        assert store.shape(name) == tuple(ref.shape)
        assert store.file_of(name) == tmp_path / "pytorch_model.bin"
        assert_bit_exact(store, name, ref)


def test_torch_bin_module_state_dict_and_int_buffer(tmp_path: Path) -> None:
    import torch

    # a real state_dict: an OrderedDict carrying `_metadata` (pickled through BUILD), plus an int64 buffer
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    model.register_buffer("position_ids", torch.arange(7).unsqueeze(0))
    state = model.state_dict()
    assert hasattr(state, "_metadata")
    torch.save(state, tmp_path / "m.bin")
    store = open_file(tmp_path / "m.bin")
    assert store.names() == sorted(state)
    for name in ("0.weight", "0.bias", "1.weight"):
        assert_bit_exact(store, name, state[name])
    assert store.dtype("position_ids") == "I64"
    ids = store.get("position_ids")
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, state["position_ids"].numpy())


def test_torch_bin_views_share_storage_and_strides(tmp_path: Path) -> None:
    import torch

    base = torch.randn(40, dtype=torch.float32)
    mat = torch.randn(5, 3, dtype=torch.bfloat16)
    tensors = {
        "head": base[2:8],  # offset 2 into one storage
        "tail": base[20:].view(4, 5),  # offset 20, same storage
        "transposed": mat.t(),  # stride (1, 3)
        "every_other": base[::2],  # stride 2
        "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
    }
    torch.save(tensors, tmp_path / "v.bin")
    store = open_file(tmp_path / "v.bin")
    for name, ref in tensors.items():
        assert_bit_exact(store, name, ref)
    head, tail = store.get("head"), store.get("tail")
    assert memmap_of(head) is not None and memmap_of(head) is memmap_of(tail)  # one map per file


def test_torch_bin_rebuild_from_type_and_parameter(tmp_path: Path) -> None:
    import torch

    plain = torch.randn(3, 2)
    plain.note = "python state makes torch.save use _rebuild_from_type_v2"
    param = torch.nn.Parameter(torch.randn(4, dtype=torch.float16))
    torch.save({"plain": plain, "param": param}, tmp_path / "t.bin")
    with zipfile.ZipFile(tmp_path / "t.bin") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert b"_rebuild_from_type_v2" in pkl and b"_rebuild_parameter" in pkl and b"Tensor" in pkl
    store = open_file(tmp_path / "t.bin")
    assert_bit_exact(store, "plain", plain)
    assert_bit_exact(store, "param", param)


def test_torch_bin_refuses_tensor_subclass(tmp_path: Path) -> None:
    import torch

    global SubTensor  # a module-level name (pickle saves the class by name), made here where torch is imported

    class SubTensor(torch.Tensor):
        pass

    torch.save({"x": torch.randn(2).as_subclass(SubTensor)}, tmp_path / "s.bin")
    with pytest.raises(WeightsError, match="refuses to load"):
        open_file(tmp_path / "s.bin")


def test_torch_bin_memory_mapped(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.randn(8, 8)}, tmp_path / "w.bin")
    store = open_file(tmp_path / "w.bin")
    w = store.get("w")
    assert memmap_of(w) is not None and not w.flags.writeable
    assert np.shares_memory(w, store.get("w"))


def test_torch_bin_compressed_member(tmp_path: Path) -> None:
    import torch

    # torch never compresses, but a re-zipped checkpoint may: then the storage is read into memory
    ref = torch.randn(5, 5, dtype=torch.bfloat16)
    torch.save({"w": ref}, tmp_path / "a.bin")
    with zipfile.ZipFile(tmp_path / "a.bin") as src:
        with zipfile.ZipFile(tmp_path / "b.bin", "w", zipfile.ZIP_DEFLATED) as dst:
            for name in src.namelist():
                dst.writestr(name, src.read(name))
    assert_bit_exact(open_file(tmp_path / "b.bin"), "w", ref)


def test_torch_bin_sharded(tmp_path: Path) -> None:
    import torch

    tensors = sample_tensors("BF16")
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[:2], "pytorch_model-00002-of-00002.bin": names[2:]}
    for shard, part in shards.items():
        torch.save({n: tensors[n] for n in part}, tmp_path / shard)
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    store = open_checkpoint(tmp_path)
    assert store.names() == names
    for name, ref in tensors.items():
        assert store.file_of(name) == tmp_path / weight_map[name]
        assert_bit_exact(store, name, ref)


# ---- hostile and broken .bin files ----


class Evil:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return (self.func, (self.arg,))


def zip_with_pickle(path: Path, payload: bytes, byteorder: str = "little") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", byteorder)


def test_malicious_pickle_refused_and_never_run(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    zip_with_pickle(tmp_path / "sys.bin", pickle.dumps({"w": Evil(os.system, command)}, protocol=2))
    code = f"__import__('os').system('{command}')"
    zip_with_pickle(tmp_path / "eval.bin", pickle.dumps(Evil(eval, code), protocol=2))
    torch.save({"w": torch.zeros(2), "x": Evil(os.system, command)}, tmp_path / "torchsaved.bin")
    for name, global_name in (("sys.bin", "system"), ("eval.bin", "eval"), ("torchsaved.bin", "system")):
        with pytest.raises(WeightsError) as info:
            open_file(tmp_path / name)
        message = str(info.value)
        assert str(tmp_path / name) in message and "refuses to load" in message and global_name in message
        assert "only tensor data is allowed" in message
    assert not marker.exists()


class StorageRef:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class TensorSpec:
    def __init__(self, storage: StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class TorchLikePickler(pickle.Pickler):
    """Writes the same opcodes torch.save does, for tensors whose geometry we choose (including bad ones)."""

    def persistent_id(self, obj: object) -> tuple | None:
        import torch

        if isinstance(obj, StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: object) -> tuple:
        import torch

        if isinstance(obj, TensorSpec):
            args = (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)
        return NotImplemented


def write_handmade_bin(
    path: Path, specs: dict[str, TensorSpec], storage_bytes: dict[str, bytes], byteorder: str = "little"
) -> None:
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(specs)
    zip_with_pickle(path, buf.getvalue(), byteorder)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as z:
        for key, data in storage_bytes.items():
            z.writestr(f"archive/data/{key}", data)


def test_handmade_bin_matches_and_bad_geometry_refused(tmp_path: Path) -> None:
    values = np.arange(12, dtype="<f4")
    good = {"w": TensorSpec(StorageRef("0", 12), 2, (2, 3), (1, 2))}
    write_handmade_bin(tmp_path / "good.bin", good, {"0": values.tobytes()})
    want = np.lib.stride_tricks.as_strided(values[2:], (2, 3), (4, 8))
    np.testing.assert_array_equal(open_file(tmp_path / "good.bin").get("w"), want)
    write_handmade_bin(tmp_path / "big_endian.bin", good, {"0": values.astype(">f4").tobytes()}, "big")
    np.testing.assert_array_equal(open_file(tmp_path / "big_endian.bin").get("w"), want)

    too_big = {"w": TensorSpec(StorageRef("0", 12), 4, (3, 3), (3, 1))}  # needs 13 elements
    write_handmade_bin(tmp_path / "big.bin", too_big, {"0": values.tobytes()})
    with pytest.raises(WeightsError, match="does not fit its storage"):
        open_file(tmp_path / "big.bin")

    short = {"w": TensorSpec(StorageRef("0", 12), 0, (12,), (1,))}  # member holds 8 of 12 elements
    write_handmade_bin(tmp_path / "short.bin", short, {"0": values[:8].tobytes()})
    with pytest.raises(WeightsError, match="has 32 bytes, the pickle needs 48"):
        open_file(tmp_path / "short.bin")

    write_handmade_bin(tmp_path / "nomember.bin", short, {})
    with pytest.raises(WeightsError, match="not in the archive"):
        open_file(tmp_path / "nomember.bin")


def test_broken_bin_files(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as info:
        open_checkpoint(tmp_path)
    assert str(tmp_path / "pytorch_model.bin") in str(info.value)

    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.bin"):
        open_file(tmp_path / "junk.bin")
    with pytest.raises(WeightsError, match="not a PyTorch zip checkpoint"):
        read_torch_bin(tmp_path / "junk.bin")

    with zipfile.ZipFile(tmp_path / "nopkl.bin", "w") as z:
        z.writestr("archive/data/0", b"\0" * 8)
    with pytest.raises(WeightsError, match="nopkl.bin.*data.pkl"):
        open_file(tmp_path / "nopkl.bin")

    torch.save({"w": torch.randn(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="pre-1.6"):
        read_torch_bin(tmp_path / "legacy.bin")


# ---- safetensors ----


@pytest.mark.parametrize("tag", FLOAT_DTYPES)
def test_safetensors_round_trip(tmp_path: Path, tag: str) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = sample_tensors(tag)
    tensors["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    store = open_checkpoint(tmp_path)
    assert store.names() == sorted(tensors)
    for name, ref in tensors.items():
        assert store.shape(name) == tuple(ref.shape)
        if ref.dtype == torch.int64:
            assert store.dtype(name) == "I64"
            got = store.get(name)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, ref.numpy())
        else:
            assert store.dtype(name) == tag
            assert_bit_exact(store, name, ref)


def test_safetensors_memory_mapped(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(7), "h": torch.randn(3, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    store = open_file(tmp_path / "x.safetensors")
    a, b = store.get("a"), store.get("b")
    assert memmap_of(a) is not None and memmap_of(a) is memmap_of(b) and not a.flags.writeable
    assert memmap_of(store.get("h")) is None  # F16 is converted into a new array


def test_safetensors_sharded_and_magic_dispatch(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = sample_tensors("F16")
    names = sorted(tensors)
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {n: shards[i % 2] for i, n in enumerate(names)}
    for shard in set(weight_map.values()):
        save_file({n: tensors[n] for n in names if weight_map[n] == shard}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # lower priority, must be ignored
    store = open_checkpoint(tmp_path)
    assert store.names() == names
    for name, ref in tensors.items():
        assert store.file_of(name).name == weight_map[name]
        assert_bit_exact(store, name, ref)

    # a safetensors file under a .bin name is still read as safetensors (magic bytes, not suffix)
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": tensors[names[0]]}, str(other / "pytorch_model.bin"))
    assert_bit_exact(open_checkpoint(other), "w", tensors[names[0]])


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_lying_headers(tmp_path: Path) -> None:
    data = np.arange(6, dtype="<f4").tobytes()  # 24 bytes
    cases = {
        "past_end": ({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, "run past the end"),
        "span": (
            {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}},
            "span 16 bytes, but F32 \\[2, 3\\] needs 24",
        ),
        "dtype": ({"w": {"dtype": "F8_E4M3", "shape": [6], "data_offsets": [0, 6]}}, "unsupported dtype"),
        "shape": ({"w": {"dtype": "F32", "shape": [-1, 6], "data_offsets": [0, 24]}}, "shape must be"),
        "keys": ({"w": {"dtype": "F32", "shape": [6]}}, "exactly dtype, shape and data_offsets"),
    }
    for name, (header, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(path, header, data)
        with pytest.raises(WeightsError, match=pattern) as info:
            open_file(path)
        assert str(path) in str(info.value) and "'w'" in str(info.value)

    good = tmp_path / "good.safetensors"
    header = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    write_safetensors(good, header, data)
    np.testing.assert_array_equal(open_file(good).get("w"), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_safetensors_truncated(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.randn(32, 32)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    for name, cut in (("body", len(data) - 100), ("header", 40), ("length", 5)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated") as info:
            open_file(path)
        assert str(path) in str(info.value)


# ---- checkpoint directories and strict checking ----


def test_missing_files_and_shards(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    with pytest.raises(WeightsError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    from tinyvlm.weights.store import CHECKPOINT_FILES

    assert CHECKPOINT_FILES == (
        "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"
    )
    assert all(f in message for f in CHECKPOINT_FILES)

    with pytest.raises(ModelNotFound, match="not a directory"):
        open_checkpoint(tmp_path / "nowhere")

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors.*missing") as info:
        open_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)

    save_file({"c": torch.zeros(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(WeightsError, match="maps 'b' to model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path)


def test_strict_check_lists_everything(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    present = {f"layer.{i}.weight": torch.zeros(2, 3) for i in range(3)}
    present.update({
        "extra.weight": torch.zeros(1),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4),
        "vision_model.embeddings.position_ids": torch.arange(3),
    })
    save_file(present, str(tmp_path / "model.safetensors"))
    store = open_checkpoint(tmp_path)
    expected = {f"layer.{i}.weight": (2, 3) for i in range(3)}
    expected["layer.1.weight"] = (3, 2)
    expected.update({f"missing.{i:02d}": (1,) for i in range(25)})
    expected["maybe"] = (5,)
    with pytest.raises(WeightsError) as info:
        store.check(expected, optional=["maybe"], ignore=is_ignorable_buffer)
    message = str(info.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "missing (25): missing.00, missing.01" in message and "... and 5 more" in message
    assert "missing.20" not in message and "maybe" not in message
    assert "unexpected (1): extra.weight" in message
    assert "wrong shape (1): layer.1.weight (file [2, 3], expected [3, 2])" in message
    assert "inv_freq" not in message and "position_ids" not in message

    # what is present and expected passes; optional names may be present or not
    good = {f"layer.{i}.weight": (2, 3) for i in range(3)}
    store.check(good, optional=["extra.weight", "maybe"], ignore=is_ignorable_buffer)
    with pytest.raises(WeightsError, match="unexpected \\(2\\): model.layers.0.self_attn.rotary_emb.inv_freq, vision"):
        store.check(good, optional=["extra.weight"])


def test_is_ignorable_buffer() -> None:
    assert is_ignorable_buffer("model.layers.3.self_attn.rotary_emb.inv_freq")
    assert is_ignorable_buffer("model.vision_tower.vision_tower.vision_model.embeddings.position_ids")
    assert not is_ignorable_buffer("model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight")
    assert not is_ignorable_buffer("model.layers.3.self_attn.q_proj.weight")


def test_get_unknown_name(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="no tensor 'b' in .*model.safetensors"):
        open_checkpoint(tmp_path).get("b")
