"""Tier-1 selection: which complete chunks of a request stay resident on the device next window.

Pure functions over one request's chunk scores, on the host (a few thousand floats per tau steps).
Chunk ids ``0..n_chunks-1`` are the request's complete chunks; the partial last chunk is the
caller's and always resident. The first `sink_chunks` and the last `recent_chunks` are forced; the
others ("candidates") are grouped into pages ``p = chunk_id // chunks_per_page`` (the same
absolute layout as the scoring kernel's per-page counts, so pages do not shift as a request grows;
a page that overlaps the sink or tail contributes only its candidate chunks). Every policy keeps at
most `page_budget` pages, so policies compare at equal device footprint. At a later window
boundary a `swap_limit` bounds how many pages the new set may bring in that are not already held:
the device holds the current set and the incoming pages side by side until the swap, so the limit
bounds a request's peak device bytes and the copies per boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lsa_sglang.config import POLICIES, check_selection

SCORED = ("indexer", "quest", "attention")  # policies that rank chunks by scores


@dataclass(frozen=True)
class SelectionParams:
    """Selection knobs (names follow LSAConfig; `recent_chunks` is the tail in chunks)."""

    threshold: float = 0.5
    chunks_per_page: int = 1
    page_budget: int = 16
    min_pages: int = 0
    sink_chunks: int = 1
    recent_chunks: int = 8
    policy: str = "indexer"
    needle_fallback: bool = True

    def __post_init__(self) -> None:
        check_selection(self.__dict__, "SelectionParams field")  # LSAConfig's rules (an LSAConfigError)

    @classmethod
    def from_config(cls, cfg: Any) -> "SelectionParams":
        """From any object with LSAConfig's attribute names."""
        return cls(
            threshold=float(cfg.threshold),
            chunks_per_page=int(cfg.chunks_per_page),
            page_budget=int(cfg.page_budget),
            min_pages=int(cfg.min_pages),
            sink_chunks=int(cfg.sink_chunks),
            recent_chunks=int(cfg.recent_chunks),
            policy=str(cfg.policy),
            needle_fallback=bool(cfg.needle_fallback),
        )


class Selection(NamedTuple):
    """Resident set for the next window; all id tensors are sorted int64 on the CPU."""

    resident: torch.Tensor  # forced | picked
    forced: torch.Tensor  # sink + recency tail
    picked: torch.Tensor  # chosen by the policy beyond the forced ones
    pages_kept: int  # pages the picked chunks come from
    fallback: bool  # the needle fallback widened this selection


def device_budget_chunks(params: SelectionParams) -> int:
    """Most complete chunks one request can hold on the device (the partial chunk not counted)."""
    return params.sink_chunks + params.recent_chunks + params.page_budget * params.chunks_per_page


def forced_chunks(n_chunks: int, params: SelectionParams) -> torch.Tensor:
    """Sink + recency-tail chunk ids, sorted."""
    ids = torch.arange(n_chunks, dtype=torch.int64)
    return ids[(ids < params.sink_chunks) | (ids >= n_chunks - params.recent_chunks)]


def candidate_chunks(n_chunks: int, params: SelectionParams) -> torch.Tensor:
    """Chunk ids the policy chooses among (everything not forced): one contiguous range."""
    lo = min(params.sink_chunks, n_chunks)
    hi = max(lo, n_chunks - params.recent_chunks)
    return torch.arange(lo, hi, dtype=torch.int64)


def member_mask(chunks, lo: int, hi: int) -> torch.Tensor:
    """``[hi - lo]`` bool: which of the chunk ids ``lo..hi-1`` are in `chunks` (a tensor or a set)."""
    ids = torch.as_tensor(sorted(chunks) if isinstance(chunks, (set, frozenset)) else chunks, dtype=torch.int64)
    mask = torch.zeros(hi - lo, dtype=torch.bool)
    mask[ids[(ids >= lo) & (ids < hi)] - lo] = True
    return mask


def _check_scores(scores: torch.Tensor | None, n_chunks: int, policy: str) -> torch.Tensor:
    if scores is None:
        raise ValueError(f"policy {policy!r} needs scores for the {n_chunks} chunks")
    # float64: sigmoid scores of confident chunks differ by less than float32 resolves near 1.0,
    # and a selection decided by rounding changes with the batch a request ran in
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
    if s.numel() != n_chunks:
        raise ValueError(f"expected {n_chunks} scores, got {s.numel()}")
    return torch.nan_to_num(s, nan=float("-inf"))  # a NaN score never wins a page


def _rank_pages(keys: list[torch.Tensor]) -> torch.Tensor:
    """Order of rows sorted by several keys, all descending, first key most significant.

    Stable sorts from the least to the most significant key. `index_select`, not ``t[idx]``:
    advanced indexing is ~300x slower on CPU here (13 ms vs 0.04 ms for 16K rows).
    """
    order = torch.arange(keys[0].numel())
    for key in reversed(keys):
        by = torch.sort(key.index_select(0, order), descending=True, stable=True).indices
        order = order.index_select(0, by)
    return order


