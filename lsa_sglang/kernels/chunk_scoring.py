"""Chunk scoring for the Neural Memory Indexer: torch reference and page bookkeeping
(`dispatch.score_chunks` picks the path per device).

For request ``b`` with indexer query heads ``q[b] [H, Dh]`` and head weights ``w[b] [H]``,
chunk ``c`` of that request scores ``sigmoid(sum_h w_h * relu(q_h . k_{c, g(h)}))`` where
``g(h) = h // (H // Hk)`` picks the chunk key of head ``h``'s group (``Hk == 1``: one
shared key, DeepSeek style). A chunk is selected when its score exceeds the threshold.
The page budget then ranks pages, ``chunks_per_page`` consecutive chunks of one request,
by how many of their chunks were selected, so the counts are produced here too.

Chunks of all requests are packed: ``keys [total_chunks, Hk, Dh]`` with ``chunk_indptr
[B+1]``. Pages are packed the same way: request ``b`` owns
``page_counts[page_indptr[b]:page_indptr[b+1]]``, ``ceil(n_chunks_b / chunks_per_page)`` pages.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch


class ChunkScores(NamedTuple):
    """Scores of every chunk, the threshold decision and per-page selected counts."""

    scores: torch.Tensor  # [total_chunks] float32, in (0, 1)
    selected: torch.Tensor  # [total_chunks] bool, scores > threshold
    page_counts: torch.Tensor  # [total_pages] int32, selected chunks per page
    page_indptr: torch.Tensor  # [B+1] int32, pages of request b


def check_scoring_inputs(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, chunk_indptr: torch.Tensor) -> None:
    """Raise ValueError on shapes the scoring paths cannot serve."""
    if q.dim() != 3 or keys.dim() != 3 or w.dim() != 2:
        raise ValueError("expected q [B, H, Dh], w [B, H], keys [total_chunks, Hk, Dh]")
    batch, heads, dh = q.shape
    if w.shape != (batch, heads):
        raise ValueError(f"w must be [B={batch}, H={heads}], got {tuple(w.shape)}")
    hk = keys.shape[1]
    if keys.shape[2] != dh:
        raise ValueError(f"key dim {keys.shape[2]} differs from query dim {dh}")
    if hk == 0 or heads % hk != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of key groups ({hk})")
    if chunk_indptr.dim() != 1 or chunk_indptr.numel() != batch + 1:
        raise ValueError(f"chunk_indptr must have B+1={batch + 1} entries")
    if chunk_indptr.dtype not in (torch.int32, torch.int64):
        raise ValueError("chunk_indptr must be an integer tensor")
    if len({q.device, w.device, keys.device, chunk_indptr.device}) != 1:
        raise ValueError("q, w, keys and chunk_indptr must be on one device")


def page_indptr_host(chunk_indptr: torch.Tensor, chunks_per_page: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(page_indptr, chunk_indptr)`` as host int64 tensors (one device sync per window)."""
    if chunks_per_page < 1:
        raise ValueError("chunks_per_page must be >= 1")
    indptr = chunk_indptr.to(device="cpu", dtype=torch.int64)
    counts = indptr[1:] - indptr[:-1]
    if bool((counts < 0).any()) or int(indptr[0]) != 0:
        raise ValueError("chunk_indptr must start at 0 and be non-decreasing")
    pages = (counts + chunks_per_page - 1) // chunks_per_page
    page_indptr = torch.zeros_like(indptr)
    page_indptr[1:] = torch.cumsum(pages, 0)
    return page_indptr, indptr


def page_layout(chunk_indptr: torch.Tensor, chunks_per_page: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(page_indptr [B+1] int32, page_of_chunk [total_chunks] int64, total_pages)`` on the chunks' device."""
    page_indptr, indptr = page_indptr_host(chunk_indptr, chunks_per_page)
    counts = indptr[1:] - indptr[:-1]
    req = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    local = torch.arange(int(indptr[-1])) - indptr[req]
    page_of_chunk = page_indptr[req] + local // chunks_per_page
    device = chunk_indptr.device
    return (
        page_indptr.to(device=device, dtype=torch.int32),
        page_of_chunk.to(device),
        int(page_indptr[-1]),
    )


def count_selected_per_page(selected: torch.Tensor, page_of_chunk: torch.Tensor, total_pages: int) -> torch.Tensor:
    """Selected chunks per page, ``[total_pages]`` int32."""
    counts = torch.zeros(total_pages, dtype=torch.int32, device=selected.device)
    return counts.index_add_(0, page_of_chunk, selected.to(torch.int32))


def chunk_logits_torch(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, chunk_indptr: torch.Tensor) -> torch.Tensor:
    """Pre-sigmoid ``sum_h w_h relu(q_h . k)`` per chunk, fp32, one request at a time."""
    heads, dh = q.shape[1], q.shape[2]
    hk = keys.shape[1]
    group = heads // hk
    out = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)
    bounds = chunk_indptr.tolist()
    for b in range(q.shape[0]):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        qb = q[b].float().view(hk, group, dh)
        dots = torch.einsum("kgd,ckd->ckg", qb, keys[lo:hi].float()).reshape(hi - lo, heads)
        out[lo:hi] = (torch.relu(dots) * w[b].float()).sum(dim=1)
    return out


def score_chunks_torch(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    chunk_indptr: torch.Tensor,
    threshold: float = 0.5,
    chunks_per_page: int = 64,
) -> ChunkScores:
    """Reference scorer (and CPU path)."""
    check_scoring_inputs(q, w, keys, chunk_indptr)
    page_indptr, page_of_chunk, total_pages = page_layout(chunk_indptr, chunks_per_page)
    scores = torch.sigmoid(chunk_logits_torch(q, w, keys, chunk_indptr))
    selected = scores > threshold
    return ChunkScores(scores, selected, count_selected_per_page(selected, page_of_chunk, total_pages), page_indptr)
