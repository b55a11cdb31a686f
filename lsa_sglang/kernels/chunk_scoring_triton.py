"""Triton chunk scorer: one fused pass from chunk keys to per-page selected counts.

At 1M tokens a request has tens of thousands of chunks and the indexer has ~128
heads; materialising the ``[chunks, H]`` logits in torch costs more memory traffic
than reading the keys. Here one program scores ``BLOCK_C`` chunks of one request:
each key tile is loaded once per key group and multiplied (``tl.dot``) by all query
heads of that group, the weighted ReLU sum stays in registers, then sigmoid, the
threshold and an atomic per-page count are applied before anything is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_env import require_triton_on, upcast_in_kernel
from .chunk_scoring import ChunkScores, check_scoring_inputs, page_indptr_host

SCORING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _score_kernel(
    Q,
    W,
    Keys,
    chunk_indptr,
    page_indptr,
    Scores,
    Selected,
    PageCounts,
    threshold,
    stride_qb,
    stride_qh,
    stride_wb,
    stride_wh,
    stride_kc,
    stride_kh,
    GROUP: tl.constexpr,
    NUM_KEY_GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNKS_PER_PAGE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    c_block = tl.program_id(1)
    first = tl.load(chunk_indptr + b)
    n_chunks = tl.load(chunk_indptr + b + 1) - first
    if c_block * BLOCK_C < n_chunks:
        local = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = local < n_chunks
        chunk = (first + local).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        b64 = b.to(tl.int64)
        logit = tl.full([BLOCK_C], 0.0, dtype=tl.float32)
        for g in range(NUM_KEY_GROUPS):
            k = tl.load(
                Keys + chunk[None, :] * stride_kc + g * stride_kh + offs_d[:, None],
                mask=mask_c[None, :] & mask_d[:, None],
                other=0.0,
            )  # [BLOCK_D, BLOCK_C]
            if UPCAST:
                k = k.to(tl.float32)
            for h0 in range(0, GROUP, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < GROUP
                heads = g * GROUP + offs_h
                q = tl.load(
                    Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :],
                    other=0.0,
                )
                if UPCAST:
                    q = q.to(tl.float32)
                else:
                    q = q.to(k.dtype)
                wh = tl.load(W + b64 * stride_wb + heads * stride_wh, mask=mask_h, other=0.0).to(tl.float32)
                dots = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_C]
                logit += tl.sum(wh[:, None] * tl.maximum(dots, 0.0), 0)
        score = 1.0 / (1.0 + tl.exp(-logit))
        hit = score > threshold
        tl.store(Scores + chunk, score, mask=mask_c)
        tl.store(Selected + chunk, hit.to(tl.uint8), mask=mask_c)
        page = tl.load(page_indptr + b) + local // CHUNKS_PER_PAGE
        tl.atomic_add(PageCounts + page, hit.to(tl.int32), mask=mask_c & hit)


def score_chunks_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    chunk_indptr: torch.Tensor,
    threshold: float = 0.5,
    chunks_per_page: int = 64,
) -> ChunkScores:
    """Fused Triton scorer; same results as ``score_chunks_torch``.

    Reads ``chunk_indptr`` on the host once to size the page outputs (the indexer
    runs once per window, outside CUDA graphs).
    """
    check_scoring_inputs(q, w, keys, chunk_indptr)
    require_triton_on(q.device)
    if q.dtype not in SCORING_DTYPES or keys.dtype not in SCORING_DTYPES:
        raise ValueError(f"unsupported dtypes q={q.dtype} keys={keys.dtype}")
    if q.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("the head_dim axis of q and keys must be contiguous")
    batch, heads, dh = q.shape
    hk = keys.shape[1]
    group = heads // hk
    page_indptr_h, indptr_h = page_indptr_host(chunk_indptr, chunks_per_page)
    total_chunks = int(indptr_h[-1])
    total_pages = int(page_indptr_h[-1])
    max_chunks = int((indptr_h[1:] - indptr_h[:-1]).max()) if batch else 0
    device = q.device
    page_indptr = page_indptr_h.to(device=device, dtype=torch.int32)
    scores = torch.empty(total_chunks, dtype=torch.float32, device=device)
    selected = torch.empty(total_chunks, dtype=torch.bool, device=device)
    page_counts = torch.zeros(total_pages, dtype=torch.int32, device=device)
    if total_chunks == 0:
        return ChunkScores(scores, selected, page_counts, page_indptr)

    block_c = 64
    block_h = max(16, triton.next_power_of_2(min(group, 64)))
    block_d = max(16, triton.next_power_of_2(dh))
    upcast = upcast_in_kernel(device, q.dtype) or upcast_in_kernel(device, keys.dtype)
    precision = "ieee" if (keys.dtype == torch.float32 or upcast) else None
    grid = (batch, triton.cdiv(max_chunks, block_c))
    _score_kernel[grid](
        q, w, keys, chunk_indptr, page_indptr, scores, selected.view(torch.uint8), page_counts,
        float(threshold),
        q.stride(0), q.stride(1), w.stride(0), w.stride(1), keys.stride(0), keys.stride(1),
        GROUP=group, NUM_KEY_GROUPS=hk, HEAD_DIM=dh, CHUNKS_PER_PAGE=chunks_per_page,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_D=block_d,
        UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=4 if device.type == "cuda" else 1,
    )
    return ChunkScores(scores, selected, page_counts, page_indptr)
