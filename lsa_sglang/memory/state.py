"""What the memory manager keeps per request and per server: chunk tables, the window being
prefetched, and the counters `/lsa/stats` shows.

A request's life: built (`RequestEntry`: its Req, its config) -> reserved (host slots promised
at prefill admission) -> admitted (its first decode step: chunks written through, window 0
selected, `ChunkTable` built) -> windows (every `tau` steps a new set swaps in) -> ended (host
slots and prefetched cells go back; its `RequestStats` join the finished list; the entry goes).
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lsa_sglang.config import LSAConfig
from lsa_sglang.indexer import SelectionParams, device_budget_chunks

SENTINEL_SLOT = 0  # slot of SGLang's reserved padding page: marks a released chunk in req_to_token


@dataclass
class RequestEntry:
    """One request, by rid, from the scheduler building its Req to its end."""

    req: weakref.ref  # the scheduler's Req
    config: LSAConfig  # the server's, with the request's overrides
    host_reserved: int = 0  # host slots promised from prefill admission until the table mirrors them
    host_waited: bool = False  # counted once in `ServerStats.host_waits`


@dataclass(kw_only=True)
class Counters:
    """What is counted per request and for the server alike (`ServerStats.count` adds to both)."""

    windows: int = 0
    chunks_copied: int = 0
    bytes_copied: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    indexer_seconds: float = 0.0
    fallbacks: int = 0
    reselections: int = 0  # chunks swapped in on a decode step's evidence (`reselect`)
    copies_released: int = 0  # copies of a resident chunk that ended, its hold started again (`release_copied`)
    sibling_reselections: int = 0  # chunks swapped in as other items of a list the answer copies (`copy_siblings`)
    # `reselect`: chunks a decode step's own scoring ranks in its top (as many as the set holds),
    # and of those the ones already on the device or being prefetched: the window's set as a
    # prediction of what the steps read (hit rate = lookahead_hits / lookahead_wanted)
    lookahead_wanted: int = 0
    lookahead_hits: int = 0
    prefix_hit_tokens: int = 0
    host_chunks_shared: int = 0
    peak_device_kv_bytes: int = 0


@dataclass
class RequestStats(Counters):
    rid: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    device_kv_bytes: int = 0
    full_kv_bytes: int = 0
    host_kv_bytes: int = 0
    selection_metadata_bytes: int = 0  # part of device_kv_bytes
    budget_tokens: int = 0  # device tokens of the chunks the selection picks (page_budget; budget_fraction)
    resident_ratio: float = 1.0
    policy: str = "indexer"
    lsa_enabled: bool = True
    finished: bool = False


@dataclass
class ServerStats(Counters):
    """Counters over the server's life (`/lsa/stats` "server", with the running totals added)."""

    requests_served: int = 0
    alloc_denied: int = 0
    host_full: int = 0
    device_cells_saved: int = 0
    prefix_host_loaded_tokens: int = 0
    retracted_requests: int = 0
    host_waits: int = 0
    sync_swaps: int = 0
    decode_steps: int = 0  # decode forwards LSA prepared (`LSAMemoryManager.prepare_decode`)
    decode_host_seconds: float = 0.0  # host time of that preparation, before any layer runs

    def count(self, request: RequestStats | None = None, **deltas) -> None:
        """Add to the server's counters and to the request's where it has the same field."""
        for key, v in deltas.items():
            setattr(self, key, getattr(self, key) + v)
            if request is not None and hasattr(request, key):
                setattr(request, key, getattr(request, key) + v)


