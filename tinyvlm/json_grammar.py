"""The JSON recognizer of constrained answers (json_constraint.py): a byte-level parser of a JSON text (any
object, or what a JSON-Schema subset describes) whose state is an immutable stack of frames, so that a candidate
token is tried on a state without changing it.

The schema subset: "type" object (with "properties", taken in their order, "required", and
"additionalProperties"), array (with "items"), string, number, integer, boolean, null; "enum" of JSON values;
"title", "description" and "$schema" are ignored. Anything else is refused with an error, never ignored.
Whitespace between tokens is allowed, at most 3 bytes in a row; numbers have at most 32 bytes.
"""
from __future__ import annotations

import json
from typing import Any

from tinyvlm.errors import PromptError

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_IGNORED = {"title", "description", "$schema"}
_ALLOWED = {"type", "properties", "required", "additionalProperties", "items", "enum"} | _IGNORED
_WS = b" \n\t\r"
_MAX_WS, _MAX_NUMBER = 3, 32
_NUMBER = {  # phase -> (bytes that continue it, the phase each leads to); phases in _NUMBER_ENDS may end there
    "start": {**{ord("-"): "sign", ord("0"): "zero"}, **{c: "int" for c in b"123456789"}},
    "sign": {**{ord("0"): "zero"}, **{c: "int" for c in b"123456789"}},
    "zero": {ord("."): "dot", ord("e"): "exp", ord("E"): "exp"},
    "int": {**{c: "int" for c in b"0123456789"}, ord("."): "dot", ord("e"): "exp", ord("E"): "exp"},
    "dot": {c: "frac" for c in b"0123456789"},
    "frac": {**{c: "frac" for c in b"0123456789"}, ord("e"): "exp", ord("E"): "exp"},
    "exp": {**{c: "expd" for c in b"0123456789"}, ord("+"): "expsign", ord("-"): "expsign"},
    "expsign": {c: "expd" for c in b"0123456789"},
    "expd": {c: "expd" for c in b"0123456789"},
}
_NUMBER_ENDS = {"zero", "int", "frac", "expd"}
ANY = ("any",)


def compile_schema(schema: Any, where: str = "schema") -> tuple:
    """A node: ("any",), ("object", ((key bytes, node, required), ...) or None), ("array", node), ("string",),
    ("number",), ("integer",), ("boolean",), ("null",) or ("enum", frozenset of serialized values)."""
    if not isinstance(schema, dict):
        raise PromptError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    unknown = sorted(set(schema) - _ALLOWED)
    if unknown:
        raise PromptError(f"{where}: the schema keyword {unknown[0]!r} is not supported (supported: "
                          f"{', '.join(sorted(_ALLOWED - _IGNORED))})")
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise PromptError(f"{where}: enum must be a non-empty list")
        return ("enum", frozenset(json.dumps(v, ensure_ascii=False).encode() for v in values))
    kind = schema.get("type")
    if kind not in _TYPES:
        raise PromptError(f"{where}: type must be one of {', '.join(_TYPES)}, got {kind!r}")
    if kind == "array":
        return ("array", compile_schema(schema.get("items", {"type": "string"}), f"{where}.items")
                if "items" in schema else ANY)
    if kind != "object":
        return (kind,)
    props = schema.get("properties")
    if props is None:
        return ("object", None)
    required = schema.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list) or set(required) - set(props):
        raise PromptError(f"{where}: properties must be an object and required a list of its keys")
    if not isinstance(schema.get("additionalProperties", False), bool):
        raise PromptError(f"{where}: additionalProperties may only be true or false")
    return ("object", tuple((json.dumps(k, ensure_ascii=False).encode()[1:-1], compile_schema(v, f"{where}.{k}"),
                             k in required) for k, v in props.items()))


