"""The image-embedding cache: the projector outputs of recent images, so that a second question about the same image
(a new turn, `/image`, another `generate` call, another server request) skips the vision tower.

Keyed by a hash of the preprocessed pixels (BLAKE2b of their float32 bytes and shape), so the same picture reached
through another path, file or copy hits; an LRU of `size` entries (one entry of MobileVLM_V2-1.7B: 144 x 2048
float32, 1.2 MB). Cached arrays are shared: callers read them, never write into them.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

from tinyvlm.errors import TinyVLMError

DEFAULT_SIZE = 8


class ImageCache:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TinyVLMError(f"the image cache size must be an integer of at least 0 (0: off), got {size!r}")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(pixels: np.ndarray) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr(pixels.shape).encode())
        digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
        return digest.digest()

    def get(self, key: bytes) -> Any:
        """The cached projector output for `key` (now the most recent), or None."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: bytes, value: Any) -> None:
        if self.size == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)  # the least recently used

    def clear(self) -> None:
        self._entries.clear()
