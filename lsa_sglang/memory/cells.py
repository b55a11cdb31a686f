"""DeviceCells: a request row's device side, in SGLang's own KV pool.

A chunk is one page of the pool; a resident chunk's `req_to_token` entries point at a page
the request owns, a released one's at `SENTINEL_SLOT`. Pages come from SGLang's allocator and
go back to it (`returned` tells the scheduler hook to reopen admission); host chunks are
copied into them by the chunk-copy kernels.
"""

from __future__ import annotations

import torch

from lsa_sglang.indexer import chunk_keys_from_pages, page_minmax
from lsa_sglang.kernels import copy_chunks_to_device
from lsa_sglang.memory.state import SENTINEL_SLOT


class DeviceCells:
    def __init__(self, model_runner, chunk_size: int, poison_released: bool) -> None:
        self.cs = chunk_size
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        pool = model_runner.token_to_kv_pool
        self.k_buffers = [pool.get_key_buffer(i) for i in range(pool.layer_num)]
        self.v_buffers = [pool.get_value_buffer(i) for i in range(pool.layer_num)]
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.device = self.k_buffers[0].device
        self.num_layers, (_, self.kv_heads, self.head_dim) = len(self.k_buffers), self.k_buffers[0].shape
        self.dtype = self.k_buffers[0].dtype
        # one chunk of KV, all layers
        self.page_bytes = 2 * self.num_layers * self.cs * self.kv_heads * self.head_dim * self.dtype.itemsize
        self.poison = poison_released  # test mode: released cells are overwritten with NaN
        self.radix = None  # the process's prefix cache, evicted from when the allocator is short
        # Set whenever device memory goes back to SGLang (cells freed, tree pages unlocked).
        self.returned = False

    def page_of(self, idx: int, chunk: int) -> int:
        """The page a row's chunk points at (`SENTINEL_SLOT` when released)."""
        return int(self.req_to_token[idx, chunk * self.cs]) // self.cs

    def page_slots(self, pages: list[int]) -> torch.Tensor:
        p = torch.tensor(pages, dtype=torch.int64, device=self.device)
        return (p[:, None] * self.cs + torch.arange(self.cs, device=self.device)).reshape(-1)

    def set_rows(self, idx: int, chunks: list[int], pages: list[int] | None) -> None:
        """Point a row's chunks at `pages` (None: at the sentinel, released)."""
        row = self.req_to_token[idx]
        for i, c in enumerate(chunks):
            if pages is None:
                row[c * self.cs : (c + 1) * self.cs] = SENTINEL_SLOT
            else:
                row[c * self.cs : (c + 1) * self.cs] = torch.arange(
                    pages[i] * self.cs, (pages[i] + 1) * self.cs, dtype=row.dtype, device=row.device
                )

    def alloc(self, n: int) -> list[int] | None:
        """n device pages from SGLang's allocator, evicting unlocked prefix-cache entries
        first when it is short."""
        if n == 0:
            return []
        got = self.allocator.alloc(n * self.cs)
        if got is None and self.radix is not None:
            self.allocator.evict_to_free_tokens(self.radix, n * self.cs)
            got = self.allocator.alloc(n * self.cs)
        if got is None:
            return None
        return got[:: self.cs].div(self.cs, rounding_mode="floor").tolist()

    def alloc_spare(self, n: int, reserved_tokens) -> list[int] | None:
        """n free pages, without evicting, only if `reserved_tokens()` (what the prefill adder
        keeps free for the running requests) still fit after them."""
        if n == 0:
            return []
        if self.allocator.available_size() - n * self.cs < reserved_tokens():
            return None
        got = self.allocator.alloc(n * self.cs)
        return None if got is None else got[:: self.cs].div(self.cs, rounding_mode="floor").tolist()

    def free(self, pages: list[int]) -> None:
        if not pages:
            return
        slots = self.page_slots(pages)
        if self.poison:
            for k, v in zip(self.k_buffers, self.v_buffers):
                k.index_fill_(0, slots, float("nan"))
                v.index_fill_(0, slots, float("nan"))
        self.allocator.free(slots)
        self.returned = True

    def order_after(self, event) -> None:
        """Work queued from now on the device's current stream (a forward writing into pages
        freed meanwhile, a copy reading host slots) waits for `event`, a side-stream copy out of
        the pages; the host does not wait. None (a copy complete on return): nothing to order."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Device page to device page, every layer."""
        s, d = self.page_slots(src), self.page_slots(dst)
        for k, v in zip(self.k_buffers, self.v_buffers):
            k[d] = k[s]
            v[d] = v[s]

    def load(self, host_buffer: torch.Tensor, slots: list[int], pages: list[int]) -> None:
        """Copy host chunks into device pages and wait for the copy."""
        done = copy_chunks_to_device(host_buffer, slots, self.k_buffers, self.v_buffers, pages)
        if done is not None:
            done.synchronize()

    def chunk_keys(self, pages: torch.Tensor, target_layers: list[int]):
        """Frozen keys of whole chunks: mean, min, max post-RoPE key at the target layers
        (``[N, L, Hk, Dh]`` float32) and every layer's key min and max ``[N, 2, all layers, Hk,
        Dh]`` (bfloat16, for `reselect`); one layer's keys gathered at a time."""
        target, bounds = {}, []
        for layer, kb in enumerate(self.k_buffers):
            k = kb.view(-1, self.cs, *kb.shape[1:]).index_select(0, pages)  # [N, cs, Hk, Dh]
            lo, hi = page_minmax(k)
            bounds.append(torch.stack([lo, hi], dim=1).to(torch.bfloat16))
            if layer in target_layers:
                target[layer] = (chunk_keys_from_pages(k), lo.float(), hi.float())
        mean, kmin, kmax = (torch.stack([target[l][i] for l in target_layers], dim=1) for i in range(3))
        return mean, kmin, kmax, torch.stack(bounds, dim=2)