@dataclass
class Pending:
    """The next window's resident set, its cells being filled by the prefetcher (or, with no
    spare memory for them, `deferred`: its misses are copied in at the swap itself)."""

    resident: set[int]
    new_pages: dict[int, int]  # chunk id -> device page being filled
    future: Future | None
    deferred: list[int] = field(default_factory=list)  # misses without cells, loaded at the swap


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
    copying: list[int] = field(default_factory=list)  # `release_copied`: resident chunks the answer copied at the last step
    listed: set[int] = field(default_factory=set)  # `copy_siblings`: chunks the answer has copied from
    siblings: list[int] = field(default_factory=list)  # `copy_siblings`: other items of the list it copies, next first
    swapped_in: list[int] = field(default_factory=list)  # chunks in-window swaps copied in since the last boundary, in order
    steps: int = 0  # decode steps since the last window boundary
    seq_len: int = 0  # tokens in the row at the last decode step
    pending: Pending | None = None
    stats: RequestStats | None = None
    window0_scores: torch.Tensor | None = None  # window 0 of `attention` or `quest`: the admission's scores (`attention` carries them)

    @property
    def mirrored(self) -> int:
        return len(self.host_slots)

    def metadata(self) -> list[torch.Tensor]:
        """The selection metadata kept on the device: what this request's selection reads
        (`LSAConfig.reads_chunk_keys`: the target layers' keys; `reselects`: every layer's bounds)."""
        return [t for t in (self.keys, self.kmin, self.kmax, self.bounds) if t is not None]

    def read_positions(self, seq_len: int, chunk_size: int, device) -> torch.Tensor:
        """Token positions attention reads: resident mirrored chunks + everything after them."""
        cs = chunk_size
        parts = [torch.arange(c * cs, (c + 1) * cs) for c in sorted(self.resident)]
        parts.append(torch.arange(self.mirrored * cs, seq_len))
        return torch.cat(parts).to(device)

    def check_integrity(self, req_to_token_row: torch.Tensor, chunk_size: int) -> None:
        assert len(set(self.host_slots)) == len(self.host_slots)
        assert self.resident <= set(range(self.mirrored))
        starts = req_to_token_row[: self.mirrored * chunk_size : chunk_size].tolist()
        for c, slot in enumerate(starts):
            if c in self.resident:
                assert slot != SENTINEL_SLOT and slot % chunk_size == 0, (c, slot)
            else:
                assert slot == SENTINEL_SLOT, (c, slot)


def carry_swaps(target: set[int], resident: set[int], coming: set[int], brought: list[int],
                strength=None, movable: range | None = None) -> tuple[set[int], list[int]]:
    """The set a window boundary swaps in, and the chunks of it to copy back in then.

    `target`: the set selected at the last boundary; `resident`: on the device now; `coming`:
    target chunks being fetched for it; `brought`: chunks in-window swaps (re-selection, the
    sibling rule) copied in since that selection, oldest first. Those swaps acted on newer
    evidence than `target`, so they carry over: a target chunk a swap released (neither
    resident nor coming) gives its place to a chunk the swaps brought in that `target` lacks
    (newest first); with `strength` (a chunk's evidence, e.g. re-selection's held shares), a
    brought chunk stronger than the weakest target chunk in `movable` that is on the device and
    not being fetched takes its place. Target chunks left without a place are returned to be
    copied back in, so the set keeps the size it was selected at."""
    gone = sorted(c for c in target if c not in resident and c not in coming)
    extra = list(dict.fromkeys(c for c in reversed(brought) if c in resident and c not in target))
    n = min(len(gone), len(extra))
    target = (target - set(gone[:n])) | set(extra[:n])
    lost, extra = gone[n:], extra[n:]
    if strength is not None and extra:
        weak = sorted((c for c in target if c in resident and c not in coming and c not in brought
                       and (movable is None or c in movable)), key=strength)
        for c, w in zip(sorted(extra, key=strength, reverse=True), weak):
            if strength(c) <= strength(w):
                break
            target = (target - {w}) | {c}
    return target, lost


def chunk_cap(config: LSAConfig) -> int:
    """Most complete chunks a request may hold on the device: sink, tail and the selection budget."""
    return device_budget_chunks(SelectionParams.from_config(config))


def steps_left(req) -> int:
    """Decode steps a request may still take (its max_new_tokens bound)."""
    return max(0, req.sampling_params.max_new_tokens - len(req.output_ids))
