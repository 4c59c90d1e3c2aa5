"""tinyvlm.limits: the bounded JSON parser and the checked readers every file format goes through."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tinyvlm.errors import ConfigError, WeightsError
from tinyvlm.limits import (MAX_INT_DIGITS, MAX_JSON_BYTES, MAX_NESTING, REQUIRED, choices, flag, integer, integers,
                            nesting, parse_json, read_json_file, read_table, real, short, text)

BACKEND_FREE = True


def test_parse_json_reads_what_json_reads() -> None:
    doc = {"a": [1, -2, 3.5, None, True, "x\"]}"], "b": {"c": 2**64 - 1}}
    assert parse_json(json.dumps(doc).encode(), "f", ConfigError) == doc
    assert parse_json('{"n": NaN}', "f", ConfigError)["n"] != 0  # read; range checks refuse it later


@pytest.mark.parametrize("data, message", [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deep"),  # Python's parser would recurse
    (b'{"a":' + b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1) + b"}", f"nested {MAX_NESTING + 2} deep"),
    (b'{"a": ' + b"9" * 5000 + b"}", "an integer of 5000 digits"),  # Python's int() would refuse it itself
    (b'{"a": -' + b"1" * (MAX_INT_DIGITS + 1) + b"}", f"an integer of {MAX_INT_DIGITS + 1} digits"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"a": }', "not valid JSON"),
])
def test_parse_json_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^f: .*{message}"):
        parse_json(data, "f", ConfigError)


def test_json_size_limit(tmp_path: Path) -> None:
    big = tmp_path / "config.json"
    with open(big, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: checked by size before it is read
    with pytest.raises(WeightsError, match=f"above the limit of {MAX_JSON_BYTES}"):
        read_json_file(big, WeightsError)
    with pytest.raises(WeightsError, match="above the limit"):
        parse_json(b" " * (MAX_JSON_BYTES + 1), "f", WeightsError)


def test_nesting_is_iterative() -> None:
    deep: list = []
    for _ in range(50_000):
        deep = [deep]
    assert nesting(deep) == 50_001 and nesting(5) == 0 and nesting({"a": [1, {"b": []}]}) == 4


@pytest.mark.parametrize("value", [True, 1.0, "1", [1], None, -1, 11, np.float32(2)])
def test_integer_refuses(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^k is .*; expected an integer from 0 to 10$"):
        integer(value, "k", ConfigError, 0, 10)


def test_checked_values() -> None:
    assert integer(np.int64(3), "k", ConfigError) == 3 and type(integer(np.int64(3), "k", ConfigError)) is int
    assert real(2, "k", ConfigError) == 2.0 and real(1.0, "k", ConfigError, 0, 1, above=True) == 1.0
    for bad in (math.nan, math.inf, -math.inf, 0.0, "1e-6", None, [1e-6]):
        with pytest.raises(ConfigError, match=r"expected a finite number in \(0, 1\]"):
            real(bad, "eps", ConfigError, 0, 1, above=True)
    assert text("x", "k", ConfigError) == "x" and flag(False, "k", ConfigError) is False
    for check, bad in ((text, 5), (flag, 1), (flag, "true")):
        with pytest.raises(ConfigError, match="^k is "):
            check(bad, "k", ConfigError)
    with pytest.raises(ConfigError, match=r"expected one of 'a', 'b'"):
        choices(("a", "b"), ConfigError)(["a"], "k")  # a list is not hashable: still a clear error


def test_read_table() -> None:
    table = {"n": (integers(1, 4, ConfigError), REQUIRED), "m": (integers(1, 4, ConfigError), 2)}
    assert read_table({"n": 3, "m": None}, table, "c.json", ConfigError) == {"n": 3, "m": 2}  # null: the default
    with pytest.raises(ConfigError, match="^c.json: missing key 'n'$"):
        read_table({"m": 1}, table, "c.json", ConfigError)
    with pytest.raises(ConfigError, match="^c.json: n is 0; expected an integer from 1 to 4$"):
        read_table({"n": 0}, table, "c.json", ConfigError)


def test_short_bounds_hostile_values() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert len(short(deep)) < 40 and len(short("x" * 10**6)) < 80 and len(short(2**8000)) < 60
