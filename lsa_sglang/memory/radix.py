"""LSARadixCache: SGLang's radix prefix cache, kept on for LSA requests.

Two tiers hold a cached prefix: the tree's device pages (SGLang's own radix tree, evicted
least recently used under device pressure) and the host mirror's content-addressed chunks
(evicted least recently used under host pressure). An LSA request lives with both:

- prefill runs as usual: a matched prefix is not recomputed, and after prefill SGLang puts
  the prompt into the tree, which then owns its pages and is locked by the request;
- at its first decode step the request mirrors its chunks (sharing those the host already
  holds), copies the tree pages of its resident chunks into cells of its own and lets go of
  the tree (`hand_over`): the prompt stays cached but evictable, the request holds ~10% of it;
- a released chunk's `req_to_token` entries point at the reserved padding page; freeing
  them would hand page 0 to the allocator, so `free_kv_row` frees only pages it owns;
- when it finishes, its row is made insertable (`_insertable`: chunks the tree still has
  point at the tree's pages, released ones after them are loaded back from the host) and SGLang inserts it, so the next turn of a chat reuses it; it enters the
  tree at a low priority, so with the launcher's `--radix-eviction-policy priority` device
  pressure drops these host-backed rows before rows that exist only on the device;
- a prompt found in the host mirror past the tree's match is loaded back (`_load_back`);
- `on_release` returns the request's host chunk references and prefetched cells;
  `reset` (`/flush_cache`) empties the tree and the host cache.
Registered as `--radix-cache-backend lsa`.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from lsa_sglang.memory.host_mirror import prefix_hashes

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

    def hand_over(self, req, table, resident: set[int]) -> bool:
        """At an LSA request's admission, when the tree holds its prompt's pages: its
        `resident` chunks (and any not mirrored) are copied into cells of its own, the others
        become released chunks, and it lets go of the tree, whose copy stays cached
        (evictable). False: no device room for the copies (nothing changed)."""
        cells, cs, idx = self.lsa.manager.cells, self.lsa.manager.cs, table.req_pool_idx
        tree_chunks = req.kv.cache_protected_len // cs
        keep = [c for c in range(tree_chunks) if c in resident or c >= table.mirrored]
        pages = cells.alloc(len(keep))
        if pages is None:
            return False
        cells.copy_pages([cells.page_of(idx, c) for c in keep], pages)
        drop = [c for c in range(tree_chunks) if c not in set(keep)]
        cells.set_rows(idx, keep, pages)
        cells.set_rows(idx, drop, None)
        table.resident -= set(drop)
        self.detach(req)
        cells.returned = True  # the prompt's tree pages are evictable now
        return True

    def _insertable(self, req, table, up_to: int) -> int:
        """Make the row of a finished LSA request insertable into the tree.

        Chunks the tree already holds point at the tree's pages (the request's own copies
        are duplicates and go back); released chunks after them are loaded back from the
        host mirror into fresh cells. Returns how many tokens can be inserted: the insert
        stops at the first chunk that found no device room."""
        m = self.lsa.manager
        cells, cs, idx = m.cells, m.cs, req.kv.req_pool_idx
        n = up_to // cs
        key = RadixKey(
            req.full_untruncated_fill_ids[: n * cs], req.extra_key,
            is_bigram=self.tree_core.is_eagle, cache_salt=req.cache_salt,
        )
        match = self.match_prefix(MatchPrefixParams(key=key))
        tree = self.path_device_indices(match.last_device_node)[: match.device_prefix_len]
        shared = min(len(tree) // cs, n)
        owned = [c for c in range(shared) if c in table.resident or c >= table.mirrored]
        cells.free([cells.page_of(idx, c) for c in owned])
        row = cells.req_to_token[idx]
        row[: shared * cs] = tree[: shared * cs].to(row.dtype)
        table.resident -= set(range(shared))
        m.server.device_cells_saved += len(owned)
        req.kv.cache_protected_len = shared * cs
        gone = [c for c in range(shared, min(n, table.mirrored)) if c not in table.resident]
        pages = cells.alloc_spare(len(gone), m.reserved_tokens)
        if pages is None:
            return (gone[0] if gone else n) * cs
        if gone:
            cells.load(m.host.buffer, [table.host_slots[c] for c in gone], pages)
            cells.set_rows(idx, gone, pages)
            table.resident |= set(gone)
        return n * cs

    def _load_back(self, key, match) -> int:
        """Chunks of `key` past the tree's device match that the host mirror still holds
        are copied into fresh cells and inserted into the tree, so prefill skips them.
        Returns the number of tokens loaded."""
        m = self.lsa.manager
        cells, cs, host = m.cells, m.cs, m.host
        n = len(key) // cs
        have = match.device_prefix_len // cs
        if key.is_bigram or n <= have:
            return 0
        chain = prefix_hashes(key.raw_token_ids(), cs, n, key.extra_key, key.cache_salt)
        slots = []
        for h in chain[have:]:
            slot = host.lookup(h)
            if slot is None:
                break
            slots.append(slot)
        lock = self.lock(match.last_device_node)  # making room must not evict the match
        try:
            pages = cells.alloc(len(slots)) if slots else None
            if not pages:
                return 0
            cells.load(host.buffer, slots, pages)
            end = (have + len(pages)) * cs
            tree = self.path_device_indices(match.last_device_node)[: have * cs]
            value = torch.cat([tree.to(torch.int64), cells.page_slots(pages).to(tree.device)])
            self.insert(InsertParams(key=key[:end], value=value, prev_prefix_len=have * cs))
        finally:
            host.release(slots)
            self.unlock(lock)
        m.server.prefix_host_loaded_tokens += end - have * cs
        return end - have * cs

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
        if self._load_back(params.key, result):
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
        up_to = self._insertable(req, table, up_to)
        if up_to > 0:
            # host-backed: under the `priority` eviction policy the device tier drops these
            # before rows of dense requests (prompt part at HOST_BACKED_PRIORITY + 1)
            req.priority = HOST_BACKED_PRIORITY
            super().checkpoint(req, up_to=up_to, **kwargs)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        m = self.lsa.manager
        if m is not None:
            m.end_request(req.kv.req_pool_idx, req.rid)

    def reset(self) -> None:
        super().reset()
        m = self.lsa.manager
        if m is not None:
            m.host.flush()


def create_lsa_radix_cache(ctx, session):
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    return create_unified_radix_cache(ctx, cache_class=lambda params: LSARadixCache(params, session))
