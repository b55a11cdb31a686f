"""Random sparse paged decode problems for tests and benchmarks.

A problem looks like what the LSA backend hands the kernels: a page pool shared by
all requests, and per request an ascending list of selected pages whose last page
(the recency tail) may be partial.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


class PagedProblem(NamedTuple):
    q: torch.Tensor  # [B, Hq, D]
    k_pages: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_pages: torch.Tensor
    kv_indptr: torch.Tensor  # [B+1] int32
    kv_indices: torch.Tensor  # [nnz] int32
    kv_last_page_len: torch.Tensor  # [B] int32
    sm_scale: float
    sinks: Optional[torch.Tensor]  # [Hq] float32 or None


def make_paged_problem(
    pages_per_request: Sequence[int],
    last_page_lens: Sequence[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_pages: Optional[int] = None,
    with_sinks: bool = False,
    seed: int = 0,
    kv_scale: float = 1.0,
) -> PagedProblem:
    """Random q/K/V and a random ascending page selection per request."""
    if len(pages_per_request) != len(last_page_lens):
        raise ValueError("one last-page length per request")
    gen = torch.Generator().manual_seed(seed)
    batch = len(pages_per_request)
    num_pages = num_pages or max(8, 2 * max(pages_per_request, default=1))
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pages = (torch.randn(shape, generator=gen) * kv_scale).to(dtype)
    v_pages = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(dtype)
    indices = []
    indptr = [0]
    for n in pages_per_request:
        if n > num_pages:
            raise ValueError(f"{n} pages requested from a pool of {num_pages}")
        indices += sorted(torch.randperm(num_pages, generator=gen)[:n].tolist())
        indptr.append(len(indices))
    sinks = torch.randn(num_q_heads, generator=gen) * 2.0 if with_sinks else None
    dev = torch.device(device)
    return PagedProblem(
        q.to(dev),
        k_pages.to(dev),
        v_pages.to(dev),
        torch.tensor(indptr, dtype=torch.int32, device=dev),
        torch.tensor(indices, dtype=torch.int32, device=dev),
        torch.tensor(list(last_page_lens), dtype=torch.int32, device=dev),
        head_dim**-0.5,
        None if sinks is None else sinks.to(dev),
    )


def dense_attention_float64(problem: PagedProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token float64 attention: an oracle independent of the reference's gathers."""
    q, k_pages, v_pages = (t.double().cpu() for t in problem[:3])
    indptr = problem.kv_indptr.tolist()
    indices = problem.kv_indices.tolist()
    last = problem.kv_last_page_len.tolist()
    batch, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    group = hq // hkv
    out = torch.zeros(batch, hq, d, dtype=torch.float64)
    lse = torch.zeros(batch, hq, dtype=torch.float64)
    for b in range(batch):
        pages = indices[indptr[b] : indptr[b + 1]]
        tokens = [(p, t) for i, p in enumerate(pages) for t in range(page_size if i < len(pages) - 1 else last[b])]
        for h in range(hq):
            keys = torch.stack([k_pages[p, t, h // group] for p, t in tokens])
            vals = torch.stack([v_pages[p, t, h // group] for p, t in tokens])
            logits = keys @ q[b, h] * problem.sm_scale
            if problem.sinks is not None:
                logits = torch.cat([logits, problem.sinks[h : h + 1].double().cpu()])
            weights = torch.softmax(logits, 0)[: len(tokens)]
            out[b, h] = weights @ vals
            lse[b, h] = torch.logsumexp(logits, 0)
    return out, lse