def response_schema(response_format: Any) -> tuple:
    """The root node of an OpenAI-style response_format: {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"schema": {...}}}; the root must be an object or an array."""
    if not isinstance(response_format, dict) or response_format.get("type") not in ("json_object", "json_schema"):
        raise PromptError('response_format must be {"type": "json_object"} or {"type": "json_schema", '
                          '"json_schema": {"schema": ...}}')
    if response_format["type"] == "json_object":
        return ("object", None)
    spec = response_format.get("json_schema")  # OpenAI's: {"name", "schema", "strict", "description"}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    root = compile_schema(schema, "json_schema.schema")
    if root[0] not in ("object", "array"):
        raise PromptError("json_schema.schema: the top level must be an object or an array")
    return root


def start(root: tuple) -> tuple:
    """The state before the first byte: a stack of frames (top last) and the whitespace run."""
    return ((("V", root),), 0)


def done(state: tuple) -> bool:
    return not state[0]


def feed(state: tuple | None, data: bytes) -> tuple | None:
    """The state after `data`, or None when no valid JSON text (of the schema) begins with what was fed."""
    for byte in data:
        if state is None:
            return None
        state = _byte(state, byte)
    return state


def _byte(state: tuple, c: int) -> tuple | None:
    stack, ws = state
    if not stack:
        return None  # the value is complete: nothing may follow
    top = stack[-1]
    kind = top[0]
    if c in _WS and _between(top):
        return (stack, ws + 1) if ws < _MAX_WS else None
    rest = stack[:-1]
    if kind == "V":
        return _value(rest, top[1], c)
    if kind == "S":
        return _string(rest, top, c)
    if kind in ("N", "X"):
        frame = _number(top, c) if kind == "N" else _options(top, c)
        if frame is not None:
            return (rest + (frame,), 0) if frame[0] != "end" else _close(rest, None)
        ended = top[0] == "N" and top[2] in _NUMBER_ENDS or kind == "X" and top[2] in top[1]
        return _byte(_close(rest, None), c) if ended else None
    if kind == "L":
        if c != top[1][0]:
            return None
        return (rest + (("L", top[1][1:]),), 0) if len(top[1]) > 1 else _close(rest, None)
    if kind == "O":
        return _object(rest, top, c)
    return _array(rest, top, c)


def _between(top: tuple) -> bool:
    """Whether whitespace may come here: before a value, or around a container's punctuation."""
    return top[0] == "V" or top[0] == "O" and top[2] != "value" or top[0] == "A" and top[2] != "value"


def _value(rest: tuple, node: tuple, c: int) -> tuple | None:
    kind = node[0]
    if kind == "enum":
        return _options(("X", node[1], b""), c, rest)
    if c == ord("{") and kind in ("any", "object"):
        frame = ("O", node if kind == "object" else ("object", None), "first", 0, None)
    elif c == ord("[") and kind in ("any", "array"):
        frame = ("A", node if kind == "array" else ("array", ANY), "first")
    elif c == ord('"') and kind in ("any", "string"):
        frame = ("S", None, b"", 0, False)
    elif (c == ord("-") or 48 <= c <= 57) and kind in ("any", "number", "integer"):
        return _number_start(rest, kind == "integer", c)
    elif c in b"tf" and kind in ("any", "boolean"):
        frame = ("L", b"rue" if c == ord("t") else b"alse")
    elif c == ord("n") and kind in ("any", "null"):
        frame = ("L", b"ull")
    else:
        return None
    return (rest + (frame,), 0)


def _number_start(rest: tuple, integer: bool, c: int) -> tuple | None:
    frame = _number(("N", integer, "start", 0), c)
    return None if frame is None else (rest + (frame,), 0)


def _number(frame: tuple, c: int) -> tuple | None:
    _, integer, phase, length = frame
    nxt = _NUMBER[phase].get(c)
    if nxt is None or length >= _MAX_NUMBER or integer and nxt in ("dot", "exp"):
        return None
    return ("N", integer, nxt, length + 1)


