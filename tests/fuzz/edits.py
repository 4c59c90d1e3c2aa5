"""The edits the fuzz mutations are made of: each a Mutation naming one seed file and a pure function of its drawn
parameters (the file's bytes and the case's marker path -> new bytes, or None to delete it). tests/fuzz/mutate.py
draws them; test_fuzz.py names some directly for the deterministic hostile cases.

    truncate / flip / delete   any file
    json_edit                  a key of a JSON file set to a hostile JSON text (HOSTILE), or deleted
    st_edit                    a safetensors header: offsets (overlap, shift, hole, tail), dtype, shape, many tensors,
                               any value of the header (json)
    gguf_edit                  a GGUF metadata value (typed, even a 100k-deep array), array lengths, counts, infos
    zip_edit / pickle_edit     a torch .bin: member names, flags, methods, a deflate bomb; pickle payloads (they create
                               the marker when a plain unpickler runs them), int opcodes, tensor geometry
    spm_edit                   tokenizer.model: TrainerSpec / NormalizerSpec fields, piece strings, scores, types,
                               length lies
"""
from __future__ import annotations

import io
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.fuzz import formats as fm

HOSTILE = {"0": "0", "-1": "-1", "2**31": str(2**31), "2**40": str(2**40), "2**64": str(2**64),
           "5000 digits": "9" * 5000, "1e30": "1e30", "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity",
           "[]": "[]", "[1]": "[1]", "{}": "{}", '"x"': '"x"', "true": "true", "null": "null",
           '"../x"': '"../x"', "deep": "[" * 100_000 + "]" * 100_000}
CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers", "intermediate_size",
               "vocab_size", "max_position_embeddings", "max_sequence_length", "rms_norm_eps", "rope_theta", "head_dim",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "mm_projector_type", "mm_hidden_size",
               "vision_tower_type", "mm_vision_tower", "mm_vision_select_layer", "mm_vision_select_feature",
               "image_aspect_ratio", "rope_scaling")
Edit = Callable[[bytes, Path], "bytes | None"]


@dataclass(frozen=True)
class Mutation:
    kind: str  # e.g. "json", "st-offsets", "gguf-kv": the long-run table's mutation kind
    file: str  # the seed file it edits (relative to the seed directory, or llm.gguf / mmproj.gguf)
    edit: Edit
    what: str = ""  # the drawn parameters, for the failure report

    def __repr__(self) -> str:
        return f"Mutation({self.kind} {self.file}: {self.what})"


# ---------------------------------------------------------------- generic edits

def truncate(name: str, n: int) -> Mutation:
    return Mutation("truncate", name, lambda b, _: b[:n], f"first {n} bytes")


def flip(name: str, edits: list[tuple[int, int]]) -> Mutation:
    def edit(b: bytes, _: Path) -> bytes:
        out = bytearray(b)
        for pos, value in edits:
            if pos < len(out):
                out[pos] = value
        return bytes(out)
    return Mutation("flip", name, edit, f"bytes {edits}")


def delete(name: str) -> Mutation:
    return Mutation("delete", name, lambda b, _: None, "deleted")


def json_text(doc: object, path: tuple, raw: str | None) -> str:
    """`doc` as JSON with the value at `path` replaced by the JSON text `raw` (deleted when None)."""
    doc = json.loads(json.dumps(doc))
    *parents, last = path
    target = doc
    for key in parents:
        target = target[key]
    if raw is None:
        if isinstance(target, dict):
            target.pop(last, None)
        else:
            del target[last]
        return json.dumps(doc)
    target[last] = "@@HOSTILE@@"
    return json.dumps(doc).replace('"@@HOSTILE@@"', raw, 1)


def json_edit(name: str, path: tuple, raw: str | None) -> Mutation:
    return Mutation("json", name, lambda b, _: json_text(json.loads(b), path, raw).encode(), f"{path} = {raw!s:.40}")


