"""Hypothesis strategies that turn a seed (tests/fuzz/seeds.py) into a broken copy in a fresh directory.

`mutations(seed)` draws one Mutation (tests/fuzz/edits.py) of one of the seed's files: weight files, config.json and
tokenizer.json three times as often as the rest. Per file: truncation at any length, byte overwrites in the region
its parser reads first (the safetensors header, GGUF metadata and tensor infos, zip local headers + data.pkl and
the central directory), deletion, and that format's semantic lies. `apply` hard-links the seed into the new
directory and writes the edited file there; every edit is a pure function of the draws, so failures shrink and
replay.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import zipfile
from functools import lru_cache
from pathlib import Path

from hypothesis import strategies as st

from tests.fuzz import formats as fm
from tests.fuzz.edits import (CONFIG_KEYS, HOSTILE, Mutation, delete, flip, gguf_edit, json_edit, json_paths,
                              pickle_edit, spm_edit, st_edit, truncate, zip_edit)
from tests.fuzz.seeds import Seed


def seed_files(seed: Seed) -> dict[str, Path]:
    if seed.path.is_dir():
        return {p.name: p for p in sorted(seed.path.iterdir()) if p.is_file()}
    return {"llm.gguf": seed.path, **({"mmproj.gguf": seed.mmproj} if seed.mmproj else {})}


def apply(seed: Seed, m: Mutation, out: Path) -> tuple[Path, Path | None, Path]:
    """Write the mutated copy under the new directory `out`; return (path, mmproj, marker) for the runner."""
    if seed.path.is_dir():
        shutil.copytree(seed.path, out, copy_function=os.link)
        path, mmproj = out, None
    else:
        out.mkdir(parents=True)
        for name, src in seed_files(seed).items():
            os.link(src, out / name)
        path, mmproj = out / "llm.gguf", (out / "mmproj.gguf" if seed.mmproj else None)
    target, marker = out / m.file, out / "PWNED"
    data = target.read_bytes()
    target.unlink()  # never write through a hard link into the seed
    new = m.edit(data, marker)
    if new is not None:
        target.write_bytes(new)
    return path, mmproj, marker


# ---------------------------------------------------------------- hypothesis strategies

INTS = (0, 1, -1, 2, 3, 31, 32, 33, 2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63)
GGUF_VALUES = ((4, 0), (4, 1), (4, 3), (4, 2**31), (4, 2**32 - 1), (5, -1), (10, 2**40), (10, 2**64 - 1),
               (11, -2**63), (6, math.nan), (6, math.inf), (6, -math.inf), (6, 0.0), (6, -1.0), (12, 1e300),
               (8, b"x"), (8, b"\xff\xfe"), (8, b""), (7, True), (9, (4, [])), (9, (4, [1])), (9, (8, [b"a"])))
EXTRA_KEYS = ("general.alignment", "llama.attention.key_length", "llama.rope.scaling.type", "llama.vocab_size",
              "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "tokenizer.ggml.pre",
              "clip.vision.feature_layer", "tokenizer.ggml.model")
DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U64", "BOOL", "F8_E4M3", "Q4_0", "")
ints = st.sampled_from(INTS) | st.integers(-2**70, 2**70)
hostile = st.sampled_from(list(HOSTILE.values()))


def _regions(name: str, b: bytes) -> list[tuple[int, int]]:
    """Where a file's parser reads before its bulk data: (start, length) ranges."""
    if name.endswith(".safetensors"):
        return [(0, 8 + struct.unpack_from("<Q", b)[0])]
    if name.endswith(".gguf"):
        return [(0, len(b) - len(fm.gguf_parse(b)["data"]))]
    if name.endswith(".bin"):
        start = fm.zip_entries(b)[0][1]  # the central directory
        return [(0, min(len(b), 4096)), (start, len(b) - start)]
    return [(0, len(b))]


@st.composite
def _flips(draw, name: str, regions: list[tuple[int, int]]) -> Mutation:
    start, length = draw(st.sampled_from(regions))
    edits = draw(st.lists(st.tuples(st.integers(start, start + length - 1), st.integers(0, 255)), min_size=1,
                          max_size=8))
    return flip(name, edits)


