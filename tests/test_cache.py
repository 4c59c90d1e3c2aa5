"""KVCache: positions written, read back as views, committed, checked for room, truncated; on every backend."""
from __future__ import annotations

import numpy as np
import pytest

from tinyvlm.backends import Backend
from tinyvlm.cache import KVCache
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
