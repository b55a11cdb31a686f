"""HostMirror: the full KV of every LSA request, one slot per chunk, all layers, page-first.

A slot holds `[num_layers, 2, chunk_size, kv_heads, head_dim]` contiguous, so one chunk
moves host<->device as one block. Capacity is fixed by `host_pool_gb`; a request whose
chunks would not fit is refused by admission, never half-mirrored.
"""

from __future__ import annotations

import threading

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
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.capacity - len(self._free)

    def alloc(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise HostMirrorFull(
                    f"host mirror full: need {n} chunk slots, {len(self._free)} of "
                    f"{self.capacity} free"
                )
            out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(slots))

    def check_integrity(self) -> None:
        assert len(set(self._free)) == len(self._free), "host slot freed twice"
        assert all(0 <= s < self.capacity for s in self._free)