def select_chunks(
    n_chunks: int,
    params: SelectionParams,
    scores: torch.Tensor | None = None,
    rng: torch.Generator | int | None = None,
    widen: bool = False,
    held: torch.Tensor | None = None,
    swap_limit: int | None = None,
) -> Selection:
    """Resident chunk set of one request for the next window.

    `scores [n_chunks]`: combined indexer scores (policy "indexer"), Quest bounds ("quest") or the
    backbone's attention shares ("attention": fixed budget, filled by score like "quest");
    ignored by "recency" and "random". `rng`: a torch.Generator or int seed, required by "random"
    (explicit so baselines are reproducible). `widen`: the needle fallback (see `needs_fallback`);
    honoured only for the indexer policy and when ``params.needle_fallback`` is on. `held`: chunk
    ids resident now (a tensor or a set); with `swap_limit` the kept pages include at most that
    many pages not wholly held (the policy's best), the rest are the policy's best held pages
    (None: no limit).
    """
    if n_chunks < 0:
        raise ValueError(f"n_chunks must be >= 0, got {n_chunks}")
    forced = forced_chunks(n_chunks, params)
    cand = candidate_chunks(n_chunks, params)
    cpp = params.chunks_per_page

    def done(picked: torch.Tensor, fallback: bool = False) -> Selection:
        picked = torch.sort(picked).values
        resident = torch.sort(torch.cat([forced, picked])).values
        n_pages = int(torch.unique(picked // cpp).numel()) if picked.numel() else 0
        return Selection(resident, forced, picked, n_pages, fallback)

    if params.policy in SCORED:
        s = _check_scores(scores, n_chunks, params.policy)
    if cand.numel() <= params.page_budget * cpp:
        return done(cand)  # everything fits: selection would only lose chunks

    # Candidates are the contiguous range [lo, hi); their pages are p_lo..p_hi, indexed locally.
    lo, hi = int(cand[0]), int(cand[-1]) + 1
    p_lo = lo // cpp
    local = cand // cpp - p_lo  # local page of every candidate chunk
    n_pages = (hi - 1) // cpp - p_lo + 1
    budget = params.page_budget
    fallback = False

    # `order`: every candidate page, the policy's preferred first; it keeps the first `n_keep`
    n_keep = budget
    if params.policy == "recency":
        order = torch.arange(n_pages - 1, -1, -1)
    elif params.policy == "random":
        if rng is None:
            raise ValueError("policy 'random' needs rng (a torch.Generator or an int seed)")
        gen = rng if isinstance(rng, torch.Generator) else torch.Generator().manual_seed(int(rng))
        order = torch.randperm(n_pages, generator=gen)
    else:
        cs = s[lo:hi]
        page_max = torch.full((n_pages,), float("-inf"), dtype=cs.dtype).scatter_reduce(0, local, cs, reduce="amax")
        recency = torch.arange(n_pages, dtype=torch.float32)
        fallback = bool(widen and params.needle_fallback and params.policy == "indexer")
        if params.policy in ("quest", "attention") or fallback:
            order = _rank_pages([page_max, recency])
        else:
            density = torch.zeros(n_pages).index_add_(0, local, (cs > params.threshold).to(torch.float32))
            n_dense = int((density > 0).sum())
            n_keep = max(min(n_dense, budget), params.min_pages)
            # Dense pages first (densest, then max score, then recent); the top-up to min_pages
            # continues with the non-dense pages by max score, which is the same order.
            order = _rank_pages([density, page_max, recency])
    keep = order[:n_keep]
    if held is not None and swap_limit is not None:
        # a page is held when every candidate chunk of it is resident
        outside = (~member_mask(held, lo, hi)).to(torch.int64)
        missing = torch.zeros(n_pages, dtype=torch.int64).index_add_(0, local, outside)
        is_held = (missing == 0).index_select(0, order)
        incoming = keep[~is_held[:n_keep]][:swap_limit]
        keep = torch.cat([incoming, order[is_held][: n_keep - incoming.numel()]])
    kept = torch.zeros(n_pages, dtype=torch.bool).index_fill_(0, keep, True)
    picked = cand[kept.index_select(0, local)]
    return done(picked, fallback)


def needs_fallback(
    scores: torch.Tensor, threshold: float, tail_mass: float, tail_mass_floor: float = 0.5
) -> bool:
    """True when the indexer looks unsure: no candidate clears the threshold and the recency tail
    holds less than `tail_mass_floor` of the attention mass (the answer is likely far back).

    `scores` are the candidate chunks' scores (`candidate_chunks` is a contiguous range, so a
    slice ``scores[c[0]:c[-1]+1]`` of the request's scores); with no
    candidates there is nothing to widen, so False. The caller then passes ``widen=True`` to
    `select_chunks` for the selection it is making.
    """
    if not 0.0 <= tail_mass <= 1.0:
        raise ValueError(f"tail_mass must be in [0, 1], got {tail_mass!r}")
    s = torch.as_tensor(scores).reshape(-1)
    if s.numel() == 0:
        return False
    return not bool((s > threshold).any()) and tail_mass < tail_mass_floor


__all__ = [
    "POLICIES",
    "Selection",
    "SelectionParams",
    "candidate_chunks",
    "device_budget_chunks",
    "forced_chunks",
    "needs_fallback",
    "select_chunks",
]
