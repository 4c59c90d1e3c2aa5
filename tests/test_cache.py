"""KVCache: positions written, read back as views, committed, checked for room, truncated; on every backend."""
from __future__ import annotations

import numpy as np
import pytest

from tinyvlm.backends import Backend
from tinyvlm.cache import INITIAL_POSITIONS, KVCache
from tinyvlm.errors import PromptError


def test_kv_cache_positions(backend: Backend) -> None:
    cache = KVCache(n_layers=2, n_kv_heads=3, max_len=6, head_dim=4, backend=backend)
    assert cache.k.shape == (2, 6, 3, 4) and cache.k.dtype == np.float32 and cache.free == 6
    chunk = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)  # (Hkv, T, Dh)
    cache.check_room(4)
    cache.write(1, chunk, -chunk)
    np.testing.assert_array_equal(cache.keys(1), chunk)
    np.testing.assert_array_equal(cache.values(1), -chunk)
    keys, values, length = cache.layer(1)
    assert keys.shape == (6, 3, 4) and keys.flags.c_contiguous and length == 4
    np.testing.assert_array_equal(keys[:4].transpose(1, 0, 2), chunk)
    cache.advance(4)
    assert (cache.pos, cache.free) == (4, 2)
    cache.write(1, chunk[:, :2] + 100, chunk[:, :2])
    assert cache.keys(1).shape == (3, 6, 4)
    np.testing.assert_array_equal(cache.keys(1)[:, 4:], chunk[:, :2] + 100)
    cache.advance(2)
    with pytest.raises(PromptError, match=r"^1 tokens at position 6 do not fit the context of 6 \(0 free\)$"):
        cache.check_room(1)
    cache.check_room(0)
    cache.truncate(3)
    assert cache.keys(0).shape == (3, 3, 4) and cache.free == 3
    with pytest.raises(PromptError, match="holds 3 tokens"):
        cache.truncate(5)
    cache.reset()
    assert cache.pos == 0 and cache.keys(0).shape == (3, 0, 4)


def test_cache_memory_is_untouched_until_written(backend: Backend) -> None:
    """Position-major (L, S, Hkv, Dh): a layer's first n positions are one block, so a fresh cache's memory stays
    unwritten zeros past them."""
    cache = KVCache(n_layers=3, n_kv_heads=2, max_len=10, head_dim=4, backend=backend)
    cache.write(2, np.ones((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32))
    assert cache.k[2, :3].all() and not cache.k[2, 3:].any() and not cache.k[:2].any()


def test_cache_grows_as_positions_are_used(backend: Backend) -> None:
    """A context length comes from the model file: the arrays start at INITIAL_POSITIONS and double as chunks need
    more room, keeping what was written, up to max_len."""
    cache = KVCache(n_layers=2, n_kv_heads=1, max_len=2**24, head_dim=2, backend=backend)
    assert cache.k.shape == (2, INITIAL_POSITIONS, 1, 2) and cache.free == 2**24
    first = np.arange(2 * (INITIAL_POSITIONS - 1), dtype=np.float32).reshape(1, -1, 2)  # (Hkv, T, Dh)
    for layer in (0, 1):
        cache.write(layer, first, -first)
    cache.advance(first.shape[1])
    cache.write(0, np.ones((1, 3, 2), np.float32), np.ones((1, 3, 2), np.float32))  # 2 past the room: doubles
    assert cache.k.shape == (2, 2 * INITIAL_POSITIONS, 1, 2)
    np.testing.assert_array_equal(cache.keys(0)[:, :-3], first)
    np.testing.assert_array_equal(cache.values(1)[:, :-3], -first)
    assert cache.keys(0)[:, -3:].tolist() == [[[1, 1]] * 3]
    small = KVCache(n_layers=1, n_kv_heads=1, max_len=INITIAL_POSITIONS + 5, head_dim=2, backend=backend)
    small.write(0, np.zeros((1, INITIAL_POSITIONS + 5, 2), np.float32), np.zeros((1, INITIAL_POSITIONS + 5, 2),
                                                                                np.float32))
    assert small.k.shape[1] == INITIAL_POSITIONS + 5  # never past max_len
