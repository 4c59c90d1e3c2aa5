"""Byte-level codecs the fuzz seeds and mutations share, written from the formats' specs (not from tinyvlm):

    protobuf wire format   varint, proto_fields, proto_encode (SentencePiece's tokenizer.model)
    safetensors            write_safetensors, st_split, st_join
    GGUF                   gguf_parse, gguf_pack (any value, even a lying one, as Raw bytes), deep_array
    zip                    zip_entries, zip_patch (both headers of one member), zip_rebuild, deflate_bomb
    pickle                 pickle_ops, encode_int, tensor_geometry (torch's _rebuild_tensor_v2 args), payloads
"""
from __future__ import annotations

import io
import json
import pickletools
import shlex
import struct
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- protobuf


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def proto_fields(buf: bytes) -> list[list]:
    """[field number, wire type, value] of one well-formed message: ints for varints, bytes otherwise."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        else:
            size = {1: 8, 5: 4}.get(wire)
            if size is None:
                size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        out.append([number, wire, value])
    return out


def proto_encode(fields: list) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(int(value))
        elif wire == 2:
            out += varint(len(value)) + value
        else:
            out += value
    return bytes(out)


# ---------------------------------------------------------------- safetensors

def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32",
                      metadata: dict[str, str] | None = None) -> Path:
    """Float tensors stored as `dtype` (F32, F16 or BF16, so no torch is needed), integer tensors as I64."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, pos = [], 0
    for name, a in tensors.items():
        if a.dtype.kind == "f" and dtype == "BF16":
            tag, raw = "BF16", (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        elif a.dtype.kind == "f":
            tag, raw = dtype, a.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        else:
            tag, raw = "I64", a.astype("<i8").tobytes()
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    path.write_bytes(st_join(json.dumps(header, separators=(",", ":")), b"".join(blobs)))
    return path


def st_split(b: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", b)[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def st_join(header_text: str, data: bytes) -> bytes:
    text = header_text.encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# ---------------------------------------------------------------- GGUF

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Raw(bytes):
    """A GGUF value already packed (the bytes after its type id), e.g. a lie no typed value can tell."""


def _gvalue(b: bytes, pos: int, t: int) -> tuple[object, int]:
    if t == STRING:
        n = struct.unpack_from("<Q", b, pos)[0]
        return b[pos + 8:pos + 8 + n], pos + 8 + n
    if t == ARRAY:
        item, n = struct.unpack_from("<IQ", b, pos)
        pos, values = pos + 12, []
        for _ in range(n):
            v, pos = _gvalue(b, pos, item)
            values.append(v)
        return (item, values), pos
    return struct.unpack_from(_FMT[t], b, pos)[0], pos + struct.calcsize(_FMT[t])


def gpack(t: int, v: object) -> bytes:
    if isinstance(v, Raw):
        return bytes(v)
    if t == STRING:
        v = v.encode() if isinstance(v, str) else v
        return struct.pack("<Q", len(v)) + v  # type: ignore[arg-type]
    if t == ARRAY:
        item, values = v  # type: ignore[misc]
        return struct.pack("<IQ", item, len(values)) + b"".join(gpack(item, x) for x in values)
    return struct.pack(_FMT[t], v)


def gguf_parse(b: bytes) -> dict:
    """{version, kv: [[key bytes, type, value]], infos: [[name bytes, ne, type, offset]], data} of a valid file."""
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    pos, kv, infos = 24, [], []
    for _ in range(n_kv):
        key, pos = _gvalue(b, pos, STRING)
        t = struct.unpack_from("<I", b, pos)[0]
        value, pos = _gvalue(b, pos + 4, t)
        kv.append([key, t, value])
    for _ in range(n_t):
        name, pos = _gvalue(b, pos, STRING)
        nd = struct.unpack_from("<I", b, pos)[0]
        ne = list(struct.unpack_from(f"<{nd}Q", b, pos + 4))
        t, off = struct.unpack_from("<IQ", b, pos + 4 + 8 * nd)
        infos.append([name, ne, t, off])
        pos += 16 + 8 * nd
    align = next((v for k, _, v in kv if k == b"general.alignment"), 32)
    return {"version": version, "kv": kv, "infos": infos, "data": b[-(-pos // align) * align:]}


def gguf_pack(g: dict, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """The file of gguf_parse's dict; the counts may lie. Padded to general.alignment when that is sane, else 32."""
    align = next((v for k, t, v in g["kv"] if k == b"general.alignment" and t == 4), 32)
    align = align if isinstance(align, int) and align > 0 and not align & (align - 1) else 32
    counts = (len(g["infos"]) if n_tensors is None else n_tensors, len(g["kv"]) if n_kv is None else n_kv)
    out = bytearray(b"GGUF" + struct.pack("<IQQ", g["version"], *counts))
    for key, t, value in g["kv"]:
        out += gpack(STRING, key) + struct.pack("<I", t) + gpack(t, value)
    for name, ne, t, off in g["infos"]:
        out += gpack(STRING, name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t, off)
    out += bytes(-len(out) % align)
    return bytes(out) + g["data"]


def deep_array(depth: int = 100_000) -> Raw:
    """An array of one array of one array ... `depth` levels deep, the innermost empty."""
    return Raw(struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", 4, 0))


# ---------------------------------------------------------------- zip

def zip_entries(b: bytes) -> list[tuple[str, int, int]]:
    """(name, central directory entry position, local header position) per member, in directory order."""
    with zipfile.ZipFile(io.BytesIO(b)) as z:
        infos, pos = z.infolist(), z.start_dir
    out = []
    for info in infos:
        assert b[pos:pos + 4] == b"PK\x01\x02"
        n, e, c = struct.unpack_from("<HHH", b, pos + 28)
        out.append((info.filename, pos, info.header_offset))
        pos += 46 + n + e + c
    return out


def zip_patch(b: bytes, member: int, flags: int = 0, method: int | None = None, name: bytes | None = None,
              size: int | None = None) -> bytes:
    """Member #member with flag bits `flags` set, its compression method, name (same length) or uncompressed size
    replaced, in both its central directory entry and its local header."""
    out = bytearray(b)
    _, cd, local = zip_entries(b)[member]
    for base, f_at, m_at, size_at, name_at in ((cd, 8, 10, 24, 46), (local, 6, 8, 22, 30)):
        struct.pack_into("<H", out, base + f_at, struct.unpack_from("<H", out, base + f_at)[0] | flags)
        if method is not None:
            struct.pack_into("<H", out, base + m_at, method)
        if size is not None:
            struct.pack_into("<I", out, base + size_at, size)
        if name is not None:
            out[base + name_at:base + name_at + len(name)] = name
    return bytes(out)


def zip_rebuild(b: bytes, replace: dict[str, bytes]) -> bytes:
    """The archive rewritten (all members stored) with some members' bytes replaced."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(b)) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, replace.get(info.filename, src.read(info)))
    return buf.getvalue()


@lru_cache(maxsize=4)
def deflate_bomb(mib: int) -> bytes:
    """A raw deflate stream of `mib` MiB of zeros, about 1 KB per MiB (full-flushed blocks repeat exactly)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return block * mib + c.flush()


def bomb_member(b: bytes, member: str, mib: int) -> bytes:
    """`member` replaced by a deflate stream that inflates to `mib` MiB (its CRC is not computed: left wrong)."""
    b = zip_rebuild(b, {member: deflate_bomb(mib)})
    index = [n for n, _, _ in zip_entries(b)].index(member)
    return zip_patch(b, index, method=zipfile.ZIP_DEFLATED, size=min(mib << 20, 0xFFFFFFFE))


# ---------------------------------------------------------------- pickle

INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
TUPLES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"}


def pickle_ops(pkl: bytes) -> list[tuple[str, object, int, int]]:
    """(opcode name, argument, start, end) of every opcode."""
    ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(pkl)]
    return [(name, arg, pos, ops[k + 1][2] if k + 1 < len(ops) else pos + 1) for k, (name, arg, pos) in
            enumerate(ops)]


def encode_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def set_int(pkl: bytes, op_index: int, value: int) -> bytes:
    _, _, start, end = pickle_ops(pkl)[op_index]
    return pkl[:start] + encode_int(value) + pkl[end:]


def tensor_geometry(pkl: bytes) -> list[dict[str, list[int]]]:
    """Per `_rebuild_tensor_v2(storage, offset, size, stride, ...)` call after a BINPERSID: the op indices of its
    offset, size and stride ints (torch.save's protocol-2 layout)."""
    ops, out = pickle_ops(pkl), []
    for p, (name, *_) in enumerate(ops):
        if name != "BINPERSID" or ops[p + 1][0] not in INT_OPS:
            continue
        geometry, k = {"offset": [p + 1]}, p + 2
        for part in ("size", "stride"):
            geometry[part] = []
            while ops[k][0] not in TUPLES:
                if ops[k][0] in INT_OPS:
                    geometry[part].append(k)
                k += 1
            k += 1
            while ops[k][0] in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                k += 1
        out.append(geometry)
    return out


def _u(s: str) -> bytes:
    return b"V" + s.encode("raw_unicode_escape") + b"\n"


def _s(s: str) -> bytes:
    e = s.encode()
    return b"X" + struct.pack("<I", len(e)) + e


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickle opcodes (no PROTO, no STOP) that create `marker` when a plain unpickler runs them."""
    cmd, code = f"touch {shlex.quote(str(marker))}", f"open({str(marker)!r}, 'w').close()"
    return {
        "GLOBAL os.system + REDUCE": b"cos\nsystem\n(" + _u(cmd) + b"tR",
        "GLOBAL posix.system + REDUCE": b"cposix\nsystem\n(" + _u(cmd) + b"tR",
        "GLOBAL builtins.exec + REDUCE": b"cbuiltins\nexec\n(" + _u(code) + b"tR",
        "GLOBAL builtins.eval + REDUCE": b"cbuiltins\neval\n(" + _u(code) + b"tR",
        "STACK_GLOBAL subprocess.call": _s("subprocess") + _s("call") + b"\x93(" + _s("touch") + _s(str(marker))
        + b"l\x85R",
        "INST os.system": b"(" + _u(cmd) + b"ios\nsystem\n",
        "OBJ os.system": b"(cos\nsystem\n" + _u(cmd) + b"o",
        "NEWOBJ + BUILD __setstate__=os.system": b"ccollections\nOrderedDict\n)\x81}" + _s("__setstate__")
        + b"cos\nsystem\nsb" + _u(cmd) + b"b",
        "GLOBAL builtins.getattr + importlib.import_module": b"cbuiltins\ngetattr\n(cimportlib\nimport_module\n("
        + _u("os") + b"tR" + _u("system") + b"tR(" + _u(cmd) + b"tR",
    }


def standalone(payload: bytes) -> bytes:
    return b"\x80\x02" + payload + b"."


def injected(pkl: bytes, payload: bytes) -> bytes:
    """The payload run before the state dict is built (the original pickle starts with PROTO 2)."""
    return pkl[:2] + payload + b"0" + pkl[2:]
