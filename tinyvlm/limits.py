"""Model files come from strangers: the limits on what tinyvlm reads from them, and the checked readers every parser
uses, so that a bad value is refused where it is parsed, before anything is allocated from it.

Limits. Each is far above any published model and low enough that nothing built from a value below it can take
unbounded time or memory. Counts that the file itself can vouch for (tensors, layers, array items, tensor bytes)
are checked against the file instead: a layer count against the layers whose tensors are present, a tensor's
bytes against the bytes behind it, an array's length against the bytes left.

Checked readers. `parse_json` bounds a JSON document's size, nesting and integer digits (Python's own parser
fails on a 100k-deep document or a 5,000-digit number with errors of its own). `integer`, `real`, `text`
and `flag` check one value read from a file for type and range, and raise the caller's error class with the file,
the key and the value, shortened by `short` (the repr of a hostile value can be huge, or nested too deep to print).
"""
from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tinyvlm.errors import TinyVLMError

MAX_JSON_BYTES = 100 * 2**20  # a JSON file or safetensors header (safetensors' own cap on its header is 100 MB)
MAX_NESTING = 64  # JSON objects / arrays, and GGUF arrays of arrays
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; Python refuses to parse more than 4,300
MAX_ARRAY_ITEMS = 2**24  # values in a GGUF file's metadata arrays, all together (a 256k vocabulary needs 1 M)
MAX_DIMS = 8  # dimensions of one tensor (GGUF's own limit is 4)
MAX_ELEMENTS = 2**48  # elements of one tensor, counting a 0-sized dimension as 1 (NumPy refuses shapes past 2**63)
MAX_CONTEXT = 2**24  # positions (16 M; the longest published context is 10 M); tables grow only as used
MAX_WIDTH = 2**20  # hidden, feed-forward, head and image sizes, head counts
MAX_HEAD_WIDTH = 4  # all the heads of a layer (Hq x Dh) are at most this many times the hidden size (Gemma: 1.33)
MAX_PATCHES = 4096  # image patches of a vision tower (576 for ViT-L/14-336): its attention is P x P
MAX_TENSORS = 2**16  # tensors in one file, and GGUF metadata keys (a 405B LLaMA GGUF has 1,138 tensors)
MAX_MERGES = 2**20  # BPE merges of a vocabulary (LLaMA's SentencePiece vocabulary makes about 60k)
MAX_LAYERS = 4096  # layers of a tower or decoder (also checked against the layers whose tensors are present)
MAX_VOCAB = 2**24  # tokens of a vocabulary
MAX_ROPE_BASE = 1e12  # RoPE's theta (Llama 3 uses 5e5; some long-context models 1e9)
MAX_TOKENIZER_BYTES = 100 * 2**20  # a tokenizer.model
MAX_PIECE_CHARS = 256  # one SentencePiece piece (LLaMA's longest is 16): a piece of n makes n - 1 merges of n
MAX_PICKLE_BYTES = 100 * 2**20  # data.pkl of a torch checkpoint (its tensors' bytes are in other members)

_SHORT = reprlib.Repr()  # Python 3.11's takes no arguments
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 60, 60, 40
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 6


def short(value: object) -> str:
    """A repr of `value` that is bounded in length and depth, for error messages about untrusted values."""
    return _SHORT.repr(value)


def shown(name: str) -> str:
    """A name from a file as it is when it is short and printable, else shortened and escaped by `short`."""
    return name if len(name) <= 100 and name.isprintable() else short(name)


def _digits(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s.lstrip('-'))} digits (the limit is {MAX_INT_DIGITS})")
    return int(s)


