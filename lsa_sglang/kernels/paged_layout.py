"""The paged KV layout every sparse decode path shares, and its input checks.

SGLang keeps per layer a token-slot buffer ``[num_token_slots, Hkv, D]``. The LSA
server runs with ``page_size == chunk_size``, so one chunk cell is one page and the
buffer is viewed, for free, as ``[num_pages, chunk_size, Hkv, D]``.

Per request the kernels get FlashInfer-style CSR over pages:

* ``kv_indptr`` ``[B+1]`` int32: request ``b`` owns ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``;
* ``kv_indices`` ``[nnz]`` int32: page ids of the selected chunk cells in ascending
  position order, the recency tail last;
* ``kv_last_page_len`` ``[B]`` int32 in ``1..chunk_size``: every page is full except
  each request's last one.

Output convention (all paths): ``out[b, h]`` is softmax attention of query head ``h``
over the selected tokens, with query head ``h`` reading KV head ``h // (Hq // Hkv)``;
``lse[b, h]`` is the natural-log log-sum-exp of the scaled logits
``sm_scale * q . k`` over those tokens. With per-head ``sinks`` the sink logit joins
the softmax denominator (it has no value), and ``lse`` includes it:
``lse = log(exp(sinks[h]) + sum_j exp(s_j))``. So ``lse`` is always the log of the
full denominator that ``out`` was normalised by.
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_pages(buffer: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """View a ``[num_token_slots, Hkv, D]`` slot buffer as ``[num_pages, chunk_size, Hkv, D]``."""
    if buffer.dim() != 3:
        raise ValueError(f"expected a [slots, Hkv, D] buffer, got shape {tuple(buffer.shape)}")
    slots, hkv, d = buffer.shape
    if slots % chunk_size != 0:
        raise ValueError(f"{slots} token slots are not a whole number of {chunk_size}-token pages")
    return buffer.view(slots // chunk_size, chunk_size, hkv, d)


def tokens_per_request(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """Number of attended tokens per request (device tensor, no host sync)."""
    pages = (kv_indptr[1:] - kv_indptr[:-1]).to(torch.int64)
    return (pages - 1) * page_size + kv_last_page_len.to(torch.int64)


def check_decode_inputs(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sinks: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    check_values: bool = True,
) -> None:
    """Raise ValueError on inputs no decode path can serve.

    Shape/dtype/device checks cost nothing. ``check_values`` also reads the index
    tensors on the host (a device sync on CUDA, illegal under graph capture), to
    reject requests with zero pages and last-page lengths outside ``1..page_size``.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_pages.dim() != 4 or v_pages.dim() != 4:
        raise ValueError("k_pages and v_pages must be [num_pages, page_size, Hkv, D]")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} differ")
    batch, hq, d = q.shape
    _, page_size, hkv, dk = k_pages.shape
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and of the KV pages ({dk}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if q.dtype not in SUPPORTED_DTYPES or k_pages.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtypes q={q.dtype} kv={k_pages.dtype}")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError("k_pages and v_pages must share one dtype")
    for name, t in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices), ("kv_last_page_len", kv_last_page_len)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D")
    if kv_indptr.numel() != batch + 1:
        raise ValueError(f"kv_indptr has {kv_indptr.numel()} entries for a batch of {batch}")
    if kv_last_page_len.numel() != batch:
        raise ValueError(f"kv_last_page_len has {kv_last_page_len.numel()} entries for a batch of {batch}")
    devices = {t.device for t in (q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if sinks is not None:
        if sinks.shape != (hq,):
            raise ValueError(f"sinks must be [Hq={hq}], got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError("sinks must be on q's device")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError("out must match q in shape, dtype and device")
    if check_values and batch > 0:
        _check_index_values(kv_indptr, kv_indices, kv_last_page_len, page_size, k_pages.shape[0])


def _check_index_values(
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    page_size: int,
    num_pages: int,
) -> None:
    indptr = kv_indptr.cpu()
    counts = indptr[1:] - indptr[:-1]
    if int(indptr[0]) != 0:
        raise ValueError("kv_indptr must start at 0")
    empty = (counts <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"requests {empty} have no KV pages; every decode request needs at least one")
    if int(indptr[-1]) > kv_indices.numel():
        raise ValueError(f"kv_indptr ends at {int(indptr[-1])} but kv_indices has {kv_indices.numel()} entries")
    last = kv_last_page_len.cpu()
    if bool(((last < 1) | (last > page_size)).any()):
        raise ValueError(f"kv_last_page_len must be in 1..{page_size}, got {last.tolist()}")
    used = kv_indices[: int(indptr[-1])].cpu()
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
        raise ValueError(f"kv_indices must be page ids in 0..{num_pages - 1}")


def should_check_values(device: torch.device, validate: Optional[bool]) -> bool:
    """Default: check index values when it costs no device sync (CPU tensors) only.

    On CUDA the caller opts in with ``validate=True``; checks are always skipped
    during CUDA-graph capture, where a host read is illegal.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    if validate is None:
        return device.type != "cuda"
    return validate
