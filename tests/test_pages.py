"""weights/pages.release: a read-only memory-mapped array's pages leave this process's memory, its values stay
readable and unchanged; any other array (anonymous memory, a copy-on-write map that may hold changes) is left alone."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tinyvlm.weights.pages import release

BACKEND_FREE = True  # no model runs here
SIZE = 32 << 20  # bytes


def rss_file_kib() -> int:
    """This process's resident file-backed memory (Linux), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture()
def data_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    values = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    values.tofile(path)
    return path, values


def test_read_only_map_gives_back_its_pages_and_keeps_its_values(data_file) -> None:
    path, values = data_file
    mapped = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)  # as weights/safetensors.py maps files
    part = mapped[4096 + 7:].view(np.uint8)  # a view inside, not page-aligned
    assert int(part.sum(dtype=np.int64)) == int(values[4096 + 7:].sum(dtype=np.int64))  # every page touched
    if sys.platform.startswith("linux"):
        before = rss_file_kib()
        release(part)
        assert before - rss_file_kib() >= SIZE // 1024 // 2
    else:
        release(part)
    assert np.array_equal(part, values[4096 + 7:])  # read back from the page cache, unchanged


def test_other_memory_is_left_alone(data_file) -> None:
    path, values = data_file
    anonymous = values.copy()
    release(anonymous)
    assert np.array_equal(anonymous, values)  # MADV_DONTNEED would have zeroed it
    private = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: changes live only in this process
    private[:4096] = 0
    release(private)
    assert not private[:4096].any() and np.array_equal(private[4096:], values[4096:])
