"""Golden labels from the backbone's own attention: what the indexer is trained to predict.

Per decode position t (a "sample") and window ``[t, t + tau)`` (the steps one selection serves):
1. every row r of the window and every voting layer l gives an attention distribution over the
   positions before r, averaged over the layer's query heads (the indexer sums over heads too,
   so a per-KV-group label would ask for something its per-layer score cannot express);
2. summed per chunk, that is the attention mass per chunk; the sink chunks' mass is set aside
   (small models park most of their attention on token 0, which says nothing about content and
   is resident anyway), and the top-p chunks of what is left are that layer's picks;
3. a chunk is golden for row r if at least `votes` layers pick it;
4. the sample's positives are the union over the window's rows, restricted to chunks that were
   complete at t (``c < t // chunk_size``): the only ones the server can select at t.
Candidates (where metrics and the loss look) exclude the sink and recency tail, which the
selector keeps resident anyway (`lsa_sglang.indexer.selector.candidate_chunks`).
Pure torch; everything here is tested on hand-made attention.
"""

from __future__ import annotations

import torch


def chunk_mass(probs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``probs [R, T]`` (rows sum to 1 over keys) -> attention mass per chunk ``[R, ceil(T/cs)]``."""
    R, T = probs.shape
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    return probs.reshape(R, n, chunk_size).sum(-1)


def top_p_picks(mass: torch.Tensor, p: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Smallest set of chunks per row holding at least a fraction `p` of the row's mass.

    ``mass [R, N]``; `exclude` ``[N]`` or ``[R, N]`` bool marks chunks that neither count in the
    total nor get picked (the sink). Ties break towards the lower chunk id (stable sort), so the
    result is deterministic. A row whose included mass is zero picks nothing. -> bool ``[R, N]``.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p must be in (0, 1], got {p!r}")
    m = mass.double()
    if exclude is not None:
        m = m.masked_fill(exclude.expand_as(m), 0.0)
    total = m.sum(-1, keepdim=True)
    sorted_m, order = torch.sort(m, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_m, -1) - sorted_m  # mass strictly before each sorted entry
    # A chunk is needed while what precedes it is still short of p (relative tolerance against
    # rounding); zero-mass chunks are never needed.
    need = (before < p * total * (1 - 1e-6)) & (sorted_m > 0)
    picks = torch.zeros_like(need)
    return picks.scatter(-1, order, need)


def window_positives(golden_rows: torch.Tensor, n_complete: torch.Tensor) -> torch.Tensor:
    """``golden_rows [P, W, N]`` (golden per row of each sample's window) -> ``[P, N]`` bool:
    the union over the window, limited to the ``n_complete[P]`` chunks complete at the sample."""
    P, W, N = golden_rows.shape
    union = golden_rows.any(dim=1)
    complete = torch.arange(N)[None, :] < n_complete.reshape(P, 1)
    return union & complete


def candidate_mask(n_complete: torch.Tensor, n_chunks: int, sink_chunks: int, recent_chunks: int) -> torch.Tensor:
    """``[P, n_chunks]`` bool: per sample, the chunks the selector chooses among (not sink, not
    recency tail, complete) — the same contiguous range as `selector.candidate_chunks`."""
    n = n_complete.reshape(-1, 1)
    ids = torch.arange(n_chunks)[None, :]
    lo = torch.clamp(n, max=sink_chunks)
    hi = torch.maximum(lo, n - recent_chunks)
    return (ids >= lo) & (ids < hi)


def default_votes(n_vote_layers: int) -> int:
    """Votes needed for a golden chunk: 40% of the voting layers, at least 1. Measured on
    SmolLM2 (21 voting layers, 4K-token documents): >= 6 votes made 16% of the candidates
    positive and >= 9 made 6.5% (the paper reports 2-3% among ~7,900 candidates); the stricter
    vote keeps the chunks many layers agree on, which the indexer can also predict better
    (untrained AUC 0.63 -> 0.68)."""
    return max(1, -(-n_vote_layers * 2 // 5))


def default_vote_layers(num_layers: int) -> tuple[int, ...]:
    """All layers but the first two: those attend broadly by position in small models and would
    vote for whole regions rather than for content."""
    skip = 2 if num_layers > 4 else 0
    return tuple(range(skip, num_layers))


__all__ = [
    "candidate_mask",
    "chunk_mass",
    "default_vote_layers",
    "default_votes",
    "top_p_picks",
    "window_positives",
]