def json_paths(doc: object, depth: int = 4) -> list[tuple]:
    """Paths of the values in a JSON document (lists: their first three items and the last)."""
    if depth == 0 or not isinstance(doc, (dict, list)) or not doc:
        return []
    keys = list(doc) if isinstance(doc, dict) else sorted({0, 1, 2, len(doc) - 1} & set(range(len(doc))))
    return [p for k in keys for p in [(k,), *((k, *sub) for sub in json_paths(doc[k], depth - 1))]]


# ---------------------------------------------------------------- safetensors

def st_edit(name: str, op: str, i: int = 0, arg: object = None) -> Mutation:
    """op on tensor i (in offset order): shift (offsets += arg), overlap (take the offsets of another tensor of
    the same size), hole (arg bytes before the data, offsets moved), tail (arg bytes after it), relabel (dtype arg),
    dtype-list, shape (arg), many (arg extra tensors), json (arg = (path in the header, raw JSON text))."""
    def edit(b: bytes, _: Path) -> bytes:
        header, data = fm.st_split(b)
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        e = header[names[i % len(names)]]
        if op == "shift":
            e["data_offsets"] = [o + arg for o in e["data_offsets"]]
        elif op == "overlap":
            size = e["data_offsets"][1] - e["data_offsets"][0]
            same = [k for k in names if k != names[i % len(names)]
                    and header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == size]
            e["data_offsets"] = list(header[same[0]]["data_offsets"]) if same else [o - size // 2 for o in
                                                                                   e["data_offsets"]]
        elif op == "hole":
            for k in names:
                header[k]["data_offsets"] = [o + arg for o in header[k]["data_offsets"]]
            data = bytes(arg) + data
        elif op == "tail":
            data += bytes(arg)
        elif op == "relabel":
            e["dtype"] = arg
        elif op == "dtype-list":
            e["dtype"] = [e["dtype"]]
        elif op == "shape":
            e["shape"] = arg
        elif op == "many":
            header.update({f"fuzz.extra.{k}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                           for k in range(arg)})
        if op == "json":
            return fm.st_join(json_text(header, *arg), data)
        return fm.st_join(json.dumps(header), data)
    return Mutation(f"st-{op}", name, edit, f"tensor #{i} {str(arg):.60}")


# ---------------------------------------------------------------- GGUF

def gguf_edit(name: str, op: str, key: str = "", t: int = 0, value: object = None, i: int = 0) -> Mutation:
    """op: kv (set `key` to a value of type t; added when absent), del, array-len (claim `value` items), n-tensors /
    n-kv (claim `value`), dims / ndims / type / offset (tensor i's info)."""
    def edit(b: bytes, _: Path) -> bytes:
        g = fm.gguf_parse(b)
        kb = key.encode()
        entry = next((e for e in g["kv"] if e[0] == kb), None)
        if op == "kv":
            if entry is None:
                g["kv"].append(entry := [kb, t, value])
            entry[1:] = [t, value]
        elif op == "del" and entry is not None:
            g["kv"].remove(entry)
        elif op == "array-len" and entry is not None and entry[1] == 9:
            item, values = entry[2]
            entry[2] = fm.Raw(struct.pack("<IQ", item, value) + b"".join(fm.gpack(item, x) for x in values))
        elif op in ("n-tensors", "n-kv"):
            return fm.gguf_pack(g, **{op.replace("-", "_"): value})
        elif op in ("dims", "ndims", "type", "offset"):
            info = g["infos"][i % len(g["infos"])]
            if op == "dims":
                info[1] = list(value)  # type: ignore[call-overload]
            elif op == "ndims":
                info[1] = (info[1] + [1] * 8)[:value]
            else:
                info[2 if op == "type" else 3] = value
        return fm.gguf_pack(g)
    return Mutation(f"gguf-{op}", name, edit, f"{key or ('tensor #%d' % i)} = {str(value):.60} (type {t})")


# ---------------------------------------------------------------- torch .bin: zip and pickle

def zip_edit(op: str, member: str = "data.pkl", arg: object = None) -> Mutation:
    """op on the member <root>/`member`: not-utf8 (its name's last bytes invalid, the UTF-8 flag
    0x800 set), encrypted (flag bit 0), method (compression method arg), missing (data.pkl renamed data.pkx),
    bomb (replaced by a deflate stream of arg MiB)."""
    def edit(b: bytes, _: Path) -> bytes:
        names = [n for n, _, _ in fm.zip_entries(b)]
        k = next(j for j, n in enumerate(names) if n.endswith("/" + member))
        raw = names[k].encode()
        if op == "not-utf8":
            return fm.zip_patch(b, k, flags=0x800, name=raw[:-2] + b"\xff\xfe")
        if op == "encrypted":
            return fm.zip_patch(b, k, flags=0x1)
        if op == "method":
            return fm.zip_patch(b, k, method=arg)
        if op == "missing":
            return fm.zip_patch(b, k, name=raw[:-1] + b"x")
        return fm.bomb_member(b, names[k], arg)
    return Mutation(f"zip-{op}", "pytorch_model.bin", edit, f"{member} {arg if arg is not None else ''}")


def pickle_edit(op: str, arg: object = None, i: int = 0) -> Mutation:
    """op on data.pkl: inject / replace (the payload named arg, before the state dict or as all of it), int (the
    i-th int opcode set to arg), geometry (tensor i's [(offset|size|stride, dim, value)] = arg), flip, truncate."""
    def edit(b: bytes, marker: Path) -> bytes:
        member = next(n for n, _, _ in fm.zip_entries(b) if n.endswith("/data.pkl"))
        with zipfile.ZipFile(io.BytesIO(b)) as z:
            pkl = z.read(member)
        if op == "inject":
            pkl = fm.injected(pkl, fm.payloads(marker)[arg])
        elif op == "replace":
            pkl = fm.standalone(fm.payloads(marker)[arg])
        elif op == "int":
            ints = [k for k, o in enumerate(fm.pickle_ops(pkl)) if o[0] in fm.INT_OPS]
            pkl = fm.set_int(pkl, ints[i % len(ints)], arg)
        elif op == "geometry":
            tensors = fm.tensor_geometry(pkl)
            geometry = tensors[i % len(tensors)]
            for part, dim, value in arg:  # one int opcode for another: the opcode indices stay valid
                if geometry[part]:
                    pkl = fm.set_int(pkl, geometry[part][dim % len(geometry[part])], value)
        elif op == "flip":
            pkl = flip("", arg).edit(pkl, marker)
        elif op == "truncate":
            pkl = pkl[:arg]
        return fm.zip_rebuild(b, {member: pkl})
    return Mutation(f"pickle-{op}", "pytorch_model.bin", edit, f"tensor/op #{i}: {str(arg):.80}")


# ---------------------------------------------------------------- tokenizer.model

def spm_edit(op: str, arg: tuple = (), i: int = 0) -> Mutation:
    """op: trainer / normalizer (set that spec's (field, wire type, value) = arg), piece (piece i's (field, wire,
    value) = arg: 1 the string, 2 the score, 3 the type), length-lie (piece i claims arg bytes)."""
    def edit(b: bytes, _: Path) -> bytes:
        fields = fm.proto_fields(b)
        pieces = [f for f in fields if f[0] == 1]
        if op == "length-lie":
            k = next(j for j, f in enumerate(fields) if f is pieces[i % len(pieces)])
            return (fm.proto_encode(fields[:k]) + fm.varint(1 << 3 | 2) + fm.varint(arg) + fields[k][2]
                    + fm.proto_encode(fields[k + 1:]))
        if op == "piece":
            msg = pieces[i % len(pieces)]
        else:
            number = 2 if op == "trainer" else 3
            msg = next((f for f in fields if f[0] == number), None) or [number, 2, b""]
            if msg not in fields:
                fields.append(msg)
        sub = fm.proto_fields(msg[2])
        sub = [f for f in sub if f[0] != arg[0]] + [list(arg)]
        msg[2] = fm.proto_encode(sub)
        return fm.proto_encode(fields)
    return Mutation(f"spm-{op}", "tokenizer.model", edit, f"#{i} {str(arg):.60}")