def _options(frame: tuple, c: int, rest: tuple | None = None) -> Any:
    """An enum's serialized values matched byte by byte; with `rest`, the whole state after the first byte."""
    _, options, sofar = frame
    grown = sofar + bytes([c])
    if not any(o.startswith(grown) for o in options):
        return None
    longer = any(len(o) > len(grown) and o.startswith(grown) for o in options)
    new = ("end",) if grown in options and not longer else ("X", options, grown)
    if rest is None:
        return new
    return _close(rest, None) if new[0] == "end" else (rest + (new,), 0)


def _string(rest: tuple, top: tuple, c: int) -> tuple | None:
    _, options, sofar, escape, is_key = top
    if escape == -1:  # after a backslash
        if c == ord("u"):
            return (rest + (("S", options, sofar, 4, is_key),), 0)
        return (rest + (("S", options, sofar, 0, is_key),), 0) if c in b'"\\/bfnrt' else None
    if escape > 0:
        ok = 48 <= c <= 57 or 65 <= c <= 70 or 97 <= c <= 102
        return (rest + (("S", options, sofar, escape - 1, is_key),), 0) if ok else None
    if c == ord('"'):
        if options is not None and sofar not in options:
            return None
        return _close(rest, sofar if is_key else None)
    if c < 0x20 or options is not None and c == ord("\\"):
        return None
    if options is not None:
        grown = sofar + bytes([c])
        return (rest + (("S", options, grown, 0, is_key),), 0) if any(o.startswith(grown) for o in options) \
            else None
    return (rest + (("S", None, sofar if not is_key else sofar + bytes([c]), -1 if c == ord("\\") else 0,
                     is_key),), 0)


def _object(rest: tuple, top: tuple, c: int) -> tuple | None:
    _, node, phase, index, _key = top
    props = node[1]
    if phase in ("first", "key") and c == ord('"'):
        keys = None if props is None else _next_keys(props, index)
        if keys is not None and not keys:
            return None
        return (rest + (top[:2] + ("key", index, None), ("S", keys, b"", 0, True)), 0)
    if phase in ("first", "comma") and c == ord("}"):
        if props is not None and any(required for _, _, required in props[index:]):
            return None
        return _close(rest, None)
    if phase == "comma" and c == ord(","):
        if props is not None and index >= len(props):
            return None
        return (rest + (top[:2] + ("key", index, None),), 0)
    if phase == "colon" and c == ord(":"):
        child = ANY if props is None else next(n for k, n, _ in props if k == top[4])
        return (rest + (top[:2] + ("value", index, None), ("V", child)), 0)
    return None


def _next_keys(props: tuple, index: int) -> frozenset:
    """The keys that may come next: every property from `index` up to and including the first required one."""
    keys = []
    for key, _, required in props[index:]:
        keys.append(key)
        if required:
            break
    return frozenset(keys)


def _array(rest: tuple, top: tuple, c: int) -> tuple | None:
    _, node, phase = top
    if phase in ("first", "next") and c == ord("]"):
        return _close(rest, None)
    if phase == "next" and c == ord(","):
        return (rest + (("A", node, "item"),), 0)
    if phase in ("first", "item"):
        return _value(rest + (("A", node, "value"),), node[1], c)
    return None


def _close(rest: tuple, key: bytes | None) -> tuple:
    """The frame on top of `rest` has finished (a value, or an object's key when `key` is given): update its
    parent. An empty `rest` means the whole value is done."""
    if not rest:
        return ((), 0)
    parent = rest[-1]
    if parent[0] == "O":
        _, node, phase, index, _ = parent
        if phase == "key":
            props = node[1]
            position = index if props is None else next(i for i, (k, _, _) in enumerate(props) if k == key) + 1
            return (rest[:-1] + (("O", node, "colon", position, key),), 0)
        return (rest[:-1] + (("O", node, "comma", index, None),), 0)
    if parent[0] == "A":
        return (rest[:-1] + (("A", parent[1], "next"),), 0)
    return (rest[:-1], 0)  # a "V" frame: the value it expected has come