def _json_options(name: str, doc: dict) -> list:
    keys = list(doc) + [k for k in CONFIG_KEYS if name == "config.json" and k not in doc]
    paths = [(k,) for k in keys] if name != "tokenizer.json" and "index" not in name else json_paths(doc, 3)
    return [st.builds(lambda p, r: json_edit(name, p, r), st.sampled_from(paths), hostile | st.none()),
            hostile.map(lambda r: Mutation("json-doc", name, lambda b, _: r.encode(), f"{r:.40}"))]


def _st_options(name: str, b: bytes) -> list:
    header, _ = fm.st_split(b)
    n = len(header) - ("__metadata__" in header)
    i = st.integers(0, n - 1)
    shapes = st.lists(st.sampled_from((-1, 0, 1, 2, 32, 64, 320, 2**31, 2**63, 2**64)), max_size=4)
    opts = [st.builds(lambda k, a: st_edit(name, "shift", k, a), i, st.integers(-64, 64) | st.sampled_from(INTS)),
            st.builds(lambda k: st_edit(name, "overlap", k), i),
            st.builds(lambda a: st_edit(name, "hole", 0, a), st.integers(1, 64)),
            st.builds(lambda a: st_edit(name, "tail", 0, a), st.integers(1, 64)),
            st.builds(lambda k, a: st_edit(name, "relabel", k, a), i, st.sampled_from(DTYPES)),
            st.builds(lambda k: st_edit(name, "dtype-list", k), i),
            st.builds(lambda k, a: st_edit(name, "shape", k, a), i, shapes),
            st.builds(lambda a: st_edit(name, "many", 0, a), st.sampled_from((1, 1000, 20000))),
            st.builds(lambda p, r: st_edit(name, "json", 0, (p, r)), st.sampled_from(json_paths(header, 3)),
                      hostile | st.none())]
    meta = header.get("__metadata__", {})
    if meta:
        value = hostile.map(json.dumps) | st.sampled_from(['"q4_0"', '"99"', '"{}"', '"[]"', '""'])
        opts.append(st.builds(lambda k, r: st_edit(name, "json", 0, (("__metadata__", k), r)),
                              st.sampled_from(sorted(meta)), value))
    return opts


def _gguf_options(name: str, b: bytes) -> list:
    g = fm.gguf_parse(b)
    keys = sorted({k.decode() for k, _, _ in g["kv"]} | set(EXTRA_KEYS))
    arrays = [k.decode() for k, t, _ in g["kv"] if t == fm.ARRAY]
    i = st.integers(0, len(g["infos"]) - 1)
    value = st.sampled_from(GGUF_VALUES) | st.tuples(st.just(4), st.integers(0, 2**32 - 1)) | st.just(
        (fm.ARRAY, None))
    return [st.builds(lambda k, tv: gguf_edit(name, "kv", k, tv[0], fm.deep_array() if tv[1] is None else tv[1]),
                      st.sampled_from(keys), value),
            st.builds(lambda k: gguf_edit(name, "del", k), st.sampled_from(keys)),
            st.builds(lambda k, v: gguf_edit(name, "array-len", k, value=v), st.sampled_from(arrays),
                      st.sampled_from([v for v in INTS if 0 <= v < 2**64]) | st.integers(0, 400)),
            st.builds(lambda op, v: gguf_edit(name, op, value=v), st.sampled_from(("n-tensors", "n-kv")),
                      st.sampled_from([v for v in INTS if 0 <= v < 2**64]) | st.integers(0, 400)),
            st.builds(lambda k, v: gguf_edit(name, "dims", value=v, i=k), i,
                      st.lists(st.sampled_from((0, 1, 2, 31, 32, 33, 64, 320, 2**31, 2**32, 2**63, 2**64 - 1)),
                               min_size=1, max_size=4)),
            st.builds(lambda k, v: gguf_edit(name, "ndims", value=v, i=k), i, st.integers(0, 6)),
            st.builds(lambda k, v: gguf_edit(name, "type", value=v, i=k), i,
                      st.integers(0, 40) | st.just(2**32 - 1)),
            st.builds(lambda k, v: gguf_edit(name, "offset", value=v, i=k), i,
                      st.sampled_from((0, 1, 31, 32, 2**40, 2**64 - 1)) | st.integers(0, 1 << 18))]


