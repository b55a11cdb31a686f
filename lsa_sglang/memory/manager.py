"""LSAMemoryManager: the lifecycle of LSA requests over SGLang's KV pool and a host mirror.

Residency lives in one place, SGLang's `req_to_token` row (`cells.DeviceCells`): a mirrored
chunk whose cell was released has its row entries set to slot 0 (SGLang's reserved padding
page, never allocated), a resident chunk points at a page the request owns. Attention reads
only the pages the table lists as resident; the release path (LSARadixCache.free_kv_row)
frees only owned pages.

A request (single TP rank; the scheduler runs this in its own process) is
- built (`new_request`: its overrides checked, a prompt the host mirror can never hold refused),
- reserved (`try_reserve`: host slots promised when the prefill adder takes it),
- admitted at its first decode step (`_admit`): every complete chunk is written through to the
  host mirror, window 0 is selected, the cells of chunks outside it go back to SGLang's
  allocator, and prompt pages the prefix cache owns are handed over (`LSARadixCache.hand_over`);
- decoded in windows (`window.WindowCycle`): every `tau` steps the prefetched set swaps in and
  the next one is selected; with `reselect`, a decode step's evidence swaps chunks in between;
- ended (`end_request`): host slots and prefetched cells go back, its stats join the finished.
Where the chunk tables live: `state.py`; the device pages: `cells.py`; the window cycle:
`window.py`; the prefix cache's side: `radix.py`.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from dataclasses import asdict
from typing import Any

from lsa_sglang.config import LSAConfig
from lsa_sglang.memory.cells import DeviceCells
from lsa_sglang.memory.host_mirror import HostMirror
from lsa_sglang.memory.state import ChunkTable, RequestEntry, RequestStats, ServerStats, chunk_cap, steps_left
from lsa_sglang.memory.window import WindowCycle

logger = logging.getLogger(__name__)

FINISHED_KEPT = 32


class LSAMemoryManager:
    def __init__(self, config: LSAConfig, model_runner, capture, indexer) -> None:
        self.config = config
        self.cs = config.chunk_size
        self.cells = DeviceCells(model_runner, self.cs, config.poison_released)
        # the model's query heads: a request's `attention_heads` are checked against them
        self.num_heads = getattr(model_runner.model_config, "num_attention_heads", None)
        self.page_bytes = self.cells.page_bytes
        self.host = HostMirror(
            self.cells.num_layers, self.cs, self.cells.kv_heads, self.cells.head_dim, self.cells.dtype,
            config.host_pool_bytes, pin=self.cells.device.type == "cuda",
        )
        self.capture = capture  # models.adapter.HiddenCapture
        self.server = ServerStats()
        self.windows = WindowCycle(self.cells, self.host, capture, indexer, self.server,
                                   req_of=lambda t: self._req(t.req_pool_idx, t.rid),
                                   reserved_tokens=self.reserved_tokens)
        self.requests: dict[str, RequestEntry] = {}  # rid -> the request, built to end
        # the entries' host_reserved summed, kept up to date by `_reserve` (admission checks it
        # for every queued request it tries: no walk over the queue each time)
        self.host_reserved_total = 0
        self.tables: dict[int, ChunkTable] = {}  # req_pool_idx -> its table, admission to end
        self.finished: deque[RequestStats] = deque(maxlen=FINISHED_KEPT)
        from lsa_sglang.metrics import maybe_metrics

        self.metrics = maybe_metrics()

    def link_radix(self, radix) -> None:
        """The process's prefix cache: device pages are evicted from it when SGLang's allocator
        is short, and admission hands prompt pages over from it."""
        self.cells.radix = radix

    # -- per forward -------------------------------------------------------------------
    def prepare_decode(self, req_pool_indices: list[int], seq_lens: list[int], rids: list[str]):
        """Called once per decode forward, before any layer runs. Returns per request the
        table (None: dense) that attention reads from."""
        t0 = time.perf_counter()
        tables = []
        queries, rows = self.windows.take_step()
        for i, (idx, seq_len, rid) in enumerate(zip(req_pool_indices, seq_lens, rids)):
            table = self.tables.get(idx)
            if table is not None and table.rid != rid:  # stale (released without our hook)
                self._release(idx)
                table = None
            if table is None:
                table = self._admit(idx, rid, seq_len)
                self._publish()
            elif table.config.enabled:
                table.steps += 1
                if table.steps >= table.config.tau:
                    self.windows.boundary(table, seq_len)
                    self._publish()
                elif table.config.reselects and idx in rows and queries:
                    layers = sorted(queries)
                    self.windows.reselect(table, [queries[l][0][rows[idx]] for l in layers],
                                          [queries[l][1] for l in layers],
                                          swap=seq_len - table.prompt_tokens > table.config.reselect_after)
            if table.config.reselects:
                self.windows.watch(idx, i)
            self._account(table, seq_len)
            tables.append(table if table.config.enabled else None)
        if self.config.poison_released:  # test mode: check every invariant every step
            self.check_integrity()
        self.server.count(decode_steps=1, decode_host_seconds=time.perf_counter() - t0)
        return tables

    def _config_for(self, rid: str) -> LSAConfig:
        entry = self.requests.get(rid)
        return self.config if entry is None else entry.config

    def query_rows(self, rid: str) -> int:
        """Prompt rows whose queries window 0 reads (0: the request's policy reads none): the
        `attention` policy's `attention_rows`, the `quest` policy's last prompt token."""
        config = self._config_for(rid)
        if not config.enabled:
            return 0
        return {"attention": config.attention_rows, "quest": 1}.get(config.policy, 0)

    # -- admission -------------------------------------------------------------------------
    def host_chunks_needed(self, prompt_tokens: int) -> int:
        return prompt_tokens // self.cs + 1

    def new_request(self, req, overrides: dict[str, Any]) -> str | None:
        """The scheduler built a Req with these (validated) overrides. Returns why it must be
        refused (its prompt can never fit the host mirror, or an override names a layer or head
        this model lacks), or None."""
        config = self.config.replace(**overrides) if overrides else self.config
        error = config.model_error(self.cells.num_layers, self.num_heads)
        if error:
            return "lsa request override " + error
        prompt = len(req.origin_input_ids)
        if "page_budget" not in overrides or "budget_fraction" in overrides:  # a budget asked for is kept
            config = config.for_prompt(prompt)
        self.requests[req.rid] = RequestEntry(weakref.ref(req), config)
        need = self.host_chunks_needed(prompt)
        if config.enabled and need > self.host.capacity:
            cap = self.host.capacity
            del self.requests[req.rid]  # refused: it never runs
            return (f"lsa: prompt of {prompt} tokens needs {need} host chunks "
                    f"({need * self.page_bytes / 2**30:.2f} GiB); host_pool_gb allows {cap} "
                    f"({cap * self.page_bytes / 2**30:.2f} GiB)")
        return None

    def try_reserve(self, rid: str, prompt_tokens: int) -> bool:
        """Admission control: a request enters prefill only if its mirror fits next to the
        mirrors of running requests and of those admitted before it."""
        entry = self.requests.get(rid)
        if entry is None or not entry.config.enabled or entry.host_reserved:
            return True
        need = self.host_chunks_needed(prompt_tokens)
        if need > self.host.free_slots - self.host_reserved_total:
            return False
        self._reserve(entry, need)
        return True

    def _reserve(self, entry: RequestEntry, chunks: int) -> None:
        self.host_reserved_total += chunks - entry.host_reserved
        entry.host_reserved = chunks

    def unreserve(self, rid: str) -> None:
        """The prefill adder did not take the request after all: it stays queued, unreserved."""
        entry = self.requests.get(rid)
        if entry is not None:
            self._reserve(entry, 0)

    def note_host_wait(self, rid: str) -> None:
        """A request waits in the queue because its host mirror does not fit yet."""
        entry = self.requests.get(rid)
        if entry is not None and not entry.host_waited:
            entry.host_waited = True
            self.server.host_waits += 1

    def _admit(self, idx: int, rid: str, seq_len: int) -> ChunkTable:
        self.unreserve(rid)  # its table holds the host slots from here
        config = self._config_for(rid)
        prompt = seq_len - 1
        table = ChunkTable(rid, idx, config, prompt, stats=RequestStats(rid, prompt_tokens=prompt))
        table.stats.policy, table.stats.lsa_enabled = config.policy, config.enabled
        table.stats.budget_tokens = config.page_budget * config.chunks_per_page * self.cs if config.enabled else 0
        self.tables[idx] = table
        self.server.requests_served += 1
        req = self._req(idx, rid)
        if req is not None:
            hit = int(getattr(req, "cached_tokens", 0))
            table.stats.prefix_hit_tokens = hit
            self.server.prefix_hit_tokens += hit
            self.server.device_cells_saved += hit // self.cs
        if not config.enabled:
            return table
        self.windows.write_through(table, seq_len, req)
        selection = self.windows.select(table, seq_len)
        if selection is None:
            selection = set(table.resident)
        tree_owned = req is not None and req.lock is not None and req.kv.cache_protected_len >= self.cs
        if tree_owned and not self.cells.radix.hand_over(req, table, selection):
            self.server.alloc_denied += 1
            self._give_up(table)
            return table
        self.windows.apply(table, selection, new_pages={})
        return table

    def _give_up(self, table: ChunkTable) -> None:
        """Serve the request densely: no device room to take its pages from the tree."""
        self.host.release(table.host_slots)
        table.host_slots, table.chain, table.resident = [], [], set()
        table.keys = table.kmin = table.kmax = table.bounds = None
        table.config = table.config.replace(enabled=False)
        table.stats.lsa_enabled = False
        table.stats.host_kv_bytes = 0

    # -- what admission reserves ---------------------------------------------------------
    def decode_need_tokens(self, req) -> int | None:
        """Most device KV tokens this LSA decode row may still add to what it holds now (None:
        not an LSA row; SGLang's own estimate applies). The prefill adder reserves this for a
        running request instead of its remaining `max_new_tokens`: an LSA row holds at most
        its resident budget and an unmirrored tail shorter than a chunk plus a window, however
        long its sequence grows. A window's prefetch is not reserved: it takes only memory no
        running request has reserved (`reserved_tokens`), else the set is swapped in place."""
        table = self.table_of(req)
        if table is None or not table.config.enabled:
            return None
        cs, tau = self.cs, table.config.tau
        left = steps_left(req)
        pending = len(table.pending.new_pages) if table.pending else 0
        tail = table.seq_len - table.mirrored * cs  # unmirrored tokens now
        held = len(table.resident) + pending + -(-tail // cs)
        to_next = tau - table.steps  # steps until the pending set is swapped in
        budget = max(len(table.resident), chunk_cap(table.config))
        chunks = max(len(table.resident) + pending, budget)
        if left <= to_next or self.host.free_slots * cs < tail + left:
            tail_max = tail + left  # no boundary ahead, or the mirror may not take the tail
        else:
            tail_max = max(tail + to_next, cs - 1 + min(tau, left - to_next))
        return max(0, chunks + -(-tail_max // cs) - held) * cs

    def reserved_tokens(self) -> int:
        """Device tokens the prefill adder keeps free for the running requests: cells admission
        did not reserve (a window's prefetch, a finished row's load-back) come from the rest."""
        reserved = 0
        for rid, entry in list(self.requests.items()):
            req = entry.req()
            if req is None:  # dropped by the scheduler without an end
                self._reserve(entry, 0)
                del self.requests[rid]
                continue
            if req.finished() or req.kv.req_pool_idx is None:
                continue
            need = self.decode_need_tokens(req)
            reserved += steps_left(req) if need is None else need
        return reserved

    def take_returned_memory(self) -> bool:
        """Whether device memory went back to SGLang since the last call (then cleared)."""
        returned, self.cells.returned = self.cells.returned, False
        return returned

    # -- rows ----------------------------------------------------------------------------
    def _req(self, idx: int, rid: str):
        """The scheduler's Req behind a row (registered when it was built), or None."""
        entry = self.requests.get(rid)
        req = None if entry is None else entry.req()
        return req if req is not None and req.kv.req_pool_idx == idx else None

    def table_of(self, req) -> ChunkTable | None:
        table = self.tables.get(req.kv.req_pool_idx)
        return table if table is not None and table.rid == req.rid else None

    def released_ranges(self, idx: int) -> list[tuple[int, int]]:
        """Row position ranges of chunks that own no device page (not to be freed by SGLang)."""
        table = self.tables.get(idx)
        if table is None:
            return []
        gone = sorted(set(range(table.mirrored)) - table.resident)
        return [(c * self.cs, (c + 1) * self.cs) for c in gone]

    # -- end -----------------------------------------------------------------------------
    def end_request(self, idx: int | None, rid: str) -> None:
        """A request ended (finished, aborted, retracted, or left before its first decode
        step: aborted in the queue or in prefill): everything kept for it goes back. A retracted
        request is queued again and keeps its entry (its overrides), nothing else."""
        if idx is not None:
            self._release(idx)
        entry = self.requests.get(rid)
        if entry is None:
            return
        self._reserve(entry, 0)
        req = entry.req()
        if req is not None and not req.finished():  # retracted: queued again, with its overrides
            entry.host_waited = False
        else:
            del self.requests[rid]

    def _release(self, idx: int) -> None:
        """The row's table ends: host slots and prefetched cells go back."""
        table = self.tables.pop(idx, None)
        if table is None:
            return
        self.windows.drop_pending(table)
        self.host.release(table.host_slots)
        table.stats.finished = True
        self.finished.append(table.stats)
        self.capture.forget(idx)
        self._publish()

    # -- observability -----------------------------------------------------------------
    def _account(self, table: ChunkTable, seq_len: int) -> None:
        table.seq_len = seq_len
        st = table.stats
        st.output_tokens = seq_len - table.prompt_tokens
        total_pages = -(-seq_len // self.cs)
        st.full_kv_bytes = total_pages * self.page_bytes
        if not table.config.enabled:
            device_pages = total_pages
        else:
            pending = len(table.pending.new_pages) if table.pending else 0
            device_pages = len(table.resident) + (total_pages - table.mirrored) + pending
        # the selection metadata the table keeps on the device (`WindowCycle.write_through`)
        st.selection_metadata_bytes = sum(t.numel() * t.element_size() for t in table.metadata())
        st.device_kv_bytes = device_pages * self.page_bytes + st.selection_metadata_bytes
        st.peak_device_kv_bytes = max(st.peak_device_kv_bytes, st.device_kv_bytes)
        st.resident_ratio = st.device_kv_bytes / max(st.full_kv_bytes, 1)
        self.server.peak_device_kv_bytes = max(
            self.server.peak_device_kv_bytes,
            sum(t.stats.device_kv_bytes for t in self.tables.values()),
        )

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.update(self.stats()["server"])

    def stats(self) -> dict[str, Any]:
        running = [_row(t.stats) for t in self.tables.values()]
        server = asdict(self.server)
        server.update(
            device_kv_bytes=sum(r["device_kv_bytes"] for r in running),
            selection_metadata_bytes=sum(r["selection_metadata_bytes"] for r in running),
            full_kv_bytes=sum(r["full_kv_bytes"] for r in running),
            host_kv_bytes=self.host.used_slots * self.page_bytes,
            host_cached_bytes=self.host.cached_slots * self.page_bytes,
            host_capacity_bytes=self.host.capacity * self.page_bytes,
            chunk_bytes=self.page_bytes,
            running_requests=len(running),
            host_reserved_bytes=self.host_reserved_total * self.page_bytes,
            device_free_tokens=int(self.cells.allocator.available_size()),
        )
        server["resident_ratio"] = server["device_kv_bytes"] / max(server["full_kv_bytes"], 1)
        return {"server": server, "requests": running + [_row(s) for s in self.finished]}

    def check_integrity(self) -> None:
        self.host.check_integrity()
        assert self.host_reserved_total == sum(e.host_reserved for e in self.requests.values())
        refs: dict[int, int] = {}
        for t in self.tables.values():
            for slot in t.host_slots:
                refs[slot] = refs.get(slot, 0) + 1
        assert len(refs) == self.host.used_slots, (len(refs), self.host.used_slots)
        assert all(self.host.refs(s) == n for s, n in refs.items())
        for idx, t in self.tables.items():
            t.check_integrity(self.cells.req_to_token[idx], self.cs)


def _row(stats: RequestStats) -> dict[str, Any]:
    """A request's stats, its rid first (the counters it shares with the server come next)."""
    return {"rid": stats.rid, **asdict(stats)}
