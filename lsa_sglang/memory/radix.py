"""LSARadixCache: SGLang's radix cache that knows LSA released some of a request's cells.

A released chunk's `req_to_token` entries point at the reserved padding page; freeing them
would hand page 0 to the allocator. `free_kv_row` therefore frees only the pages the
request still owns, and `on_release` returns the request's host chunks and prefetched cells.
Registered as `--radix-cache-backend lsa`; with the prefix cache on, LSA requests are not
inserted into the tree (their rows hold released chunks), so prefix reuse covers non-LSA
requests only until the tree tracks chunk residency.
"""

from __future__ import annotations

from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for start, end in ranges:
        cur = start
        for hs, he in holes:
            if he <= cur or hs >= end:
                continue
            if hs > cur:
                out.append((cur, hs))
            cur = max(cur, he)
        if cur < end:
            out.append((cur, end))
    return out


def _manager():
    from lsa_sglang.attention.backend import active_backend

    backend = active_backend()
    return None if backend is None else backend.manager


class LSARadixCache(UnifiedRadixCache):
    def free_kv_row(self, kv, ranges):
        m = _manager()
        if m is not None:
            ranges = _subtract(list(ranges), m.released_ranges(kv.req_pool_idx))
        super().free_kv_row(kv, ranges)

    def checkpoint(self, req, *, up_to: int, **kwargs) -> None:
        m = _manager()
        if m is not None and m.released_ranges(req.kv.req_pool_idx):
            return  # rows with released chunks must not enter the tree
        super().checkpoint(req, up_to=up_to, **kwargs)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        m = _manager()
        if m is not None:
            m.release(req.kv.req_pool_idx)
            m.forget_request(req.rid)


def create_lsa_radix_cache(ctx):
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    return create_unified_radix_cache(ctx, cache_class=LSARadixCache)
