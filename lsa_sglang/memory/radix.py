"""LSARadixCache: SGLang's radix prefix cache, kept on for LSA requests.

Two tiers hold a cached prefix: the tree's device pages (SGLang's own radix tree, evicted
least recently used under device pressure) and the host mirror's content-addressed chunks
(evicted least recently used under host pressure). An LSA request lives with both:

- prefill runs as usual: a matched prefix is not recomputed, and after prefill SGLang puts
  the prompt into the tree, which then owns its pages and is locked by the request;
- at its first decode step the request mirrors its chunks (sharing those the host already
  holds), copies the tree pages of its resident chunks into cells of its own and lets go of
  the tree (`detach`): the prompt stays cached but evictable, the request holds ~10% of it;
- a released chunk's `req_to_token` entries point at the reserved padding page; freeing
  them would hand page 0 to the allocator, so `free_kv_row` frees only pages it owns;
- when it finishes, its row is made insertable (`LSAMemoryManager.prepare_insert`: chunks
  the tree still has point at the tree's pages, released ones after them are loaded back
  from the host) and SGLang inserts it, so the next turn of a chat reuses it; it enters the
  tree at a low priority, so with the launcher's `--radix-eviction-policy priority` device
  pressure drops these host-backed rows before rows that exist only on the device;
- `on_release` returns the request's host chunk references and prefetched cells;
  `reset` (`/flush_cache`) empties the tree and the host cache.
Registered as `--radix-cache-backend lsa`.
"""

from __future__ import annotations

from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

HOST_BACKED_PRIORITY = -2  # tree priority of rows an LSA request inserts (lower: evicted first)


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


class LSARadixCache(UnifiedRadixCache):
    def __init__(self, params, session) -> None:
        """`session`: this process's lsa_sglang.session.Session (its memory manager, None
        while no `lsa` attention backend serves, leaves every method stock)."""
        self.lsa = session  # set first: SGLang's __init__ already calls reset()
        super().__init__(params)
        session.attach_radix(self)

    def detach(self, req) -> None:
        """The request no longer reads the tree's pages: unlock its prefix (now evictable)."""
        self.unlock(req.lock)
        req.lock = None
        req.kv.cache_protected_len = 0

    def free_kv_row(self, kv, ranges):
        m = self.lsa.manager
        if m is not None:
            ranges = _subtract(list(ranges), m.released_ranges(kv.req_pool_idx))
        super().free_kv_row(kv, ranges)

    def match_prefix(self, params):
        """SGLang's device match, extended by chunks only the host mirror still holds."""
        result = super().match_prefix(params)
        m = self.lsa.manager
        if m is None or self.disable or params.req is None:
            return result
        if m.load_back(params.key, result, self):
            result = super().match_prefix(params)
        return result

    def checkpoint(self, req, *, up_to: int, **kwargs) -> None:
        m = self.lsa.manager
        table = None if m is None else m.table_of(req)
        if table is None or not table.config.enabled:
            super().checkpoint(req, up_to=up_to, **kwargs)
            return
        if self.disable or not req.finished():
            return  # a decoding LSA row holds released chunks: only its final insert publishes
        up_to = m.prepare_insert(req, up_to, self)
        if up_to > 0:
            # host-backed: under the `priority` eviction policy the device tier drops these
            # before rows of dense requests (prompt part at HOST_BACKED_PRIORITY + 1)
            req.priority = HOST_BACKED_PRIORITY
            super().checkpoint(req, up_to=up_to, **kwargs)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        m = self.lsa.manager
        if m is not None:
            m.release(req.kv.req_pool_idx)
            m.forget_request(req.rid)

    def reset(self) -> None:
        super().reset()
        m = self.lsa.manager
        if m is not None:
            m.host.flush()


def create_lsa_radix_cache(ctx, session):
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    return create_unified_radix_cache(ctx, cache_class=lambda params: LSARadixCache(params, session))
