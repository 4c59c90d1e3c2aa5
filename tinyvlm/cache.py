"""Preallocated key/value cache for the LLaMA decoder, written by position.

One array per kind, allocated once with an explicit dtype (style.md (b) 6), position-major as llama.cpp's:
shape (L, S, Hkv, Dh), so the first n positions of a layer are one contiguous block. A forward pass writes
each layer's new keys and values at positions pos .. pos+T-1, reads them back as views up to pos+T, and
advances `pos` once at the end. Why position-major: the arrays are allocated untouched, and memory becomes
resident as it is first written. With the heads outermost (L, Hkv, S, Dh, as llama2.c and gpt-fast keep it),
the first token of every head touched its own pages, and with NumPy's transparent huge pages a 192-token
prompt made the whole 800 MB cache of MobileLLaMA-1.4B resident (prefill 0.46 s slower on the reference VM).

The arrays hold room for at most INITIAL_POSITIONS at first and double when a chunk needs more, up to `max_len`:
a context length comes from a model file, and 2**24 positions of a 7B model would be terabytes of address space.
"""
from __future__ import annotations

from tinyvlm.backends import Array, Backend
from tinyvlm.errors import PromptError


INITIAL_POSITIONS = 256


class KVCache:
    """Keys and values of every layer for up to `max_len` positions."""

    def __init__(self, n_layers: int, n_kv_heads: int, max_len: int, head_dim: int, backend: Backend) -> None:
        self.max_len = max_len
        self._bk = backend
        shape = (n_layers, min(max_len, INITIAL_POSITIONS), n_kv_heads, head_dim)  # (L, S', Hkv, Dh), S' <= S
        self.k = backend.zeros(shape)  # float32, in the backend's memory
        self.v = backend.zeros(shape)
        self.pos = 0  # tokens written and committed so far
        self._end = 0  # pos + T while a forward pass writes a chunk of T tokens, else pos

    @property
    def free(self) -> int:
        """Positions still available."""
        return self.max_len - self.pos

    def check_room(self, n: int, what: str = "tokens") -> None:
        """Raise PromptError unless n more positions fit: the one check that a prompt fits the context."""
        if n > self.free:
            raise PromptError(f"{n} {what} at position {self.pos} do not fit the context of {self.max_len} "
                              f"({self.free} free)")

    def write(self, layer: int, k: Array, v: Array) -> None:
        """Store one layer's keys and values, each (Hkv, T, Dh), at positions pos .. pos+T-1 (check_room first)."""
        end = self.pos + k.shape[1]
        if end > self.k.shape[1]:
            self._grow(end)
        self.k[layer, self.pos:end] = k.transpose(1, 0, 2)  # (Hkv, T, Dh) -> (T, Hkv, Dh)
        self.v[layer, self.pos:end] = v.transpose(1, 0, 2)
        self._end = end

    def _grow(self, n: int) -> None:
        """Room for at least n positions (doubling, at most max_len), keeping the committed ones."""
        L, room, Hkv, Dh = self.k.shape
        room = min(self.max_len, max(n, 2 * room))
        for name in ("k", "v"):
            old, new = getattr(self, name), self._bk.zeros((L, room, Hkv, Dh))
            new[:, :self.pos] = old[:, :self.pos]
            setattr(self, name, new)

    def keys(self, layer: int) -> Array:
        """View of this layer's keys up to the end of the chunk being written: (Hkv, pos+T, Dh), strided."""
        return self.k[layer, :self._end].transpose(1, 0, 2)

    def values(self, layer: int) -> Array:
        """View of this layer's values up to the end of the chunk being written: (Hkv, pos+T, Dh), strided."""
        return self.v[layer, :self._end].transpose(1, 0, 2)

    def layer(self, layer: int) -> tuple[Array, Array, int]:
        """This layer's whole key and value arrays (S', Hkv, Dh), contiguous, and how many positions
        count (pos+T): for kernels that want contiguous memory rather than the strided views above."""
        return self.k[layer], self.v[layer], self._end

    def advance(self, n: int) -> None:
        """Commit the chunk just written: the next forward pass starts at position pos + n."""
        self.pos += n
        self._end = self.pos

    def truncate(self, pos: int) -> None:
        """Forget every position from `pos` on (to rewind a conversation); the arrays are kept."""
        if not 0 <= pos <= self.pos:
            raise PromptError(f"cannot truncate the cache to position {pos}: it holds {self.pos} tokens")
        self.pos = pos
        self._end = pos

    def reset(self) -> None:
        """Empty the cache."""
        self.truncate(0)