def _bin_options(b: bytes) -> list:
    names = [n.split("/", 1)[1] for n, _, _ in fm.zip_entries(b)]  # without the archive's root folder
    with zipfile.ZipFile(io.BytesIO(b)) as z:
        size = len(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    member = st.sampled_from(names)
    geometry = st.lists(st.tuples(st.sampled_from(("offset", "size", "stride")), st.integers(0, 3), ints),
                        min_size=1, max_size=3)
    payload = st.sampled_from(sorted(fm.payloads(Path("/m"))))
    return [st.builds(lambda m, op: zip_edit(op, m), member, st.sampled_from(("not-utf8", "encrypted", "missing"))),
            st.builds(lambda m, a: zip_edit("method", m, a), member, st.sampled_from((1, 6, 9, 12, 14, 93, 99))),
            st.builds(lambda m, a: zip_edit("bomb", m, a), member, st.sampled_from((1, 16))),
            st.builds(lambda op, a: pickle_edit(op, a), st.sampled_from(("inject", "replace")), payload),
            st.builds(lambda k, v: pickle_edit("int", v, k), st.integers(0, 200), ints),
            st.builds(lambda k, a: pickle_edit("geometry", a, k), st.integers(0, 9), geometry),
            st.builds(lambda e: pickle_edit("flip", e), st.lists(st.tuples(st.integers(0, size - 1),
                                                                           st.integers(0, 255)), min_size=1, max_size=6)),
            st.builds(lambda n: pickle_edit("truncate", n), st.integers(0, size - 1))]


def _spm_options() -> list:
    trainer = st.tuples(st.sampled_from((3, 4, 35, 40, 41, 42, 43)), st.just(0), ints)
    normalizer = st.tuples(st.sampled_from((3, 4, 5)), st.just(0), ints) | st.just((2, 2, b"\x00" * 8))
    piece = (st.tuples(st.just(1), st.just(2), st.sampled_from((b"", b"\xff\xfe", b"a" * (1 << 20), b"<s>", b"a")))
             | st.tuples(st.just(2), st.just(5), st.sampled_from([struct.pack("<f", v) for v in
                                                                 (math.nan, math.inf, -math.inf, 1e38)]))
             | st.tuples(st.just(3), st.just(0), st.integers(0, 8) | ints))
    i = st.integers(0, 319)
    return [st.builds(lambda a: spm_edit("trainer", a), trainer), st.builds(lambda a: spm_edit("normalizer", a),
                                                                            normalizer),
            st.builds(lambda k, a: spm_edit("piece", a, k), i, piece),
            st.builds(lambda k, a: spm_edit("length-lie", a, k), i, st.sampled_from(INTS[4:12]) | st.integers(0, 99))]


@lru_cache(maxsize=None)
def _file_strategy(name: str, path: Path) -> st.SearchStrategy[Mutation]:
    b = path.read_bytes()
    opts = [st.integers(0, len(b) - 1).map(lambda n: truncate(name, n)), _flips(name, _regions(name, b)),
            st.just(delete(name))]
    if name.endswith(".json"):
        opts += _json_options(name, json.loads(b))
    elif name.endswith(".safetensors"):
        opts += _st_options(name, b)
    elif name.endswith(".gguf"):
        opts += _gguf_options(name, b)
    elif name.endswith(".bin"):
        opts += _bin_options(b)
    elif name == "tokenizer.model":
        opts += _spm_options()
    return st.one_of(opts)


def mutations(seed: Seed) -> st.SearchStrategy[Mutation]:
    """Any mutation of any of the seed's files; weights, config.json and tokenizer.json drawn 3 times as often."""
    files = seed_files(seed)
    weighted = [n for n in files for _ in range(3 if n.endswith((".bin", ".safetensors", ".gguf"))
                                                or n in ("config.json", "tokenizer.json") else 1)]
    return st.sampled_from(weighted).flatmap(lambda n: _file_strategy(n, files[n]))