def read_json_file(path: Path, error: type[TinyVLMError]) -> Any:
    """The JSON value in the file at `path` (see parse_json), its size checked before it is read."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes, above the limit of {MAX_JSON_BYTES} for a JSON file")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_json(data, str(path), error)


def read_json_object(path: Path, error: type[TinyVLMError]) -> dict[str, Any]:
    """read_json_file for a file that must hold a JSON object."""
    data = read_json_file(path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def nesting(value: object) -> int:
    """How deep the lists and dicts of a parsed JSON value nest (0 for a scalar), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes | str, where: str, error: type[TinyVLMError]) -> Any:
    """`data` parsed as JSON, or `error` naming `where` and what is wrong: too large, too deep, too many digits,
    not UTF-8, or not JSON. NaN and Infinity are read (as Python's json does); range checks refuse them later."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{where}: {len(data)} bytes of JSON, above the limit of {MAX_JSON_BYTES}")
    try:
        value = json.loads(data.decode("utf-8"), parse_int=_digits)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e})") from None
    except RecursionError:  # CPython's parser guards its recursion with the interpreter's limit (about 1,000)
        raise error(f"{where}: JSON nested too deep (the limit is {MAX_NESTING})") from None
    except ValueError as e:  # JSONDecodeError is a ValueError, as are _digits' refusals
        raise error(f"{where}: not valid JSON ({e})") from None
    depth = nesting(value)
    if depth > MAX_NESTING:
        raise error(f"{where}: JSON nested {depth} deep, above the limit of {MAX_NESTING}")
    return value


def elements(shape: tuple[int, ...] | list[int]) -> int:
    """The product of a shape's dimensions with 0 counted as 1: what MAX_ELEMENTS bounds, so that a tensor with a
    0-sized dimension cannot smuggle a shape NumPy refuses past a bytes-against-the-file check."""
    return math.prod(max(int(n), 1) for n in shape)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(value: object, what: str, error: type[TinyVLMError], lo: int = 0, hi: int = 2**63 - 1) -> int:
    """`value` as an int if it is an integer in [lo, hi] (not a bool, float or string), else `error`."""
    if not _is_int(value) or not lo <= value <= hi:
        bound = f">= {lo}" if hi == 2**63 - 1 else f"from {lo} to {hi}"
        raise error(f"{what} is {short(value)}; expected an integer {bound}")
    return int(value)


def real(value: object, what: str, error: type[TinyVLMError], lo: float = -math.inf, hi: float = math.inf, *,
         above: bool = False) -> float:
    """`value` as a float if it is a finite number in [lo, hi] (or (lo, hi] when `above`), else `error`."""
    number = float(value) if _is_int(value) or isinstance(value, (float, np.floating)) else math.nan
    if not math.isfinite(number) or number > hi or number < lo or (above and number == lo):
        bound = f"{'(' if above else '['}{lo:g}, {hi:g}]"
        raise error(f"{what} is {short(value)}; expected a finite number in {bound}")
    return number


def text(value: object, what: str, error: type[TinyVLMError]) -> str:
    """`value` if it is a string, else `error`."""
    if not isinstance(value, str):
        raise error(f"{what} is {short(value)}; expected a string")
    return value


def flag(value: object, what: str, error: type[TinyVLMError]) -> bool:
    """`value` if it is a bool, else `error`."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{what} is {short(value)}; expected true or false")
    return bool(value)


REQUIRED = object()  # a default that means "the key must be present"
Check = Callable[[object, str], Any]  # (value, "file: key") -> the value, checked, or an error


def integers(lo: int, hi: int, error: type[TinyVLMError]) -> Check:
    return lambda value, what: integer(value, what, error, lo, hi)


def reals(lo: float, hi: float, error: type[TinyVLMError], above: bool = False) -> Check:
    return lambda value, what: real(value, what, error, lo, hi, above=above)


def choices(options: tuple[str, ...], error: type[TinyVLMError]) -> Check:
    def check(value: object, what: str) -> str:
        if value not in options or not isinstance(value, str):
            raise error(f"{what} is {short(value)}; expected one of {', '.join(map(repr, options))}")
        return value
    return check


def read_table(source: Mapping[str, Any], table: Mapping[str, tuple[Check, Any]], where: str,
               error: type[TinyVLMError]) -> dict[str, Any]:
    """Every key of `table` read from `source` and checked: {key: value}. A key that is absent or null takes its
    default (REQUIRED: `error` naming the key); a present one must pass its check."""
    values = {}
    for key, (check, default) in table.items():
        value = source.get(key)
        if value is None:
            if default is REQUIRED:
                raise error(f"{where}: missing key {key!r}")
            values[key] = default
        else:
            values[key] = check(value, f"{where}: {key}")
    return values
