"""HostMirror: the full KV of every LSA request, one slot per chunk, all layers, page-first.

A slot holds `[num_layers, 2, chunk_size, kv_heads, head_dim]` contiguous, so one chunk
moves host<->device as one block. Capacity is fixed by `host_pool_gb`; a request whose
chunks would not fit is refused by admission, never half-mirrored.

Slots are reference counted and content-addressed: a chunk published under its prefix
hash (the hash chain of every token up to the chunk's end) is found again by any request
with the same prefix, which takes a reference instead of copying it. A slot whose last
reference goes stays cached (least recently used first out) until `alloc` needs the room
or `flush` empties the cache; cached slots count as free for admission.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch

from lsa_sglang.kernels import host_mirror_shape


class HostMirrorFull(RuntimeError):
    """Not enough free host slots; nothing was allocated."""


class HostMirror:
    def __init__(
        self,
        num_layers: int,
        chunk_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        budget_bytes: int,
        pin: bool,
    ) -> None:
        self.chunk_bytes = 2 * num_layers * chunk_size * num_kv_heads * head_dim * dtype.itemsize
        self.capacity = budget_bytes // self.chunk_bytes
        if self.capacity < 1:
            raise ValueError(
                f"host_pool_gb holds no chunk: one chunk needs {self.chunk_bytes} bytes"
            )
        shape = host_mirror_shape(self.capacity, num_layers, chunk_size, num_kv_heads, head_dim)
        # torch.empty touches no pages on CPU: the budget is an upper bound, not a commitment.
        self.buffer = torch.empty(shape, dtype=dtype, pin_memory=pin)
        self._free = list(range(self.capacity - 1, -1, -1))
        self._refs: dict[int, int] = {}  # referenced slot -> number of holders
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, published; LRU first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.meta: dict[int, Any] = {}  # published slot -> caller's data (chunk keys)
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        """Slots an allocation can get: never used, or cached without a holder."""
        return len(self._free) + len(self._cached)

    @property
    def used_slots(self) -> int:
        """Slots held by at least one request."""
        return len(self._refs)

    @property
    def cached_slots(self) -> int:
        return len(self._cached)

    def alloc(self, n: int) -> list[int]:
        """n fresh slots, one reference each; evicts least recently used cached slots."""
        with self._lock:
            if n > self.free_slots:
                raise HostMirrorFull(
                    f"host mirror full: need {n} chunk slots, {self.free_slots} of "
                    f"{self.capacity} free"
                )
            while len(self._free) < n:
                slot, _ = self._cached.popitem(last=False)
                self._unpublish(slot)
                self._free.append(slot)
            out = [self._free.pop() for _ in range(n)]
            for slot in out:
                self._refs[slot] = 1
        return out

    def lookup(self, key: bytes) -> int | None:
        """The slot published under `key`, with one more reference; None if not cached."""
        with self._lock:
            slot = self._by_hash.get(key)
            if slot is None:
                return None
            self._cached.pop(slot, None)
            self._refs[slot] = self._refs.get(slot, 0) + 1
            return slot

    def publish(self, slot: int, key: bytes, meta: Any = None) -> None:
        """Make a referenced slot findable by `key` (first publisher wins)."""
        with self._lock:
            assert slot in self._refs, slot
            if key in self._by_hash or slot in self._hash_of:
                return
            self._by_hash[key] = slot
            self._hash_of[slot] = key
            self.meta[slot] = meta

    def release(self, slots: list[int]) -> None:
        """Drop one reference per slot; published slots stay cached, others are freed."""
        with self._lock:
            for slot in slots:
                left = self._refs[slot] - 1
                if left:
                    self._refs[slot] = left
                    continue
                del self._refs[slot]
                if slot in self._hash_of:
                    self._cached[slot] = None
                else:
                    self._free.append(slot)

    def flush(self) -> int:
        """Forget every cached slot without a holder; returns how many were freed."""
        with self._lock:
            n = len(self._cached)
            for slot in self._cached:
                self._unpublish(slot)
                self._free.append(slot)
            self._cached.clear()
            return n

    def refs(self, slot: int) -> int:
        return self._refs.get(slot, 0)

    def _unpublish(self, slot: int) -> None:
        key = self._hash_of.pop(slot, None)
        if key is not None:
            del self._by_hash[key]
        self.meta.pop(slot, None)

    def check_integrity(self) -> None:
        free, cached, held = set(self._free), set(self._cached), set(self._refs)
        assert len(free) == len(self._free), "host slot freed twice"
        assert not (free & cached) and not (free & held) and not (cached & held)
        assert len(free) + len(cached) + len(held) == self.capacity
        assert all(n > 0 for n in self._refs.values())
        assert cached <= set(self._hash_of)
        assert all(self._by_hash[k] == s for s, k in self._hash_of.items())


def prefix_hashes(tokens, chunk_size: int, n: int, extra_key=None, cache_salt=None,
                  known: list[bytes] | None = None) -> list[bytes]:
    """Content address of chunks [0, n): chunk c's hash covers every token up to its end
    (and the request's cache namespace), so equal hashes mean equal KV. `known` are the
    first hashes, already computed."""
    chain = list(known or [])
    prev = chain[-1] if chain else repr((extra_key, cache_salt or None)).encode()
    for c in range(len(chain), n):
        body = torch.tensor(tokens[c * chunk_size : (c + 1) * chunk_size], dtype=torch.int64)
        prev = hashlib.blake2b(prev + body.numpy().tobytes(), digest_size=16).digest()
        chain.append(prev)
    return chain
