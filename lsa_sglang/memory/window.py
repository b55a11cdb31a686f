"""The window cycle of an LSA request: write-through, selection, prefetch, swap.

- write-through (`write_through`): every chunk completed since the last call is copied to the
  host mirror, or shared by reference when a chunk with the same prefix hash is there, and its
  frozen key summaries are kept on the device (counted in its device bytes);
- selection (`select`): at admission from the prefill's own attention (`attention` policy) or
  the indexer, at each later boundary from the indexer (or window 0's scores, `carry`), the budget
  always filled; during a window, re-selection on evidence (`reselect`: a decode step's queries
  bound what it read of every chunk) swaps one chunk in per step;
- prefetch (`boundary`): the next window's misses get spare cells and are copied by the
  Prefetcher while this window decodes, and swap in at the next boundary (`apply`), where the
  chunks in-window swaps brought in carry over (`state.carry_swaps`); with no
  spare memory the set swaps in at that same boundary, its misses copied then, after the chunks
  it drops are released (`_swap_now`), so the tokens a request reads do not depend on the load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Callable

import torch

from lsa_sglang.indexer import (
    SelectionParams,
    attention_scores,
    candidate_chunks,
    ensemble_layers,
    needs_fallback,
    quest_scores,
    select_chunks,
)
from lsa_sglang.indexer.attention_signal import (
    copied_chunks, copy_start, evidence_swap, head_scores, heads_by_layer, list_siblings, quest_shares,
    quest_window0, raise_held, release_copied,
)
from lsa_sglang.indexer.selector import SCORED, member_mask
from lsa_sglang.kernels import copy_chunks_to_device, copy_chunks_to_host
from lsa_sglang.memory.cells import DeviceCells
from lsa_sglang.memory.host_mirror import HostMirror, HostMirrorFull, prefix_hashes
from lsa_sglang.memory.prefetcher import Prefetcher
from lsa_sglang.memory.state import ChunkTable, Pending, ServerStats, carry_swaps, chunk_cap, steps_left

logger = logging.getLogger(__name__)


class RequestTokens(Sequence[int]):
    """A request's tokens so far, prompt then answer, read without joining them (a step's copy
    checks read a few chunks and the last tokens, not the whole context)."""

    def __init__(self, req) -> None:
        self.prompt, self.answer = req.origin_input_ids, req.output_ids

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)

    def __getitem__(self, i):
        if not isinstance(i, slice):
            i = range(len(self))[i]
            return self.prompt[i] if i < len(self.prompt) else self.answer[i - len(self.prompt)]
        start, stop, step = i.indices(len(self))
        if step != 1:
            raise ValueError("RequestTokens slices take no step")
        n = len(self.prompt)
        return list(self.prompt[start:min(stop, n)]) + list(self.answer[max(start - n, 0):max(stop - n, 0)])


class WindowCycle:
    def __init__(self, cells: DeviceCells, host: HostMirror, capture, indexer, server: ServerStats,
                 req_of: Callable, reserved_tokens: Callable[[], int]) -> None:
        """`req_of(table)`: the scheduler's Req behind a table (or None); `reserved_tokens()`:
        device tokens the prefill adder keeps free for the running requests."""
        self.cells, self.host, self.server = cells, host, server
        self.cs = cells.cs
        self.capture = capture  # models.adapter.HiddenCapture
        self.indexer = indexer
        self.target_layers = list(capture.layers)
        self.req_of, self.reserved_tokens = req_of, reserved_tokens
        self.prefetcher = Prefetcher()
        self._step_queries: dict[int, tuple[torch.Tensor, float]] = {}  # layer -> ([B, H, D], scale)
        self._step_rows: dict[int, int] = {}  # req_pool_idx -> its row of the last decode batch

    # -- a decode step's queries (`reselect`) --------------------------------------------------
    @property
    def wants_step_queries(self) -> bool:
        """A request of this decode batch re-selects on evidence: attention hands its queries."""
        return bool(self._step_rows)

    def note_step_queries(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """One layer's decode queries ``[B, H, D]`` of this step, read at the next step."""
        self._step_queries[layer] = (q.detach().clone(), scale)

    def take_step(self) -> tuple[dict[int, tuple[torch.Tensor, float]], dict[int, int]]:
        """The last step's queries and rows, cleared for this step's."""
        out = self._step_queries, self._step_rows
        self._step_queries, self._step_rows = {}, {}
        return out

    def watch(self, idx: int, row: int) -> None:
        """The row `idx` has in this decode batch: its queries are kept for its re-selection."""
        self._step_rows[idx] = row

    # -- boundaries ----------------------------------------------------------------------------
    def boundary(self, table: ChunkTable, seq_len: int) -> None:
        table.steps = 0
        self.server.count(table.stats, windows=1)
        if table.pending is not None:
            pending, table.pending = table.pending, None
            if pending.future is not None:
                waited = self.prefetcher.wait(pending.future)
                if waited > 0:
                    self.server.count(table.stats, stalls=1, stall_seconds=waited)
            target, lost = self._carry_swaps(table, pending)
            if pending.deferred:
                self._swap_now(table, target, pending.deferred + lost)
            else:
                self.apply(table, target - set(lost), pending.new_pages)
                if lost:  # released by in-window swaps with nothing to take their place
                    self._swap_now(table, target, lost)
        table.swapped_in = []
        req = self.req_of(table)
        self.write_through(table, seq_len, req)
        # The set selected now is swapped in at the next boundary: a request that ends before
        # it would only hold cells it never reads (and that admission had to reserve).
        if req is None or steps_left(req) >= table.config.tau:
            selection = self.select(table, seq_len, held=table.resident)
            if selection is not None:
                self._start_prefetch(table, selection)
        logger.debug(
            "lsa window rid=%s seq=%d mirrored=%d resident=%d next=%s stalls=%d",
            table.rid, seq_len, table.mirrored, len(table.resident),
            None if table.pending is None else len(table.pending.resident), table.stats.stalls,
        )

    def _carry_swaps(self, table: ChunkTable, pending: Pending) -> tuple[set[int], list[int]]:
        """`state.carry_swaps` for the set `pending` brings: what re-selection and the sibling
        rule swapped during the window stays, ranked by re-selection's held shares."""
        held = table.held
        strength = None if held is None else (lambda c: float(held[c]) if c < held.numel() else 0.0)
        cand = candidate_chunks(table.mirrored, SelectionParams.from_config(table.config))
        movable = range(int(cand[0]), int(cand[-1]) + 1) if len(cand) else range(0)
        return carry_swaps(pending.resident, table.resident, set(pending.new_pages) | set(pending.deferred),
                           table.swapped_in, strength, movable)

    # -- selection -----------------------------------------------------------------------------
    def select(self, table: ChunkTable, seq_len: int, held: set[int] | None = None) -> set[int] | None:
        """The resident set for the next window. `held`: the chunks resident now (a later
        boundary), so the config's `swap_limit` bounds the pages the set brings in."""
        n = table.mirrored
        config = table.config
        params = SelectionParams.from_config(config)
        scores = tail_mass = None
        t = time.perf_counter()
        queries = self.capture.take_queries(table.req_pool_idx)  # only the admission uses them
        if n > 0 and queries is not None:  # window 0 of `attention` or `quest`: the prefill's queries
            scores = self._window0_scores(table, seq_len, queries, candidate_chunks(n, params))
            table.window0_scores = scores
        elif config.policy == "attention" and config.attention_later == "carry":
            # later windows rank by what the prompt's last rows attended (chunks written since score 0)
            scores = torch.zeros(n)
            if table.window0_scores is not None:
                kept = min(n, table.window0_scores.numel())
                scores[:kept] = table.window0_scores[:kept]
        elif config.policy in SCORED and n > 0:
            hidden = self.capture.last_hidden(table.req_pool_idx)
            if hidden is not None:  # `attention` after window 0: the indexer's scores, budget filled
                policy = "indexer" if config.policy == "attention" else config.policy
                scores, tail_mass = self._score(table, hidden, seq_len - 1, policy)
        self.server.count(table.stats, indexer_seconds=time.perf_counter() - t)
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
            self.server.count(table.stats, fallbacks=1)
        return set(sel.resident.tolist())

    def reselect(self, table: ChunkTable, queries: list[torch.Tensor], scales: list[float], swap: bool) -> None:
        """Re-selection on evidence after a decode step: the step's queries at every layer bound
        what it read of each candidate chunk (`quest_shares`, from the key bounds) and raise each
        chunk's largest share so far (`held`; with `release_copied` a chunk the answer is copying
        holds its page until the copy ends, then only what later steps read of it); when `swap`
        (the answer is past `reselect_after` tokens) and the best chunk not on the device drew
        more than the weakest resident one holds, that one is released and the other copied in
        now (a counted stall): one chunk per step, the set's size unchanged. With `copy_siblings`
        a copy that starts brings in the other items of its list, one that ends frees its page
        for them (`_siblings`)."""
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
        raise_held(held, share)
        self._count_lookahead(table, share, lo, hi)
        req = self.req_of(table)
        if table.config.release_copied and req is not None:
            watched = [c for c in table.resident if lo <= c < hi]
            copying = copied_chunks(RequestTokens(req), table.config.release_copied, watched, self.cs)
            ended = release_copied(held, share, copying, table.copying, lo, hi)
            table.copying = copying
            if ended:
                self.server.count(table.stats, copies_released=ended)
            if table.config.copy_siblings and (ended or not table.listed.issuperset(copying)):
                self._siblings(table, req, lo, hi, held)
        pair = evidence_swap(share, held, member_mask(table.resident, lo, hi)) if swap else None
        self.server.count(table.stats, indexer_seconds=time.perf_counter() - t)
        if pair is None:
            return
        incoming, outgoing = lo + pair[0], None if pair[1] is None else lo + pair[1]
        t = time.perf_counter()
        if not self._swap_in(table, table.resident - {outgoing}, [incoming]):
            return
        self.server.count(table.stats, reselections=1, stalls=1,
                          stall_seconds=time.perf_counter() - t, chunks_copied=1, bytes_copied=self.cells.page_bytes)

    def _count_lookahead(self, table: ChunkTable, share: torch.Tensor, lo: int, hi: int) -> None:
        """`lookahead_wanted` / `lookahead_hits`: the step's top chunks by its own shares, as many
        as the set holds among the candidates, and how many of them are resident or pending."""
        ready = table.resident | (table.pending.resident if table.pending is not None else set())
        k = min(sum(1 for c in table.resident if lo <= c < hi), hi - lo)
        if k == 0:
            return
        top = torch.topk(share, k).indices.add_(lo).tolist()
        self.server.count(table.stats, lookahead_wanted=k, lookahead_hits=sum(c in ready for c in top))

    def _siblings(self, table: ChunkTable, req, lo: int, hi: int, held: torch.Tensor) -> None:
        """The sibling rule (`copy_siblings`), when a copy starts or ends: when the answer copies
        one chunk alone (`table.copying`; several: it copies text the items share, such as the
        lead-in) that it did not before, once the copy holds `release_copied` tokens of the
        answer itself (`copy_start`), where the `copy_siblings` prompt tokens before the copied
        run recur, other items of the same list follow (`list_siblings`: the request's siblings,
        the next items in document order first). Those not copied yet hold their pages until
        copied (held 1, and window 0's top score for the carried later windows), and those not on
        the device come in now, in that order, for the weakest resident candidates that are
        neither siblings nor being copied (a copy that ended frees its chunk's page for the next
        item): a synchronous copy (a counted stall), the set's size unchanged. The window already
        prefetched keeps them too."""
        config, cs = table.config, self.cs
        prompt = req.origin_input_ids
        copying = table.copying[0] if len(table.copying) == 1 else None  # several: text the items share
        at = None
        if copying is not None and copying not in table.listed:
            at = copy_start(RequestTokens(req), config.release_copied, copying, cs, len(req.output_ids))
        if at is not None:  # (None: the run still begins in the prompt's own last tokens)
            table.listed.add(copying)
            found = [s for s in list_siblings(prompt, at, config.copy_siblings, cs, 2 * chunk_cap(config))
                     if lo <= s < hi] if at < len(prompt) else []
            if found:
                table.siblings = found + [s for s in table.siblings if s not in found]
        want = [s for s in table.siblings if s not in table.listed]
        if not want:
            return
        for s in want:
            held[s - lo] = 1.0
        w0 = table.window0_scores
        if w0 is not None:
            w0[[s for s in want if s < w0.numel()]] = w0.max()
        keep = set(want) | set(table.copying)
        spare = sorted((c for c in table.resident if lo <= c < hi and c not in keep), key=lambda c: float(held[c - lo]))
        incoming = [s for s in want if s not in table.resident][: len(spare)]
        if not incoming:
            return
        outgoing = spare[: len(incoming)]
        t = time.perf_counter()
        if not self._swap_in(table, table.resident - set(outgoing), incoming):
            return
        self._keep_pending(table, incoming, outgoing, keep, held, lo, hi)
        self.server.count(table.stats, reselections=len(incoming), sibling_reselections=len(incoming), stalls=1,
                          stall_seconds=time.perf_counter() - t, chunks_copied=len(incoming),
                          bytes_copied=len(incoming) * self.cells.page_bytes)

    @staticmethod
    def _keep_pending(table: ChunkTable, incoming: list[int], outgoing: list[int], keep: set[int],
                      held: torch.Tensor, lo: int, hi: int) -> None:
        """The set prefetched for the next window (selected before `incoming` came in) takes
        them in place of chunks it holds that just left (`outgoing`), else of its weakest
        candidates outside `keep` that it does not prefetch: the next boundary keeps them."""
        p = table.pending
        if p is None:
            return
        resident = set(p.resident)
        for c in incoming:
            if c in resident:
                continue
            out = [o for o in outgoing if o in resident and o not in p.new_pages]
            if not out:
                out = sorted((o for o in resident if lo <= o < hi and o not in keep and o not in p.new_pages),
                             key=lambda o: float(held[o - lo]))
            if not out:
                break
            resident.discard(out[0])
            resident.add(c)
            if out[0] in p.deferred:
                p.deferred.remove(out[0])
        p.resident = resident

    def _window0_scores(self, table: ChunkTable, seq_len: int, queries, cand: torch.Tensor) -> torch.Tensor:
        """Window 0 from the prefill's queries over the prompt's keys, all still on the device at
        admission (`indexer.attention_signal`): `attention`, the last `attention_rows` prompt
        tokens' attention at every layer from `attention_first_layer` on (with
        `attention_heads`, the summed attention of those heads alone); `quest`, the last prompt
        token's Quest bound of each chunk's key min and max at every layer."""
        config = table.config
        slots = self.cells.req_to_token[table.req_pool_idx, : seq_len - 1].to(torch.int64)
        first = config.attention_first_layer if config.policy == "attention" else 0
        layers = [l for l in sorted(queries) if l >= first]
        lo, hi = (int(cand[0]), int(cand[-1]) + 1) if len(cand) else (0, 0)
        keys = (self.cells.k_buffers[l].index_select(0, slots) for l in layers)
        scales = [queries[l][1] for l in layers]
        with torch.no_grad():
            if config.policy == "quest":
                return quest_window0([queries[l][0][-1] for l in layers], keys, scales, table.mirrored, self.cs, (lo, hi))
            if config.attention_heads is not None:  # the model's retrieval heads alone
                by_layer = heads_by_layer(config.attention_heads)
                read = list(by_layer)
                return head_scores(
                    [queries[l][0][-config.attention_rows:] for l in read],
                    (self.cells.k_buffers[l].index_select(0, slots) for l in read), [queries[l][1] for l in read],
                    [by_layer[l] for l in read], table.mirrored, self.cs, (lo, hi), spill=config.attention_spill,
                )
            return attention_scores(
                [queries[l][0][-config.attention_rows:] for l in layers], keys, scales, table.mirrored, self.cs,
                (lo, hi), spill=config.attention_spill,
            )

    def _score(self, table: ChunkTable, hidden: torch.Tensor, position: int, policy: str):
        pos = torch.tensor([position], device=hidden.device)
        with torch.no_grad():
            q, w = self.indexer(hidden[None].to(self.indexer_dtype), pos)
            logits = self.indexer.layer_logits(q, w, table.keys.to(q.dtype))[0]  # [L, N]
            if policy == "quest":
                per_layer = torch.stack([
                    quest_scores(q[0, l], table.kmin[:, l], table.kmax[:, l]) for l in range(q.shape[1])
                ])
                scores = per_layer.max(dim=0).values
            else:
                probs = torch.sigmoid(logits.double())  # float32 rounds confident chunks to ties
                scores = ensemble_layers(probs, table.config.ensemble)
            # Proxy for the attention mass on the recency tail: softmax of the layer-mean
            # logits over chunks, mass of the last `recent_chunks`.
            mass = torch.softmax(logits.mean(0), 0)
            rc = table.config.recent_chunks
            tail_mass = float(mass[-rc:].sum()) if rc > 0 else 0.0
        return scores.cpu(), min(max(tail_mass, 0.0), 1.0)

    @property
    def indexer_dtype(self) -> torch.dtype:
        return next(self.indexer.parameters()).dtype

    # -- residency changes -----------------------------------------------------------------------
    def write_through(self, table: ChunkTable, seq_len: int, req=None) -> None:
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
            self.server.host_full += 1
            return
        keys = [None if s is None else self.host.meta[s] for s in slots]
        if misses:
            pages = [self.cells.page_of(table.req_pool_idx, new[i]) for i in misses]
            # on CUDA a side-stream copy: nothing may reuse these pages (freed once the set is
            # selected) or read the slots before it is done
            self.cells.order_after(copy_chunks_to_host(self.cells.k_buffers, self.cells.v_buffers, pages,
                                                       self.host.buffer, fresh))
            computed = self.cells.chunk_keys(torch.tensor(pages, device=self.cells.device), self.target_layers)
            computed = [k.cpu() for k in computed]  # the mirror's copy lives on the host
            for n, (i, slot) in enumerate(zip(misses, fresh)):
                slots[i], keys[i] = slot, tuple(k[n] for k in computed)
                if chain is not None:
                    self.host.publish(slot, chain[new[i]], keys[i])
        shared = len(new) - len(misses)
        self.server.count(table.stats, host_chunks_shared=shared)
        # the device keeps (and counts, `_account`) only what this request's selection reads
        config = table.config
        wanted = (config.reads_chunk_keys,) * 3 + (config.reselects,)
        old = (table.keys, table.kmin, table.kmax, table.bounds)
        grown = [torch.stack(parts).to(self.cells.device) if want else None
                 for parts, want in zip(zip(*keys), wanted)]  # the new chunks' mean, kmin, kmax, bounds
        table.keys, table.kmin, table.kmax, table.bounds = (
            g if o is None or g is None else torch.cat([o, g]) for o, g in zip(old, grown)
        )
        table.host_slots.extend(slots)
        if chain is not None:
            table.chain = chain[:complete]
        table.resident.update(new)
        table.stats.host_kv_bytes = table.mirrored * self.cells.page_bytes

    def _extend_chain(self, table: ChunkTable, req, complete: int) -> list[bytes] | None:
        """Prefix hashes of chunks [0, complete): each covers every token up to its end."""
        if req is None or len(table.chain) != table.mirrored:
            return None
        tokens = list(req.origin_input_ids) + list(req.output_ids)
        if len(tokens) < complete * self.cs:
            return None
        return prefix_hashes(tokens, self.cs, complete, req.extra_key, req.cache_salt, table.chain)

    def apply(self, table: ChunkTable, resident: set[int], new_pages: dict[int, int]) -> None:
        """Swap `resident` in: prefetched cells become visible, evicted ones are released (and a
        prefetched copy of a chunk that became resident meanwhile, by re-selection)."""
        idx = table.req_pool_idx
        evict = sorted(table.resident - resident)
        evicted_pages = [self.cells.page_of(idx, c) for c in evict]
        self.cells.set_rows(idx, evict, None)
        self.cells.free(evicted_pages + [p for c, p in new_pages.items() if c in table.resident])
        arrive = sorted(c for c in new_pages if c not in table.resident)
        self.cells.set_rows(idx, arrive, [new_pages[c] for c in arrive])
        table.resident = (table.resident - set(evict)) | set(arrive)

    def _start_prefetch(self, table: ChunkTable, resident: set[int]) -> None:
        misses = sorted(resident - table.resident)
        new_pages: dict[int, int] = {}
        if misses:
            pages = self._alloc_spare(len(misses))
            if pages is None:
                # swapped in at the same boundary as a prefetched set would be (so answers do not
                # depend on the load), copied then, after the chunks it drops are released
                table.pending = Pending(resident, {}, None, deferred=misses)
                return
            new_pages = dict(zip(misses, pages))
        future = None
        if misses:
            slots = [table.host_slots[c] for c in misses]
            pages = [new_pages[c] for c in misses]
            host, kb, vb = self.host.buffer, self.cells.k_buffers, self.cells.v_buffers
            after = None
            if self.cells.device.type == "cuda":  # the worker thread's current stream is not ours
                after = torch.cuda.Event()
                after.record(torch.cuda.current_stream(self.cells.device))
            future = self.prefetcher.submit(lambda: copy_chunks_to_device(host, slots, kb, vb, pages, after=after))
            self.server.count(table.stats, chunks_copied=len(misses), bytes_copied=len(misses) * self.cells.page_bytes)
        table.pending = Pending(resident, new_pages, future)

    def _swap_now(self, table: ChunkTable, resident: set[int], misses: list[int]) -> None:
        """Switch to `resident` when no memory beyond what admission reserved was spare for a
        double-buffered prefetch: the chunks the new set drops are released first and its
        `misses` (those it lacked when it was selected, as a prefetch would have copied) that
        are still absent are copied synchronously into their cells (a counted stall). The
        request never holds more than its budget, which is what admission reserved for it."""
        t = time.perf_counter()
        misses = [c for c in misses if c not in table.resident]
        if not self._swap_in(table, resident & table.resident, misses):
            return
        self.server.count(table.stats, stalls=1, stall_seconds=time.perf_counter() - t, sync_swaps=1,
                          chunks_copied=len(misses), bytes_copied=len(misses) * self.cells.page_bytes)

    def _swap_in(self, table: ChunkTable, staying: set[int], incoming: list[int]) -> bool:
        """Release the resident chunks not in `staying`, then copy `incoming` synchronously into
        fresh cells. False when no cells were free (only when a running request outgrew its
        reservation)."""
        self.apply(table, staying, {})
        pages = self.cells.alloc(len(incoming))
        if pages is None:
            self.server.alloc_denied += 1
            return False
        self._load([table.host_slots[c] for c in incoming], pages)
        self.cells.set_rows(table.req_pool_idx, incoming, pages)
        table.resident |= set(incoming)
        table.swapped_in += incoming
        return True

    def _alloc_spare(self, n: int) -> list[int] | None:
        """Cells admission did not reserve (a window's prefetch): only from memory no running
        request has reserved."""
        return self.cells.alloc_spare(n, self.reserved_tokens)

    def _load(self, slots: list[int], pages: list[int]) -> None:
        self.cells.load(self.host.buffer, slots, pages)

    def drop_pending(self, table: ChunkTable) -> None:
        """The request ended: a prefetch still running is waited for, its cells go back."""
        if table.pending is not None:
            if table.pending.future is not None:
                self.prefetcher.wait(table.pending.future)
            self.cells.free(list(table.pending.new_pages.values()))
            table.pending = None
