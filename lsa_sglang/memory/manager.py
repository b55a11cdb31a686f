"""LSAMemoryManager: per-request chunk tables over SGLang's own KV pool and a host mirror.

Residency lives in one place, SGLang's `req_to_token` row: a mirrored chunk whose cell was
released has its row entries set to slot 0 (SGLang's reserved padding page, never allocated),
a resident chunk points at a page the request owns. Attention reads only the pages the table
lists as resident; the release path (LSARadixCache.free_kv_row) frees only owned pages.

Per request (single TP rank; the scheduler runs this in its own process):
- admission (first decode step after prefill): every complete chunk is written through to the
  host mirror (or, when a chunk with the same prefix is already there, shared by reference),
  its frozen key is computed, the indexer scores the chunks from the prefill's last hidden
  states, and the cells of chunks outside the resident set go back to SGLang's allocator.
  Prompt pages the prefix cache owns are not the request's to free: the resident ones are
  copied into cells of its own and the request lets go of the tree, whose copy stays cached
  (evictable) for later requests with the same prefix.
- every `tau` decode steps (window boundary): the previously prefetched set is swapped in
  (a copy still running is waited for and counted as a stall), evicted cells are released,
  newly completed chunks are mirrored, and the next set is selected from the current hidden
  states; its misses get cells from SGLang's allocator and are copied by the Prefetcher
  while the next window decodes.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lsa_sglang.config import LSAConfig
from lsa_sglang.indexer import (
    SelectionParams,
    attention_scores,
    candidate_chunks,
    device_budget_chunks,
    needs_fallback,
    select_chunks,
)
from lsa_sglang.indexer.attention_signal import (
    copied_chunk_end, edge_swap, evidence_swap, quest_shares, raise_held, step_peak,
)
from lsa_sglang.indexer.selector import SCORED, member_mask
from lsa_sglang.kernels import copy_chunks_to_device, copy_chunks_to_host
from lsa_sglang.memory.host_mirror import HostMirror, HostMirrorFull
from lsa_sglang.memory.prefetcher import Prefetcher

logger = logging.getLogger(__name__)

SENTINEL_SLOT = 0  # slot of SGLang's reserved padding page: marks a released chunk in req_to_token
FINISHED_KEPT = 32
EDGE_COPY_TOKENS = 3  # the straddle rule fires when the answer's last this many tokens end a resident chunk


@dataclass
class RequestStats:
    rid: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    device_kv_bytes: int = 0
    peak_device_kv_bytes: int = 0
    full_kv_bytes: int = 0
    host_kv_bytes: int = 0
    selection_metadata_bytes: int = 0  # part of device_kv_bytes
    resident_ratio: float = 1.0
    windows: int = 0
    chunks_copied: int = 0
    bytes_copied: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    indexer_seconds: float = 0.0
    fallbacks: int = 0
    reselections: int = 0  # chunks swapped in on a decode step's evidence (`reselect`)
    edge_reselections: int = 0  # of which by the straddle rule (`reselect_edge`)
    prefix_hit_tokens: int = 0
    host_chunks_shared: int = 0
    policy: str = "indexer"
    lsa_enabled: bool = True
    finished: bool = False


@dataclass
class Pending:
    """The next window's resident set, its cells being filled by the prefetcher."""

    resident: set[int]
    new_pages: dict[int, int]  # chunk id -> device page being filled
    future: Future | None


@dataclass
class ChunkTable:
    """One request's chunks: host slot of each mirrored chunk, which ones have device cells."""

    rid: str
    req_pool_idx: int
    config: LSAConfig
    prompt_tokens: int
    host_slots: list[int] = field(default_factory=list)  # index = chunk id
    chain: list[bytes] = field(default_factory=list)  # prefix hash of each mirrored chunk
    resident: set[int] = field(default_factory=set)  # mirrored chunks with a device cell
    # per mirrored chunk, grown as chunks are mirrored (None before the first):
    keys: torch.Tensor | None = None  # [mirrored, L, Hk, Dh] mean key at the target layers
    kmin: torch.Tensor | None = None  # [mirrored, L, Hk, Dh] key min at the target layers
    kmax: torch.Tensor | None = None
    bounds: torch.Tensor | None = None  # [mirrored, 2, all layers, Hk, Dh]: every layer's key min, max
    held: torch.Tensor | None = None  # `reselect`: largest share each chunk drew (window 0, then each step)
    edge_chunks: list[int] = field(default_factory=list)  # `edge_pages`: what the straddle rule brought in, oldest first
    steps: int = 0  # decode steps since the last window boundary
    seq_len: int = 0  # tokens in the row at the last decode step
    pending: Pending | None = None
    stats: RequestStats | None = None
    window0_scores: torch.Tensor | None = None  # `attention` policy: admission's scores, for carry

    @property
    def mirrored(self) -> int:
        return len(self.host_slots)

    def check_integrity(self, req_to_token_row: torch.Tensor, chunk_size: int) -> None:
        assert len(set(self.host_slots)) == len(self.host_slots)
        assert self.resident <= set(range(self.mirrored))
        starts = req_to_token_row[: self.mirrored * chunk_size : chunk_size].tolist()
        for c, slot in enumerate(starts):
            if c in self.resident:
                assert slot != SENTINEL_SLOT and slot % chunk_size == 0, (c, slot)
            else:
                assert slot == SENTINEL_SLOT, (c, slot)


