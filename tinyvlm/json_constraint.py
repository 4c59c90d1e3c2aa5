"""Answers constrained to JSON: the sampler takes only tokens whose bytes can continue a valid JSON text (any
object, or what a JSON-Schema subset describes: json_grammar.py), and generation ends with the value.

Each candidate token is tried on the recognizer's state (json_grammar.feed), so a step costs the bytes of the
candidates tried (greedy: the best tokens in order until one fits; sampling: draws without the ones refused); the
prefix is never re-tokenized. Near the end of the token budget, `finish` gives the shortest bytes that complete the
value, and the answer is steered into them, so that it always parses.
"""
from __future__ import annotations

import weakref
from typing import Any

from tinyvlm.json_grammar import _NUMBER_ENDS, ANY, done, feed, response_schema, start

__all__ = ["JsonConstraint", "finish", "response_schema"]


def finish(state: tuple) -> bytes:
    """The shortest bytes that complete the value from `state` (closing strings, containers, required keys):
    what a constrained answer is steered into when its token budget runs out."""
    stack = state[0]
    out = b""
    key: bytes | None = None  # an object's key completed by the frame above it
    for frame in reversed(stack):
        kind = frame[0]
        if kind == "V":
            out += _minimal(frame[1])
        elif kind == "L":
            out += frame[1]
        elif kind == "N":
            out += b"" if frame[2] in _NUMBER_ENDS else b"0"
        elif kind == "X":
            out += min((o for o in frame[1] if o.startswith(frame[2])), key=len)[len(frame[2]):]
        elif kind == "S":
            _, options, sofar, escape, is_key = frame
            rest = b"n" if escape == -1 else b"0" * escape
            if options is not None:
                chosen = min((o for o in options if o.startswith(sofar)), key=len)
                rest, key = chosen[len(sofar):], chosen if is_key else None
            elif is_key:
                key = sofar
            out += rest + b'"'
        elif kind == "A":
            out += (_minimal(frame[1][1]) if frame[2] == "item" else b"") + b"]"
        else:
            out += _finish_object(frame, key)
            key = None
    return out


def _minimal(node: tuple) -> bytes:
    kind = node[0]
    if kind == "enum":
        return min(node[1], key=len)
    if kind == "object":
        return b"{" + _required(node[1], 0, first=True) + b"}"
    return {"any": b"0", "array": b"[]", "string": b'""', "number": b"0", "integer": b"0", "boolean": b"true",
            "null": b"null"}[kind]


def _required(props: tuple | None, index: int, first: bool) -> bytes:
    """The required properties from `index` on, each with a minimal value, comma-separated."""
    parts = [b'"' + k + b'":' + _minimal(n) for k, n, required in (props or ())[index:] if required]
    return (b"" if first or not parts else b",") + b",".join(parts)


def _finish_object(frame: tuple, key: bytes | None) -> bytes:
    _, node, phase, index, pending = frame
    props = node[1]
    if phase == "key" and key is None:  # after a comma: a key is due
        return _key_then_rest(props, index)
    if phase == "key":  # the key string above has just been completed (as `key`)
        position = index if props is None else next(i for i, (k, _, _) in enumerate(props) if k == key) + 1
        child = ANY if props is None else next(n for k, n, _ in props if k == key)
        return b":" + _minimal(child) + _required(props, position, first=False) + b"}"
    if phase == "colon":
        child = ANY if props is None else next(n for k, n, _ in props if k == pending)
        return b":" + _minimal(child) + _required(props, index, first=False) + b"}"
    if phase == "value":  # the value above has just been completed
        return _required(props, index, first=False) + b"}"
    if phase == "first":
        return _required(props, index, first=True) + b"}"
    return _required(props, index, first=False) + b"}"  # "comma": after a value


def _key_then_rest(props: tuple | None, index: int) -> bytes:
    """After a comma, an object must go on with a key: the next required one, or the next one at all."""
    if props is None:
        return b'"":0}'
    candidates = [(k, n) for k, n, r in props[index:] if r] or [(k, n) for k, n, _ in props[index:index + 1]]
    k, n = candidates[0]
    position = next(i for i, (key, _, _) in enumerate(props) if key == k) + 1
    return b'"' + k + b'":' + _minimal(n) + _required(props, position, first=False) + b"}"


_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its tokens' bytes
_BY_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ({bytes: token id}, longest)


class JsonConstraint:
    """One answer's constraint: the recognizer's state, advanced by each chosen token."""

    def __init__(self, root: tuple, tokenizer: Any) -> None:
        table = _TOKEN_BYTES.get(tokenizer)
        if table is None:  # each token's bytes, once per tokenizer; special tokens have none
            table = _TOKEN_BYTES[tokenizer] = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self._bytes = table
        if tokenizer not in _BY_BYTES:  # bytes -> a token that is exactly them (the first such id); longest bytes
            by_bytes: dict[bytes, int] = {}
            for i, data in enumerate(table):
                if data:
                    by_bytes.setdefault(data, i)
            _BY_BYTES[tokenizer] = (by_bytes, max(map(len, by_bytes), default=1))
        self._by_bytes, self._longest = _BY_BYTES[tokenizer]
        self.root = root
        self.state: tuple | None = start(root)
        self.closing: bytes | None = None  # while set, the answer is being closed with these bytes
        self.budget: int | None = None  # tokens left, when allows() must keep the end within them
        self.tried = 0  # candidate tokens checked, over the whole answer

    def allows(self, token: int) -> bool:
        """Whether `token` can come next (never a token without bytes, such as end-of-sequence); while closing,
        only a token that follows `finish` does."""
        self.tried += 1
        data = self._bytes[token] if 0 <= token < len(self._bytes) else b""
        if self.closing is not None:
            return bool(data) and self.closing.startswith(data)
        new = feed(self.state, data) if data else None
        if new is None:
            return False
        # near the end of the budget, a token may not leave more to close than the tokens after it can write
        return self.budget is None or len(finish(new)) <= self.budget - 1

    def closing_token(self) -> int | None:
        """While closing: the token covering the most of the closing bytes (the fewest tokens to the end)."""
        if self.closing is None:
            return None
        for length in range(min(len(self.closing), self._longest), 0, -1):
            token = self._by_bytes.get(self.closing[:length])
            if token is not None:
                return token
        return None

    def shortest(self) -> int:
        """How many tokens the shortest valid answer takes (each the longest token that fits)."""
        rest, count = finish(start(self.root)), 0
        while rest:
            token = next((self._by_bytes[rest[:n]] for n in range(min(len(rest), self._longest), 0, -1)
                          if rest[:n] in self._by_bytes), None)
            if token is None:
                return len(rest) + count
            rest, count = rest[len(self._bytes[token]):], count + 1
        return count

    def close_within(self, tokens_left: int) -> None:
        """Steer into the shortest completion once it needs about all the tokens left (a byte each, at worst)."""
        rest = finish(self.state) if self.state is not None else b""
        self.closing = rest if len(rest) + 1 >= tokens_left else None
        # the budget check of `allows`: while the end can still be written a byte a token, and is near
        self.budget = tokens_left if len(rest) < tokens_left <= len(rest) + 64 else None

    def advance(self, token: int) -> None:
        self.state = feed(self.state, self._bytes[token])

    @property
    def done(self) -> bool:
        return self.state is not None and done(self.state)
