"""Sparse-decode planning with tensor ops: CSR page lists from chunk residency.

What one decode step reads, per request ``b`` (see ``memory.manager.read_positions``):
every *mirrored* chunk ``c < mirrored[b]`` that is resident, then every chunk from
``mirrored[b]`` up to the last, partial one, ``ceil(seq_lens[b] / chunk_size)``: the
not-yet-mirrored tail, always on the device. A request served densely is
``mirrored = 0`` (it reads its whole row). Chunk ``c`` of a request starts at row
position ``c * chunk_size``; its page is ``req_to_token[row, c * chunk_size] // chunk_size``
(the server runs with ``page_size == chunk_size``).

Inputs, all tensors:

* ``req_to_token`` ``[R, max_len]`` int token slots, ``req_pool_indices`` ``[B]``;
* ``seq_lens`` ``[B]``, ``mirrored`` ``[B]`` ints;
* ``resident`` ``[B, C]`` bool over chunk ids, ``C >= ceil(max(seq_lens) / chunk_size)``;
  entries at or after ``mirrored[b]`` are ignored (the tail is read regardless).

Outputs, FlashInfer-style CSR (see ``paged_layout``): ``kv_indptr [B+1]``,
``kv_indices [nnz]`` (pages in chunk order) and ``kv_last_page_len [B]``, all int32 on
``req_to_token``'s device, equal to what a per-request loop over the read positions
gives (``plan_sparse_decode_loop``, kept as the reference). A request reading nothing
gets zero pages and ``kv_last_page_len = chunk_size`` (the loop's arithmetic), which the
decode kernels reject.

Two halves, so a server pays no device sync: the *counts* half (read mask, page counts,
last-page lengths) runs wherever ``resident``/``mirrored``/``seq_lens`` live, normally
on the host where the chunk tables are; the *pages* half gathers page ids from
``req_to_token`` and scatters them into the CSR on its device, with no host read.
``DecodePlan`` keeps the outputs in buffers allocated once (CUDA-graph safe) and tells
when a page count changed, i.e. when a FlashInfer plan must be redone.
"""

from __future__ import annotations

from itertools import chain
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch


class SparsePlan(NamedTuple):
    kv_indptr: torch.Tensor  # [B+1] int32
    kv_indices: torch.Tensor  # [nnz] int32
    kv_last_page_len: torch.Tensor  # [B] int32


def resident_mask_from_sets(resident_sets: Sequence[Iterable[int]], num_chunks: int) -> torch.Tensor:
    """``[B, num_chunks]`` bool host mask from per-request collections of chunk ids.

    One flat index write, no per-request array op (numpy builds the index: its calls cost
    about a microsecond where a small torch op costs several). Ids outside
    ``0..num_chunks-1`` are an error.
    """
    batch = len(resident_sets)
    lens = [len(s) for s in resident_sets]  # type: ignore[arg-type]
    total = sum(lens)
    try:
        import numpy as np
    except ImportError:  # a bare torch install: the same with torch ops
        np = None
    if np is not None:
        cols = np.fromiter(chain.from_iterable(resident_sets), dtype=np.int64, count=total)
        mask = np.zeros(batch * num_chunks, dtype=np.bool_)
    else:
        cols = torch.tensor(list(chain.from_iterable(resident_sets)), dtype=torch.int64)
        mask = torch.zeros(batch * num_chunks, dtype=torch.bool)
    if total:
        if int(cols.max()) >= num_chunks or int(cols.min()) < 0:
            raise ValueError(f"resident chunk ids must be in 0..{num_chunks - 1}")
        if np is not None:
            mask[cols + np.repeat(np.arange(0, batch * num_chunks, num_chunks, dtype=np.int64), lens)] = True
        else:
            mask[cols + torch.repeat_interleave(torch.arange(batch) * num_chunks, torch.tensor(lens))] = True
    return (torch.from_numpy(mask) if np is not None else mask).view(batch, num_chunks)


