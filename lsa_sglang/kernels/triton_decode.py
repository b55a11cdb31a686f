"""Triton split-K (flash-decoding) attention over the selected chunk pages.

Decode is bound by KV reads, and a sparse budget leaves few tokens per request, so
one program per (request, KV head) would leave most SMs idle. Stage 1 splits every
request's selected tokens into ``num_splits`` equal ranges and runs one program per
(request, KV head [x head tile], split); the GQA heads sharing a KV head are packed
as the rows of one ``tl.dot`` so each K/V tile is read once for the whole group.
Stage 2 merges the splits of one (request, query head) by their log-sum-exp and adds
the optional sink logit. ``num_splits`` is fixed by the workspace (chosen from the
maximum budget), so launches have a fixed grid and can be captured in a CUDA graph;
splits beyond a short request's tokens are empty and skipped by both stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_env import require_triton_on, upcast_in_kernel
from .paged_layout import check_decode_inputs, should_check_values

MAX_BLOCK_H = 64


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    kv_indptr,
    kv_indices,
    kv_last_page_len,
    MidO,
    MidLse,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    GROUP: tl.constexpr,
    HEAD_TILES: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_TILES
    head_tile = tl.program_id(1) % HEAD_TILES
    split = tl.program_id(2)

    offs_g = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    page_start = tl.load(kv_indptr + b)
    num_pages = tl.load(kv_indptr + b + 1) - page_start
    num_tokens = (num_pages - 1) * PAGE_SIZE + tl.load(kv_last_page_len + b)
    per_split = ((num_tokens + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, num_tokens)

    if end > start:
        b64 = b.to(tl.int64)
        q = tl.load(
            Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None] & mask_d[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        else:
            q = q.to(K.dtype.element_ty)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_H, BLOCK_D], 0.0, dtype=tl.float32)
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        for t0 in range(start, end, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            mask_t = offs_t < end
            page = tl.load(kv_indices + page_start + offs_t // PAGE_SIZE, mask=mask_t, other=0).to(tl.int64)
            slot = offs_t % PAGE_SIZE
            k = tl.load(
                k_base + page[None, :] * stride_kp + slot[None, :] * stride_kt + offs_d[:, None],
                mask=mask_t[None, :] & mask_d[:, None],
                other=0.0,
            )
            v = tl.load(
                v_base + page[:, None] * stride_vp + slot[:, None] * stride_vt + offs_d[None, :],
                mask=mask_t[:, None] & mask_d[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
            qk = tl.where(mask_t[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        mid = MidO + b64 * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
        tl.store(mid, acc / l_i[:, None], mask=mask_h[:, None] & mask_d[None, :])
        tl.store(MidLse + b64 * stride_mlb + heads * stride_mlh + split, m_i + tl.log(l_i), mask=mask_h)


@triton.jit
def _merge_kernel(
    MidO,
    MidLse,
    kv_indptr,
    kv_last_page_len,
    Sinks,
    Out,
    Lse,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    stride_lb,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    b64 = b.to(tl.int64)
    # Recompute which splits stage 1 filled: the mid buffers of empty splits are never read.
    num_pages = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    num_tokens = (num_pages - 1) * PAGE_SIZE + tl.load(kv_last_page_len + b)
    per_split = ((num_tokens + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    offs_s = tl.arange(0, SPLITS_P2)
    mask_s = (offs_s < NUM_SPLITS) & (offs_s * per_split < num_tokens)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    lse_s = tl.load(MidLse + b64 * stride_mlb + h * stride_mlh + offs_s, mask=mask_s, other=float("-inf"))
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
    else:
        sink = float("-inf")
    m = tl.maximum(tl.max(lse_s, 0), sink)
    w = tl.exp(lse_s - m)
    o_s = tl.load(
        MidO + b64 * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    denom = tl.sum(w, 0) + tl.exp(sink - m)
    o = tl.sum(w[:, None] * o_s, 0) / denom
    tl.store(Out + b64 * stride_ob + h * stride_oh + offs_d, o.to(Out.dtype.element_ty), mask=mask_d)
    tl.store(Lse + b64 * stride_lb + h, m + tl.log(denom))


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_budget_tokens: int,
    num_sms: int = 132,
    min_tokens_per_split: int = 256,
    max_splits: int = 32,
) -> int:
    """Splits per request so that about two waves of programs cover the GPU.

    Each split should still read at least ``min_tokens_per_split`` tokens, or the
    merge pass costs more than the parallelism buys.
    """
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(2 * num_sms, programs)
    cap = max(1, triton.cdiv(max(1, max_budget_tokens), min_tokens_per_split))
    return int(max(1, min(want, cap, max_splits)))


@dataclass
class SplitWorkspace:
    """Preallocated per-split partial results, reused every step (CUDA-graph safe).

    ``mid_out`` ``[max_batch, Hq, num_splits, D]`` fp32 holds each split's normalised
    output, ``mid_lse`` ``[max_batch, Hq, num_splits]`` fp32 its log-sum-exp.
    """

    mid_out: torch.Tensor
    mid_lse: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_batch: int,
        num_q_heads: int,
        head_dim: int,
        num_splits: int,
        device: torch.device | str,
    ) -> "SplitWorkspace":
        mid_out = torch.empty(max_batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        mid_lse = torch.empty(max_batch, num_q_heads, num_splits, dtype=torch.float32, device=device)
        return cls(mid_out, mid_lse)

    @classmethod
    def for_budget(
        cls,
        max_batch: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_budget_tokens: int,
        device: torch.device | str,
    ) -> "SplitWorkspace":
        """Size the split count from the largest budget the caller will ever use."""
        device = torch.device(device)
        num_sms = 132
        if device.type == "cuda":
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = choose_num_splits(max_batch, num_kv_heads, max_budget_tokens, num_sms)
        return cls.allocate(max_batch, num_q_heads, head_dim, splits, device)

    @property
    def num_splits(self) -> int:
        return self.mid_out.shape[2]

    def fits(self, batch: int, num_q_heads: int, head_dim: int) -> bool:
        return (
            self.mid_out.shape[0] >= batch
            and self.mid_out.shape[1] == num_q_heads
            and self.mid_out.shape[3] == head_dim
        )


@dataclass(frozen=True)
class _LaunchShape:
    block_h: int
    head_tiles: int
    block_d: int
    block_n: int
    num_warps: int
    num_stages: int


def _launch_shape(group: int, head_dim: int, device: torch.device) -> _LaunchShape:
    # tl.dot needs every operand dimension >= 16; small groups are padded to 16 rows.
    block_h = max(16, triton.next_power_of_2(min(group, MAX_BLOCK_H)))
    head_tiles = triton.cdiv(group, block_h)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type == "cpu":
        # The interpreter pays per tile, not per element: bigger tiles run faster.
        return _LaunchShape(block_h, head_tiles, block_d, 64, 1, 1)
    block_n = 64 if block_d <= 128 else 32
    return _LaunchShape(block_h, head_tiles, block_d, block_n, 4, 2)


def sparse_decode_triton(
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
    workspace: Optional[SplitWorkspace] = None,
    num_splits: Optional[int] = None,
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split-K paged decode; same contract as ``sparse_decode_torch``.

    For CUDA-graph capture pass ``out``, ``lse`` and a ``workspace`` allocated once:
    then the call allocates nothing and never reads device memory on the host.
    ``validate`` (default: only for CPU tensors) checks the index values on the host.
    """
    check_decode_inputs(
        q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, sinks, out,
        check_values=should_check_values(q.device, validate),
    )
    require_triton_on(q.device)
    if q.stride(-1) != 1 or k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError("the head_dim axis of q and of the KV pages must be contiguous")
    batch, hq, d = q.shape
    _, page_size, hkv, _ = k_pages.shape
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    elif out.stride(-1) != 1:
        raise ValueError("out's head_dim axis must be contiguous")
    if lse is None:
        lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    elif lse.shape != (batch, hq) or lse.dtype != torch.float32 or lse.stride(1) != 1:
        raise ValueError("lse must be a [B, Hq] float32 tensor with contiguous heads")
    if batch == 0:
        return out, lse
    if workspace is None:
        # nnz pages bound every request's budget without reading the index tensors.
        splits = num_splits or choose_num_splits(batch, hkv, kv_indices.numel() * page_size)
        workspace = SplitWorkspace.allocate(batch, hq, d, splits, q.device)
    elif num_splits is not None and num_splits != workspace.num_splits:
        raise ValueError("num_splits is fixed by the workspace")
    if not workspace.fits(batch, hq, d):
        raise ValueError("workspace is too small for this batch or has other head counts")
    splits = workspace.num_splits
    shape = _launch_shape(group, d, q.device)
    mid_out, mid_lse = workspace.mid_out, workspace.mid_lse
    upcast = upcast_in_kernel(q.device, k_pages.dtype) or upcast_in_kernel(q.device, q.dtype)
    # fp32 operands: exact products (no TF32); fp16/bf16 operands: Triton's default.
    precision = "ieee" if (k_pages.dtype == torch.float32 or upcast) else None

    _split_kernel[(batch, hkv * shape.head_tiles, splits)](
        q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len,
        mid_out, mid_lse, float(sm_scale),
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        mid_out.stride(0), mid_out.stride(1), mid_out.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_TILES=shape.head_tiles, PAGE_SIZE=page_size, NUM_SPLITS=splits,
        HEAD_DIM=d, BLOCK_D=shape.block_d, BLOCK_H=shape.block_h, BLOCK_N=shape.block_n,
        UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=shape.num_warps, num_stages=shape.num_stages,
    )
    _merge_kernel[(batch, hq)](
        mid_out, mid_lse, kv_indptr, kv_last_page_len,
        sinks if sinks is not None else mid_lse, out, lse,
        mid_out.stride(0), mid_out.stride(1), mid_out.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        PAGE_SIZE=page_size, NUM_SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
        HEAD_DIM=d, BLOCK_D=shape.block_d, BLOCK_N=shape.block_n, HAS_SINKS=sinks is not None,
        num_warps=4 if q.device.type == "cuda" else 1,
    )
    return out, lse