class LSAMemoryManager:
    def __init__(self, config: LSAConfig, model_runner, capture, indexer) -> None:
        self.config = config
        self.cs = config.chunk_size
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        pool = model_runner.token_to_kv_pool
        self.k_buffers = [pool.get_key_buffer(i) for i in range(pool.layer_num)]
        self.v_buffers = [pool.get_value_buffer(i) for i in range(pool.layer_num)]
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.device = self.k_buffers[0].device
        num_layers, (_, hk, dh) = len(self.k_buffers), self.k_buffers[0].shape
        self.page_bytes = 2 * num_layers * self.cs * hk * dh * self.k_buffers[0].dtype.itemsize
        self.host = HostMirror(
            num_layers, self.cs, hk, dh, self.k_buffers[0].dtype, config.host_pool_bytes,
            pin=self.device.type == "cuda",
        )
        self.capture = capture  # models.adapter.HiddenCapture
        self.indexer = indexer
        self.target_layers = list(capture.layers)
        # selection metadata on the device: mean, min and max key of each mirrored chunk at the
        # target layers (float32), counted in a request's device bytes
        self.meta_bytes = 3 * len(self.target_layers) * hk * dh * 4
        # with `reselect` also every layer's key min and max (bfloat16): the Quest bound of chunks
        # the device does not hold
        self.bound_bytes = 2 * num_layers * hk * dh * 2
        self._step_queries: dict[int, tuple[torch.Tensor, float]] = {}  # layer -> ([B, H, D], scale)
        self._step_rows: dict[int, int] = {}  # req_pool_idx -> its row of the last decode batch
        self.prefetcher = Prefetcher()
        self.radix = None  # the process's LSARadixCache, linked by the session
        self.tables: dict[int, ChunkTable] = {}
        self.finished: deque[RequestStats] = deque(maxlen=FINISHED_KEPT)
        self.server = {
            "requests_served": 0, "windows": 0, "chunks_copied": 0, "bytes_copied": 0,
            "stalls": 0, "stall_seconds": 0.0, "indexer_seconds": 0.0, "fallbacks": 0,
            "alloc_denied": 0, "host_full": 0, "peak_device_kv_bytes": 0,
            "prefix_hit_tokens": 0, "host_chunks_shared": 0, "device_cells_saved": 0,
            "prefix_host_loaded_tokens": 0, "retracted_requests": 0, "host_waits": 0,
            "sync_swaps": 0, "reselections": 0, "edge_reselections": 0,
        }
        # Set whenever device memory goes back to SGLang (cells freed, tree pages unlocked);
        # the scheduler hook reopens admission on it (`take_returned_memory`).
        self.returned_memory = False
        self._host_waited: set[str] = set()
        self.overrides: dict[str, dict[str, Any]] = {}  # rid -> per-request LSA overrides
        self.reqs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # rid -> Req
        # Host slots promised to requests admitted to prefill but not yet mirrored.
        self.host_reserved: dict[str, int] = {}
        from lsa_sglang.metrics import maybe_metrics

        self.metrics = maybe_metrics()

    # -- per forward -------------------------------------------------------------------
    def prepare_decode(self, req_pool_indices: list[int], seq_lens: list[int], rids: list[str]):
        """Called once per decode forward, before any layer runs. Returns per request the
        table (None: dense) that attention reads from."""
        tables = []
        queries, rows = self._step_queries, self._step_rows
        self._step_queries, self._step_rows = {}, {}
        for i, (idx, seq_len, rid) in enumerate(zip(req_pool_indices, seq_lens, rids)):
            table = self.tables.get(idx)
            if table is not None and table.rid != rid:  # stale (released without our hook)
                self.release(idx)
                table = None
            if table is None:
                table = self._admit(idx, rid, seq_len)
                self._publish()
            elif table.config.enabled:
                table.steps += 1
                if table.steps >= table.config.tau:
                    self._boundary(table, seq_len)
                elif table.config.reselects and idx in rows and queries:
                    layers = sorted(queries)
                    self._reselect(table, layers, [queries[l][0][rows[idx]] for l in layers],
                                   [queries[l][1] for l in layers],
                                   swap=seq_len - table.prompt_tokens > table.config.reselect_after)
            if table.config.reselects:
                self._step_rows[idx] = i
            self._account(table, seq_len)
            tables.append(table if table.config.enabled else None)
        if self.config.poison_released:  # test mode: check every invariant every step
            self.check_integrity()
        return tables

    @property
    def wants_step_queries(self) -> bool:
        """A request of this decode batch re-selects on evidence: attention hands its queries."""
        return bool(self._step_rows)

    def note_step_queries(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """One layer's decode queries ``[B, H, D]`` of this step, read at the next step."""
        self._step_queries[layer] = (q.detach().clone(), scale)

    def _config_for(self, rid: str) -> LSAConfig:
        over = self.overrides.get(rid)
        return self.config.replace(**over) if over else self.config

    def query_rows(self, rid: str) -> int:
        """Prompt rows whose queries window 0 reads (0: the request's policy reads none)."""
        config = self._config_for(rid)
        return config.attention_rows if config.enabled and config.policy == "attention" else 0

    # -- admission -------------------------------------------------------------------------
    def host_chunks_needed(self, prompt_tokens: int) -> int:
        return prompt_tokens // self.cs + 1

    def try_reserve(self, rid: str, prompt_tokens: int) -> bool:
        """Admission control: a request enters prefill only if its mirror fits next to the
        mirrors of running requests and of those admitted before it."""
        if not self._config_for(rid).enabled or rid in self.host_reserved:
            return True
        need = self.host_chunks_needed(prompt_tokens)
        if need > self.host.free_slots - sum(self.host_reserved.values()):
            return False
        self.host_reserved[rid] = need
        return True

    def _admit(self, idx: int, rid: str, seq_len: int) -> ChunkTable:
        self.host_reserved.pop(rid, None)
        config = self._config_for(rid)
        prompt = seq_len - 1
        table = ChunkTable(rid, idx, config, prompt, stats=RequestStats(rid, prompt_tokens=prompt))
        table.stats.policy, table.stats.lsa_enabled = config.policy, config.enabled
        self.tables[idx] = table
        self.server["requests_served"] += 1
        req = self._req(idx, rid)
        if req is not None:
            hit = int(getattr(req, "cached_tokens", 0))
            table.stats.prefix_hit_tokens = hit
            self.server["prefix_hit_tokens"] += hit
            self.server["device_cells_saved"] += hit // self.cs
        if not config.enabled:
            return table
        self._mirror_new_chunks(table, seq_len, req)
        selection = self._select(table, seq_len)
        if selection is None:
            selection = set(table.resident)
        if not self._detach(table, req, selection):
            self.server["alloc_denied"] += 1
            self._give_up(table)
            return table
        self._apply(table, selection, new_pages={})
        return table

    def _detach(self, table: ChunkTable, req, resident: set[int]) -> bool:
        """Let go of the prefix cache's pages: the resident ones (and any not mirrored)
        are copied into cells the request owns, the others become released chunks."""
        if req is None or req.lock is None or req.kv.cache_protected_len < self.cs:
            return True
        tree_chunks = req.kv.cache_protected_len // self.cs
        keep = [c for c in range(tree_chunks) if c in resident or c >= table.mirrored]
        pages = self._alloc_pages(len(keep))
        if pages is None:
            return False
        row = self.req_to_token[table.req_pool_idx]
        src = self._page_slots([int(row[c * self.cs]) // self.cs for c in keep])
        dst = self._page_slots(pages)
        for k, v in zip(self.k_buffers, self.v_buffers):
            k[dst] = k[src]
            v[dst] = v[src]
        drop = [c for c in range(tree_chunks) if c not in set(keep)]
        self._set_rows(table.req_pool_idx, keep, pages)
        self._set_rows(table.req_pool_idx, drop, None)
        table.resident -= set(drop)
        self.radix.detach(req)
        self.returned_memory = True  # the prompt's tree pages are evictable now
        return True

    def _give_up(self, table: ChunkTable) -> None:
        """Serve the request densely: no device room to take its pages from the tree."""
        self.host.release(table.host_slots)
        table.host_slots, table.chain, table.resident = [], [], set()
        table.keys = table.kmin = table.kmax = table.bounds = None
        table.config = table.config.replace(enabled=False)
        table.stats.lsa_enabled = False
        table.stats.host_kv_bytes = 0

    def _alloc_pages(self, n: int) -> list[int] | None:
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

    def _alloc_spare_pages(self, n: int) -> list[int] | None:
        """n free pages, without evicting, only if every running request's reservation (what
        the prefill adder kept free for it) still fits after them: for cells admission did not
        reserve (a window's prefetch, a finished row's load-back), never at a running one's cost."""
        if n == 0:
            return []
        reserved = 0
        for req in list(self.reqs.values()):
            if req.finished() or req.kv.req_pool_idx is None:
                continue
            need = self.decode_need_tokens(req)
            reserved += _steps_left(req) if need is None else need
        if self.allocator.available_size() - n * self.cs < reserved:
            return None
        got = self.allocator.alloc(n * self.cs)
        return None if got is None else got[:: self.cs].div(self.cs, rounding_mode="floor").tolist()

    def _boundary(self, table: ChunkTable, seq_len: int) -> None:
        table.steps = 0
        self._count(table, windows=1)
        if table.pending is not None:
            pending, table.pending = table.pending, None
            if pending.future is not None:
                waited = self.prefetcher.wait(pending.future)
                if waited > 0:
                    self._count(table, stalls=1, stall_seconds=waited)
            self._apply(table, pending.resident, pending.new_pages)
        req = self._req(table.req_pool_idx, table.rid)
        self._mirror_new_chunks(table, seq_len, req)
        # The set selected now is swapped in at the next boundary: a request that ends before
        # it would only hold cells it never reads (and that admission had to reserve).
        if req is None or _steps_left(req) >= table.config.tau:
            selection = self._select(table, seq_len, held=table.resident)
            if selection is not None:
                self._start_prefetch(table, selection)
        self._publish()
        logger.debug(
            "lsa window rid=%s seq=%d mirrored=%d resident=%d next=%s stalls=%d",
            table.rid, seq_len, table.mirrored, len(table.resident),
            None if table.pending is None else len(table.pending.resident), table.stats.stalls,
        )

    # -- selection ---------------------------------------------------------------------
    def _select(self, table: ChunkTable, seq_len: int, held: set[int] | None = None) -> set[int] | None:
        """The resident set for the next window. `held`: the chunks resident now (a later
        boundary), so the config's `swap_limit` bounds the pages the set brings in."""
        n = table.mirrored
        config = table.config
        params = SelectionParams.from_config(config)
        scores = tail_mass = None
        t = time.perf_counter()
        queries = self.capture.take_queries(table.req_pool_idx)  # only the admission uses them
        if config.policy == "attention" and n > 0 and queries is not None:
            scores = self._attention_scores(table, seq_len, queries, candidate_chunks(n, params))
            table.window0_scores = scores
        elif config.policy == "attention" and config.attention_later == "carry" and table.window0_scores is not None:
            # later windows rank by what the prompt's last rows attended (chunks written since score 0)
            scores = torch.zeros(n, dtype=table.window0_scores.dtype)
            kept = min(n, table.window0_scores.numel())
            scores[:kept] = table.window0_scores[:kept]
        elif config.policy in SCORED and n > 0:
            hidden = self.capture.last_hidden(table.req_pool_idx)
            if hidden is not None:  # `attention` after window 0: the indexer's scores, budget filled
                policy = "indexer" if config.policy == "attention" else config.policy
                scores, tail_mass = self._score(table, hidden, seq_len - 1, policy)
        dt = time.perf_counter() - t
        table.stats.indexer_seconds += dt
        self.server["indexer_seconds"] += dt
        if scores is None and config.policy in SCORED:
            # no hidden state captured (cannot happen after a real forward): keep everything
            return set(range(n))
        # The needle fallback widens the very selection the indexer is unsure about: the one
        # made at admission serves the whole answer when it is shorter than a window.
        cand = candidate_chunks(n, params)
        widen = (
            config.policy == "indexer" and config.needle_fallback and len(cand) > 0
            and needs_fallback(scores[cand[0] : cand[-1] + 1], config.threshold, tail_mass)
        )
        sel = select_chunks(
            n, params, scores=scores, rng=config.seed + n, widen=widen,
            held=held, swap_limit=config.swap_limit,
        )
        if sel.fallback:
            table.stats.fallbacks += 1
            self.server["fallbacks"] += 1
        return set(sel.resident.tolist())

    def _reselect(self, table: ChunkTable, layers: list[int], queries: list[torch.Tensor], scales: list[float],
                  swap: bool) -> None:
        """Re-selection on evidence after a decode step: the step's queries at every layer bound
        what it read of each candidate chunk (`quest_shares`, from the key bounds) and raise each
        chunk's largest share so far (`held`, first shrunk by `held_decay`); when `swap` (the answer
        is past `reselect_after` tokens) and the best chunk not on the device drew more than the
        weakest resident one holds, that one is released and the other copied in
        now (a counted stall): one chunk per step, the set's size unchanged. With `reselect_edge`
        the straddle rule (`_edge`) goes first, from the answer's first step (with `edge_pages`
        it may grow the set by that many pages)."""
        n = table.mirrored
        cand = candidate_chunks(n, SelectionParams.from_config(table.config))
        if len(cand) == 0:
            return
        lo, hi = int(cand[0]), int(cand[-1]) + 1
        t = time.perf_counter()
        if table.held is None or table.held.numel() < n:
            held = torch.zeros(n)
            prior = table.held if table.held is not None else table.window0_scores
            if prior is not None:
                held[: min(n, prior.numel())] = prior[:n].float()
            table.held = held
        with torch.no_grad():
            share = quest_shares(queries, table.bounds[lo:hi, 0], table.bounds[lo:hi, 1], scales)
        held = table.held[lo:hi]
        raise_held(held, share, table.config.held_decay)
        resident = member_mask(table.resident, lo, hi)
        edge = self._edge(table, layers, queries, scales, lo, hi, held, resident) if table.config.reselect_edge else None
        pair = edge
        if pair is None and swap:
            pair = evidence_swap(share, held, resident)
        dt = time.perf_counter() - t
        table.stats.indexer_seconds += dt
        self.server["indexer_seconds"] += dt
        if pair is None:
            return
        incoming, outgoing = lo + pair[0], None if pair[1] is None else lo + pair[1]
        t = time.perf_counter()
        if outgoing is not None:
            self._apply(table, table.resident - {outgoing}, {})
        pages = self._alloc_pages(1)
        if pages is None:  # only when a running request outgrew its reservation
            self.server["alloc_denied"] += 1
            return
        self._load_now([table.host_slots[incoming]], pages)
        self._set_rows(table.req_pool_idx, [incoming], pages)
        table.resident.add(incoming)
        if edge is not None and table.config.extra_edge_chunks:
            table.edge_chunks = [c for c in table.edge_chunks if c != outgoing] + [incoming]
        self._count(table, reselections=1, edge_reselections=int(edge is not None), stalls=1,
                    stall_seconds=time.perf_counter() - t, chunks_copied=1, bytes_copied=self.page_bytes)

    def _edge(self, table: ChunkTable, layers: list[int], queries: list[torch.Tensor], scales: list[float],
              lo: int, hi: int, held: torch.Tensor, resident: torch.Tensor) -> tuple[int, int | None] | None:
        """The straddle rule (`edge_swap`) on a resident candidate chunk whose end the answer has
        just copied: its last `EDGE_COPY_TOKENS` tokens are the answer's last ones
        (`copied_chunk_end`), else the one holding the token the last step read most among the
        resident candidate chunks' tokens (`step_peak`, exact, over every token that step read:
        the cells are all on the device). With `edge_pages` the chunk it brings in takes a page
        beyond the budget while one is free, else the page of the oldest chunk it brought in
        that is still resident."""
        cs = self.cs
        extra = table.config.extra_edge_chunks
        spare, slot = False, None
        if extra:
            spare = len(table.resident) < _chunk_cap(table.config)
            table.edge_chunks = [c for c in table.edge_chunks if c in table.resident]
            slot = next((c - lo for c in table.edge_chunks if lo <= c < hi), None)
        req = self._req(table.req_pool_idx, table.rid)
        if req is not None and len(req.output_ids) >= EDGE_COPY_TOKENS:
            ends = [c for c in table.resident if lo <= c < hi - 1 and c + 1 not in table.resident]
            copied = copied_chunk_end(list(req.origin_input_ids) + list(req.output_ids), EDGE_COPY_TOKENS, ends, cs)
            if copied is not None:
                return edge_swap(copied - lo, True, held, resident, spare=spare, slot=slot)
        pos = self.read_positions(table, table.seq_len)
        chunk = pos // cs
        watched = (chunk >= lo) & (chunk < hi)
        if not bool(watched.any()):
            return None
        slots = self.req_to_token[table.req_pool_idx, pos].to(torch.int64)
        with torch.no_grad():
            peak = int(pos[step_peak(queries, (self.k_buffers[l].index_select(0, slots) for l in layers),
                                     scales, watched)])
        return edge_swap(peak // cs - lo, peak % cs == cs - 1, held, resident, spare=spare, slot=slot)

    def _attention_scores(self, table: ChunkTable, seq_len: int, queries, cand: torch.Tensor) -> torch.Tensor:
        """Window 0: the last `attention_rows` prompt tokens' attention at every layer
        (`indexer.attention_signal`), over the prompt's keys, all still on the device at admission."""
        slots = self.req_to_token[table.req_pool_idx, : seq_len - 1].to(torch.int64)
        layers = sorted(queries)
        lo, hi = (int(cand[0]), int(cand[-1]) + 1) if len(cand) else (0, 0)
        rows = table.config.attention_rows
        with torch.no_grad():
            return attention_scores(
                [queries[l][0][-rows:] for l in layers], (self.k_buffers[l].index_select(0, slots) for l in layers),
                [queries[l][1] for l in layers], table.mirrored, self.cs, (lo, hi),
                per_head=table.config.attention_per_head, spill=table.config.attention_spill,
            )

    def _score(self, table: ChunkTable, hidden: torch.Tensor, position: int, policy: str):
        pos = torch.tensor([position], device=hidden.device)
        with torch.no_grad():
            q, w = self.indexer(hidden[None].to(self.indexer_dtype), pos)
            logits = self.indexer.layer_logits(q, w, table.keys.to(q.dtype))[0]  # [L, N]
            if policy == "quest":
                from lsa_sglang.indexer import quest_scores

                per_layer = torch.stack([
                    quest_scores(q[0, l], table.kmin[:, l], table.kmax[:, l]) for l in range(q.shape[1])
                ])
                scores = per_layer.max(dim=0).values
            else:
                probs = torch.sigmoid(logits.double())  # float32 rounds confident chunks to ties
                scores = probs.max(0).values if table.config.ensemble == "max" else probs.mean(0)
            # Proxy for the attention mass on the recency tail: softmax of the layer-mean
            # logits over chunks, mass of the last `recent_chunks`.
            mass = torch.softmax(logits.mean(0), 0)
            rc = table.config.recent_chunks
            tail_mass = float(mass[-rc:].sum()) if rc > 0 else 0.0
        return scores.cpu(), min(max(tail_mass, 0.0), 1.0)

    @property
    def indexer_dtype(self) -> torch.dtype:
        return next(self.indexer.parameters()).dtype

    # -- residency changes -------------------------------------------------------------
    def _mirror_new_chunks(self, table: ChunkTable, seq_len: int, req=None) -> None:
        """Write through every chunk completed since the last call (written KV = seq_len - 1);
        a chunk whose prefix hash is already in the host mirror is shared, not copied."""
        complete = (seq_len - 1) // self.cs
        new = list(range(table.mirrored, complete))
        if not new:
            return
        chain = self._extend_chain(table, req, complete)
        slots = [None if chain is None else self.host.lookup(chain[c]) for c in new]
        misses = [i for i, s in enumerate(slots) if s is None]
        try:
            fresh = self.host.alloc(len(misses))
        except HostMirrorFull:
            # Admission refuses prompts that can never fit; under concurrent load the newest
            # chunks simply stay on the device (they are read as part of the tail).
            self.host.release([s for s in slots if s is not None])
            self.server["host_full"] += 1
            return
        keys = [None if s is None else self.host.meta[s] for s in slots]
        if misses:
            row = self.req_to_token[table.req_pool_idx]
            pages = [int(row[new[i] * self.cs]) // self.cs for i in misses]
            copy_chunks_to_host(self.k_buffers, self.v_buffers, pages, self.host.buffer, fresh)
            computed = self._chunk_keys(torch.tensor(pages, device=self.device))
            for n, (i, slot) in enumerate(zip(misses, fresh)):
                slots[i], keys[i] = slot, tuple(k[n] for k in computed)
                if chain is not None:
                    self.host.publish(slot, chain[new[i]], keys[i])
        shared = len(new) - len(misses)
        table.stats.host_chunks_shared += shared
        self.server["host_chunks_shared"] += shared
        old = (table.keys, table.kmin, table.kmax, table.bounds)
        grown = [torch.stack(parts) for parts in zip(*keys)]  # the new chunks' mean, kmin, kmax, bounds
        table.keys, table.kmin, table.kmax, table.bounds = (
            g if o is None else torch.cat([o, g]) for o, g in zip(old, grown)
        )
        table.host_slots.extend(slots)
        if chain is not None:
            table.chain = chain[:complete]
        table.resident.update(new)
        table.stats.host_kv_bytes = table.mirrored * self.page_bytes

    def _extend_chain(self, table: ChunkTable, req, complete: int) -> list[bytes] | None:
        """Prefix hashes of chunks [0, complete): each covers every token up to its end."""
        if req is None or len(table.chain) != table.mirrored:
            return None
        tokens = list(req.origin_input_ids) + list(req.output_ids)
        if len(tokens) < complete * self.cs:
            return None
        return prefix_hashes(tokens, self.cs, complete, req.extra_key, req.cache_salt, table.chain)

    def _chunk_keys(self, pages: torch.Tensor):
        """Frozen keys of whole chunks: mean, min, max post-RoPE key at the target layers
        (``[N, L, Hk, Dh]`` float32) and every layer's key min and max ``[N, 2, all layers, Hk,
        Dh]`` (bfloat16, for `reselect`); one layer's keys gathered at a time."""
        target, bounds = {}, []
        for layer, kb in enumerate(self.k_buffers):
            k = kb.view(-1, self.cs, *kb.shape[1:]).index_select(0, pages)  # [N, cs, Hk, Dh]
            lo, hi = k.amin(1), k.amax(1)
            bounds.append(torch.stack([lo, hi], dim=1).to(torch.bfloat16))
            if layer in self.target_layers:
                target[layer] = (k.float().mean(1), lo.float(), hi.float())
        mean, kmin, kmax = (torch.stack([target[l][i] for l in self.target_layers], dim=1) for i in range(3))
        return mean, kmin, kmax, torch.stack(bounds, dim=2)

    def _page_slots(self, pages: list[int]) -> torch.Tensor:
        p = torch.tensor(pages, dtype=torch.int64, device=self.device)
        return (p[:, None] * self.cs + torch.arange(self.cs, device=self.device)).reshape(-1)

    def _set_rows(self, idx: int, chunks: list[int], pages: list[int] | None) -> None:
        row = self.req_to_token[idx]
        for i, c in enumerate(chunks):
            if pages is None:
                row[c * self.cs : (c + 1) * self.cs] = SENTINEL_SLOT
            else:
                row[c * self.cs : (c + 1) * self.cs] = torch.arange(
                    pages[i] * self.cs, (pages[i] + 1) * self.cs, dtype=row.dtype, device=row.device
                )

    def _free_pages(self, pages: list[int]) -> None:
        if not pages:
            return
        slots = self._page_slots(pages)
        if self.config.poison_released:
            for k, v in zip(self.k_buffers, self.v_buffers):
                k.index_fill_(0, slots, float("nan"))
                v.index_fill_(0, slots, float("nan"))
        self.allocator.free(slots)
        self.returned_memory = True

    def _apply(self, table: ChunkTable, resident: set[int], new_pages: dict[int, int]) -> None:
        """Swap `resident` in: prefetched cells become visible, evicted ones are released (and a
        prefetched copy of a chunk that became resident meanwhile, by re-selection)."""
        idx = table.req_pool_idx
        evict = sorted(table.resident - resident)
        row = self.req_to_token[idx]
        evicted_pages = [int(row[c * self.cs]) // self.cs for c in evict]
        self._set_rows(idx, evict, None)
        self._free_pages(evicted_pages + [p for c, p in new_pages.items() if c in table.resident])
        arrive = sorted(c for c in new_pages if c not in table.resident)
        self._set_rows(idx, arrive, [new_pages[c] for c in arrive])
        table.resident = (table.resident - set(evict)) | set(arrive)

    def _start_prefetch(self, table: ChunkTable, resident: set[int]) -> None:
        misses = sorted(resident - table.resident)
        new_pages: dict[int, int] = {}
        if misses:
            pages = self._alloc_spare_pages(len(misses))
            if pages is None:
                self._swap_now(table, resident)
                return
            new_pages = dict(zip(misses, pages))
        future = None
        if misses:
            slots = [table.host_slots[c] for c in misses]
            pages = [new_pages[c] for c in misses]
            host, kb, vb = self.host.buffer, self.k_buffers, self.v_buffers
            after = None
            if self.device.type == "cuda":  # the worker thread's current stream is not ours
                after = torch.cuda.Event()
                after.record(torch.cuda.current_stream(self.device))
            future = self.prefetcher.submit(lambda: copy_chunks_to_device(host, slots, kb, vb, pages, after=after))
            self._count(table, chunks_copied=len(misses), bytes_copied=len(misses) * self.page_bytes)
        table.pending = Pending(resident, new_pages, future)

    def _swap_now(self, table: ChunkTable, resident: set[int]) -> None:
        """Switch to `resident` at once: no memory beyond what admission reserved is spare for
        a double-buffered prefetch, so the chunks the new set drops are released first and
        its misses are copied synchronously into their cells (a counted stall). The request
        never holds more than its budget, which is what admission reserved for it."""
        t = time.perf_counter()
        self._apply(table, resident & table.resident, {})
        misses = sorted(resident - table.resident)
        pages = self._alloc_pages(len(misses))
        if pages is None:  # only when a running request outgrew its reservation
            self.server["alloc_denied"] += 1
            return
        self._load_now([table.host_slots[c] for c in misses], pages)
        self._set_rows(table.req_pool_idx, misses, pages)
        table.resident |= set(misses)
        self._count(table, stalls=1, stall_seconds=time.perf_counter() - t, sync_swaps=1,
                    chunks_copied=len(misses), bytes_copied=len(misses) * self.page_bytes)

    def _count(self, table: ChunkTable, **deltas) -> None:
        """Add to the server's counters and to the request's where it has the same field."""
        for key, v in deltas.items():
            self.server[key] += v
            if hasattr(table.stats, key):
                setattr(table.stats, key, getattr(table.stats, key) + v)

    # -- what attention reads ----------------------------------------------------------
    def read_positions(self, table: ChunkTable, seq_len: int) -> torch.Tensor:
        """Token positions attention reads: resident mirrored chunks + everything after them."""
        cs = self.cs
        res = sorted(table.resident)
        parts = [torch.arange(c * cs, (c + 1) * cs) for c in res]
        parts.append(torch.arange(table.mirrored * cs, seq_len))
        return torch.cat(parts).to(self.device)

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
        meta = self.meta_bytes + (self.bound_bytes if table.config.reselects else 0)
        st.selection_metadata_bytes = table.mirrored * meta if table.config.enabled else 0
        st.device_kv_bytes = device_pages * self.page_bytes + st.selection_metadata_bytes
        st.peak_device_kv_bytes = max(st.peak_device_kv_bytes, st.device_kv_bytes)
        st.resident_ratio = st.device_kv_bytes / max(st.full_kv_bytes, 1)
        self.server["peak_device_kv_bytes"] = max(
            self.server["peak_device_kv_bytes"],
            sum(t.stats.device_kv_bytes for t in self.tables.values()),
        )

    # -- prefix cache ------------------------------------------------------------------
    def _req(self, idx: int, rid: str):
        """The scheduler's Req behind a row (registered when it was built), or None."""
        req = self.reqs.get(rid)
        return req if req is not None and req.kv.req_pool_idx == idx else None

    def table_of(self, req) -> ChunkTable | None:
        table = self.tables.get(req.kv.req_pool_idx)
        return table if table is not None and table.rid == req.rid else None

    def prepare_insert(self, req, up_to: int, radix) -> int:
        """Make the row of a finished LSA request insertable into the prefix cache.

        Chunks the tree already holds point at the tree's pages (the request's own copies
        are duplicates and go back); released chunks after them are loaded back from the
        host mirror into fresh cells. Returns how many tokens can be inserted: the insert
        stops at the first chunk that found no device room."""
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        table, cs, idx = self.table_of(req), self.cs, req.kv.req_pool_idx
        n = up_to // cs
        key = RadixKey(
            req.full_untruncated_fill_ids[: n * cs], req.extra_key,
            is_bigram=radix.tree_core.is_eagle, cache_salt=req.cache_salt,
        )
        match = radix.match_prefix(MatchPrefixParams(key=key))
        tree = radix.path_device_indices(match.last_device_node)[: match.device_prefix_len]
        shared = min(len(tree) // cs, n)
        row = self.req_to_token[idx]
        owned = [c for c in range(shared) if c in table.resident or c >= table.mirrored]
        self._free_pages([int(row[c * cs]) // cs for c in owned])
        row[: shared * cs] = tree[: shared * cs].to(row.dtype)
        table.resident -= set(range(shared))
        self.server["device_cells_saved"] += len(owned)
        req.kv.cache_protected_len = shared * cs
        gone = [c for c in range(shared, min(n, table.mirrored)) if c not in table.resident]
        pages = self._alloc_spare_pages(len(gone))
        if pages is None:
            return (gone[0] if gone else n) * cs
        if gone:
            self._load_now([table.host_slots[c] for c in gone], pages)
            self._set_rows(idx, gone, pages)
            table.resident |= set(gone)
        return n * cs

    def _load_now(self, slots: list[int], pages: list[int]) -> None:
        """Copy host chunks into device pages and wait for the copy."""
        done = copy_chunks_to_device(self.host.buffer, slots, self.k_buffers, self.v_buffers, pages)
        if done is not None:
            done.synchronize()

    def load_back(self, key, match, radix) -> int:
        """Chunks of `key` past the tree's device match that the host mirror still holds
        are copied into fresh cells and inserted into the tree, so prefill skips them.
        Returns the number of tokens loaded."""
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams

        cs = self.cs
        n = len(key) // cs
        have = match.device_prefix_len // cs
        if key.is_bigram or n <= have:
            return 0
        chain = prefix_hashes(key.raw_token_ids(), cs, n, key.extra_key, key.cache_salt)
        slots = []
        for h in chain[have:]:
            slot = self.host.lookup(h)
            if slot is None:
                break
            slots.append(slot)
        lock = radix.lock(match.last_device_node)  # making room must not evict the match
        try:
            pages = self._alloc_pages(len(slots)) if slots else None
            if not pages:
                return 0
            self._load_now(slots, pages)
            end = (have + len(pages)) * cs
            tree = radix.path_device_indices(match.last_device_node)[: have * cs]
            value = torch.cat([tree.to(torch.int64), self._page_slots(pages).to(tree.device)])
            radix.insert(InsertParams(key=key[:end], value=value, prev_prefix_len=have * cs))
        finally:
            self.host.release(slots)
            radix.unlock(lock)
        self.server["prefix_host_loaded_tokens"] += end - have * cs
        return end - have * cs

    # -- release -----------------------------------------------------------------------
    def released_ranges(self, idx: int) -> list[tuple[int, int]]:
        """Row position ranges of chunks that own no device page (not to be freed by SGLang)."""
        table = self.tables.get(idx)
        if table is None:
            return []
        gone = sorted(set(range(table.mirrored)) - table.resident)
        return [(c * self.cs, (c + 1) * self.cs) for c in gone]

    def release(self, idx: int) -> None:
        """The request ended (finished, aborted, retracted): host slots and prefetched cells go back."""
        table = self.tables.pop(idx, None)
        if table is None:
            return
        if table.pending is not None:
            if table.pending.future is not None:
                self.prefetcher.wait(table.pending.future)
            self._free_pages(list(table.pending.new_pages.values()))
            table.pending = None
        self.host.release(table.host_slots)
        table.stats.finished = True
        self.finished.append(table.stats)
        self.overrides.pop(table.rid, None)
        self.capture.forget(idx)
        self._publish()

    def forget_request_reservation(self, rid: str) -> None:
        """The prefill adder did not take the request after all: it stays queued, unreserved."""
        self.host_reserved.pop(rid, None)

    def forget_request(self, rid: str) -> None:
        """A request ended (or left before its first decode step: aborted in the queue or in prefill)."""
        self.host_reserved.pop(rid, None)
        self._host_waited.discard(rid)
        self.overrides.pop(rid, None)

    # -- what admission reserves ---------------------------------------------------------
    def decode_need_tokens(self, req) -> int | None:
        """Most device KV tokens this LSA decode row may still add to what it holds now (None:
        not an LSA row; SGLang's own estimate applies). The prefill adder reserves this for a
        running request instead of its remaining `max_new_tokens`: an LSA row holds at most
        its resident budget and an unmirrored tail shorter than a chunk plus a window, however
        long its sequence grows. A window's prefetch is not reserved: it takes only memory no
        running request has reserved (`_alloc_spare_pages`), else the set is swapped in place."""
        table = self.table_of(req)
        if table is None or not table.config.enabled:
            return None
        cs, tau = self.cs, table.config.tau
        left = _steps_left(req)
        pending = len(table.pending.new_pages) if table.pending else 0
        tail = table.seq_len - table.mirrored * cs  # unmirrored tokens now
        held = len(table.resident) + pending + -(-tail // cs)
        to_next = tau - table.steps  # steps until the pending set is swapped in
        budget = max(len(table.resident), _chunk_cap(table.config))
        chunks = max(len(table.resident) + pending, budget)
        if left <= to_next or self.host.free_slots * cs < tail + left:
            tail_max = tail + left  # no boundary ahead, or the mirror may not take the tail
        else:
            tail_max = max(tail + to_next, cs - 1 + min(tau, left - to_next))
        return max(0, chunks + -(-tail_max // cs) - held) * cs

    def take_returned_memory(self) -> bool:
        """Whether device memory went back to SGLang since the last call (then cleared)."""
        returned, self.returned_memory = self.returned_memory, False
        return returned

    def note_host_wait(self, rid: str) -> None:
        """A request waits in the queue because its host mirror does not fit yet."""
        if rid not in self._host_waited:
            self._host_waited.add(rid)
            self.server["host_waits"] += 1

    # -- observability -----------------------------------------------------------------
    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.update(self.stats()["server"])

    def stats(self) -> dict[str, Any]:
        running = [asdict(t.stats) for t in self.tables.values()]
        server = dict(self.server)
        server.update(
            device_kv_bytes=sum(r["device_kv_bytes"] for r in running),
            selection_metadata_bytes=sum(r["selection_metadata_bytes"] for r in running),
            full_kv_bytes=sum(r["full_kv_bytes"] for r in running),
            host_kv_bytes=self.host.used_slots * self.page_bytes,
            host_cached_bytes=self.host.cached_slots * self.page_bytes,
            host_capacity_bytes=self.host.capacity * self.page_bytes,
            chunk_bytes=self.page_bytes,
            running_requests=len(running),
            host_reserved_bytes=sum(self.host_reserved.values()) * self.page_bytes,
            device_free_tokens=int(self.allocator.available_size()),
        )
        server["resident_ratio"] = server["device_kv_bytes"] / max(server["full_kv_bytes"], 1)
        return {"server": server, "requests": running + [asdict(s) for s in self.finished]}

    def check_integrity(self) -> None:
        self.host.check_integrity()
        refs: dict[int, int] = {}
        for t in self.tables.values():
            for slot in t.host_slots:
                refs[slot] = refs.get(slot, 0) + 1
        assert len(refs) == self.host.used_slots, (len(refs), self.host.used_slots)
        assert all(self.host.refs(s) == n for s, n in refs.items())
        for idx, t in self.tables.items():
            t.check_integrity(self.req_to_token[idx], self.cs)


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


def _chunk_cap(config: LSAConfig) -> int:
    """Most complete chunks a request may hold on the device: the selection budget plus the
    straddle rule's spare pages (`edge_pages`)."""
    return device_budget_chunks(SelectionParams.from_config(config)) + config.extra_edge_chunks


def _steps_left(req) -> int:
    """Decode steps a request may still take (its max_new_tokens bound)."""
    return max(0, req.sampling_params.max_new_tokens - len(req.output_ids))
