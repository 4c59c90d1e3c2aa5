"""SentencePiece `tokenizer.model` reader: the ModelProto (protobuf) that LLaMA-style checkpoints ship.

We read it with our own small protobuf wire-format reader (no sentencepiece or protobuf import). Field numbers
follow sentencepiece_model.proto as compiled into the sentencepiece package (sentencepiece_model_pb2.py).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# SentencePiece.Type and TrainerSpec.ModelType enum values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2

# ----------------------------------------------------------------------------------------------------------
# Protobuf wire format: just enough to read a SentencePiece ModelProto.


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at buf[pos]; return (value, next position)."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"truncated or overlong varint at byte {pos}")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for one message: ints for varints, raw bytes for the other wire types."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            yield number, value
            continue
        if wire_type == 2:
            size, pos = _varint(buf, pos)
        elif wire_type in (1, 5):  # fixed64, fixed32
            size = 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} for field {number} at byte {pos}")
        if pos + size > len(buf):
            raise ValueError(f"field {number} runs past the end of its message ({pos + size} > {len(buf)})")
        yield number, buf[pos : pos + size]
        pos += size


def _int32(value: int) -> int:
    """A varint-encoded int32: negative numbers arrive as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that tokenization needs (proto2 defaults where absent)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = UNIGRAM  # TrainerSpec 3
    byte_fallback: bool = False  # TrainerSpec 35
    unk_id: int = 0  # TrainerSpec 40
    bos_id: int = 1  # TrainerSpec 41
    eos_id: int = 2  # TrainerSpec 42
    pad_id: int = -1  # TrainerSpec 43
    precompiled_charsmap: bytes = b""  # NormalizerSpec 2
    add_dummy_prefix: bool = True  # NormalizerSpec 3
    remove_extra_whitespaces: bool = True  # NormalizerSpec 4
    escape_whitespaces: bool = True  # NormalizerSpec 5


def parse_sentencepiece(data: bytes) -> SentencePieceModel:
    """Parse ModelProto bytes: field 1 pieces, 2 TrainerSpec, 3 NormalizerSpec (others ignored)."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    spec: dict[str, Any] = {}
    trainer_keys = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    normalizer_keys = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            piece, score, kind = "", 0.0, NORMAL
            for sub, sub_value in _fields(value):
                if sub == 1 and isinstance(sub_value, bytes):
                    piece = sub_value.decode("utf-8")
                elif sub == 2 and isinstance(sub_value, bytes) and len(sub_value) == 4:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3 and isinstance(sub_value, int):
                    kind = sub_value
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 2 and isinstance(value, bytes):
            for sub, sub_value in _fields(value):
                if sub in trainer_keys and isinstance(sub_value, int):
                    key = trainer_keys[sub]
                    spec[key] = bool(sub_value) if key == "byte_fallback" else _int32(sub_value)
        elif number == 3 and isinstance(value, bytes):
            for sub, sub_value in _fields(value):
                if sub in normalizer_keys and isinstance(sub_value, int):
                    spec[normalizer_keys[sub]] = bool(sub_value)
                elif sub == 2 and isinstance(sub_value, bytes):
                    spec["precompiled_charsmap"] = sub_value
    return SentencePieceModel(pieces, scores, types, **spec)