def plan_counts(
    resident: torch.Tensor,
    mirrored: torch.Tensor,
    seq_lens: torch.Tensor,
    chunk_size: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(read [B, C] bool, counts [B] int64, kv_last_page_len [B] int32)`` on ``resident``'s device."""
    if resident.dim() != 2 or resident.dtype != torch.bool:
        raise ValueError(f"resident must be a [B, C] bool mask, got {tuple(resident.shape)} {resident.dtype}")
    batch, num_chunks = resident.shape
    dev = resident.device
    mirrored = mirrored.to(device=dev, dtype=torch.int64)
    seq = seq_lens.to(device=dev, dtype=torch.int64)
    if dev.type == "cpu" and batch and int(seq.max()) > num_chunks * chunk_size:
        raise ValueError(f"the mask has {num_chunks} chunks, too few for {int(seq.max())} tokens")
    tail = (seq - mirrored * chunk_size).clamp_(min=0)  # unmirrored tokens, all read
    tail_chunks = torch.div(tail + (chunk_size - 1), chunk_size, rounding_mode="floor")
    c = torch.arange(num_chunks, device=dev)
    read = torch.where(c < mirrored[:, None], resident, c < (mirrored + tail_chunks)[:, None])
    counts = read.sum(1)
    # tokens - (counts - 1) * chunk_size, with tokens = resident * chunk_size + tail
    last = (tail - (tail_chunks - 1) * chunk_size).to(torch.int32)
    return read, counts, last


def chunk_pages(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    num_chunks: int,
    chunk_size: int,
) -> torch.Tensor:
    """``[B, num_chunks]`` page id of every chunk start."""
    starts = req_to_token[:, ::chunk_size]  # a view: chunk c starts at column c * chunk_size
    if num_chunks > starts.shape[1]:
        raise ValueError(f"req_to_token rows hold {starts.shape[1]} chunks, not {num_chunks}")
    rows = req_pool_indices.to(device=req_to_token.device, dtype=torch.int64)
    return torch.div(starts[:, :num_chunks].index_select(0, rows), chunk_size, rounding_mode="floor").to(torch.int32)


def scatter_pages(
    pages: torch.Tensor,
    read: torch.Tensor,
    kv_indptr: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Write the read pages of each row, in chunk order, to ``out[kv_indptr[b]:]``.

    ``out`` needs one spare entry past the last page: unread chunks are written there.
    Device ops only (no host read), so it can run ahead of the GPU or inside a graph.
    """
    dest = torch.cumsum(read, 1).add_(kv_indptr[:-1].to(torch.int64).sub(1)[:, None])
    dest.masked_fill_(~read, out.numel() - 1)
    out.scatter_(0, dest.flatten(), pages.flatten().to(out.dtype))


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr


def plan_sparse_decode(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    resident: torch.Tensor,
    mirrored: torch.Tensor,
    chunk_size: int,
) -> SparsePlan:
    """The CSR page lists of one decode step, in freshly allocated tensors.

    Reads ``nnz`` on the host: free when ``resident`` is a host tensor, a sync otherwise.
    """
    read, counts, last = plan_counts(resident, mirrored, seq_lens, chunk_size)
    dev = req_to_token.device
    indptr = _indptr(counts)
    nnz = int(indptr[-1])
    indices = torch.empty(nnz + 1, dtype=torch.int32, device=dev)
    pages = chunk_pages(req_to_token, req_pool_indices, read.shape[1], chunk_size)
    indptr_dev = indptr.to(dev)
    scatter_pages(pages, read.to(dev), indptr_dev, indices)
    return SparsePlan(indptr_dev, indices[:nnz], last.to(dev))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class DecodePlan:
    """CSR page lists in device buffers allocated once, rewritten in place every step.

    ``kv_indptr [max_batch+1]``, ``kv_indices [max_batch * max_pages_per_request]`` and
    ``kv_last_page_len [max_batch]`` keep their storage for the object's life, so a
    CUDA graph captured around a decode that reads them replays with each update.
    ``update`` returns ``needs_replan``: True when the batch size or any request's page
    count differs from the previous update (a window boundary swapped a set of another
    size, or the tail grew a page). FlashInfer must then ``plan`` again; otherwise only
    page ids and last-page lengths changed and an in-place ``update`` of its buffers is
    enough (the Triton kernel needs no plan at all).

    The comparison is on the host: free when ``resident``/``mirrored``/``seq_lens`` are
    host tensors (the server's case), one device sync when they are not.
    """

    def __init__(self, max_batch: int, max_pages_per_request: int, chunk_size: int, device: torch.device | str) -> None:
        if max_batch < 1 or max_pages_per_request < 1 or chunk_size < 1:
            raise ValueError("max_batch, max_pages_per_request and chunk_size must be >= 1")
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.max_batch = max_batch
        self.max_pages_per_request = max_pages_per_request
        self.capacity = max_batch * max_pages_per_request
        self.kv_indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=self.device)
        self._indices = torch.zeros(self.capacity + 1, dtype=torch.int32, device=self.device)  # +1: scatter trash
        self.kv_indices = self._indices[: self.capacity]
        self.kv_last_page_len = torch.full((max_batch,), chunk_size, dtype=torch.int32, device=self.device)
        self.batch = 0
        self.nnz = 0
        self.counts: Optional[List[int]] = None  # pages per request at the last update
        self.needs_replan = True
        self.updates = 0
        self.replans = 0

    def update(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        resident: torch.Tensor,
        mirrored: torch.Tensor,
    ) -> bool:
        """Rewrite the buffers for this step; returns (and stores) ``needs_replan``."""
        batch = resident.shape[0]
        if not _same_device(req_to_token.device, self.device):
            raise ValueError(f"req_to_token is on {req_to_token.device}, this plan's buffers on {self.device}")
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds this plan's max_batch {self.max_batch}")
        read, counts, last = plan_counts(resident, mirrored, seq_lens, self.chunk_size)
        host_counts = counts.tolist()  # a device sync unless the counts half ran on the host
        if batch and max(host_counts) > self.max_pages_per_request:
            raise ValueError(
                f"a request reads {max(host_counts)} pages, more than max_pages_per_request "
                f"{self.max_pages_per_request}"
            )
        changed = host_counts != self.counts
        indptr = _indptr(counts)
        self.kv_indptr[: batch + 1].copy_(indptr)
        self.kv_last_page_len[:batch].copy_(last)
        pages = chunk_pages(req_to_token, req_pool_indices, read.shape[1], self.chunk_size)
        scatter_pages(pages, read.to(self.device), self.kv_indptr[: batch + 1], self._indices)
        self.batch = batch
        self.nnz = sum(host_counts)
        self.counts = host_counts
        self.needs_replan = changed
        self.updates += 1
        self.replans += int(changed)
        return changed

    def csr(self, whole_buffer: bool = False) -> SparsePlan:
        """Views of the current plan: ``kv_indices`` cut to ``nnz`` unless ``whole_buffer``
        (a graph captured once needs the fixed-size buffer)."""
        indices = self.kv_indices if whole_buffer else self.kv_indices[: self.nnz]
        return SparsePlan(self.kv_indptr[: self.batch + 1], indices, self.kv_last_page_len[: self.batch])


def read_positions_loop(resident: Iterable[int], mirrored: int, seq_len: int, chunk_size: int) -> torch.Tensor:
    """Token positions one request reads: resident mirrored chunks, then the tail (host)."""
    parts = [torch.arange(c * chunk_size, (c + 1) * chunk_size) for c in sorted(resident)]
    parts.append(torch.arange(mirrored * chunk_size, seq_len))
    return torch.cat(parts)


def plan_sparse_decode_loop(
    req_to_token: torch.Tensor,
    req_pool_indices: Sequence[int],
    seq_lens: Sequence[int],
    resident_sets: Sequence[Optional[Iterable[int]]],
    mirrored: Sequence[int],
    chunk_size: int,
) -> SparsePlan:
    """The per-request loop the attention backend used to run every step (the reference).

    ``resident_sets[b] is None`` means a dense request (whole row). Same outputs as
    ``plan_sparse_decode``.
    """
    dev = req_to_token.device
    reads = []
    for res, idx, seq_len, n_mirrored in zip(resident_sets, req_pool_indices, seq_lens, mirrored):
        if res is None:
            reads.append(req_to_token[idx, :seq_len])
        else:
            positions = read_positions_loop(res, n_mirrored, seq_len, chunk_size).to(dev)
            reads.append(req_to_token[idx].index_select(0, positions))
    pages = [slots[::chunk_size] // chunk_size for slots in reads]
    counts = torch.tensor([len(p) for p in pages])
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    last = torch.tensor([len(s) - (len(p) - 1) * chunk_size for s, p in zip(reads, pages)], dtype=torch.int32)
    indices = torch.cat(pages).to(torch.int32) if pages else torch.zeros(0, dtype=torch.int32)
    return SparsePlan(indptr.to(dev), indices.to(dev), last.to(dev))
