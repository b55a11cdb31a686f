"""Pure-torch sparse paged decode: the oracle every other path is tested against.

Written for clarity, not speed: one request at a time, fp32 math, explicit gathers.
See ``paged_layout`` for the data layout and the ``out``/``lse``/``sinks`` convention.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .paged_layout import check_decode_inputs, should_check_values


def gather_request_kv(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    last_page_len: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attended tokens of one request as ``[n_tokens, Hkv, D]`` K and V."""
    page_size = k_pages.shape[1]
    n_tokens = (page_ids.numel() - 1) * page_size + last_page_len
    ids = page_ids.to(device=k_pages.device, dtype=torch.long)
    k = k_pages.index_select(0, ids).flatten(0, 1)[:n_tokens]
    v = v_pages.index_select(0, ids).flatten(0, 1)[:n_tokens]
    return k, v


def sparse_decode_torch(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float,
    sinks: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [B, Hq, D]`` over each request's selected pages.

    Returns ``(out [B, Hq, D] in q.dtype, lse [B, Hq] float32, natural log)``.
    Raises ValueError for a request with zero pages.
    """
    check_decode_inputs(
        q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, sinks, out,
        check_values=should_check_values(q.device, True),
    )
    batch, hq, d = q.shape
    hkv = k_pages.shape[2]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    indptr = kv_indptr.tolist()
    last_lens = kv_last_page_len.tolist()
    for b in range(batch):
        page_ids = kv_indices[indptr[b] : indptr[b + 1]]
        k, v = gather_request_kv(k_pages, v_pages, page_ids, int(last_lens[b]))
        # [Hkv, G, D] x [n, Hkv, D] -> [Hkv, G, n]: query head h reads KV head h // G.
        qb = q[b].float().view(hkv, group, d)
        logits = torch.einsum("kgd,nkd->kgn", qb, k.float()) * sm_scale
        logits = logits.reshape(hq, -1)
        if sinks is not None:
            logits = torch.cat([logits, sinks.float().view(hq, 1)], dim=1)
        row_lse = torch.logsumexp(logits, dim=1)
        probs = torch.exp(logits - row_lse[:, None])
        if sinks is not None:
            probs = probs[:, :-1]  # the sink takes probability mass but has no value
        probs = probs.view(hkv, group, -1)
        ob = torch.einsum("kgn,nkd->kgd", probs, v.float()).reshape(hq, d)
        out[b] = ob.to(out.dtype)
        lse[b] = row_lse
    return out, lse
