"""Chunk copies between the host mirror and the device KV pool, all layers at once.

Host mirror layout is page-first, ``[num_host_slots, num_layers, 2 (K, V), chunk_size,
Hkv, D]``, so one chunk of all layers is one contiguous block and a run of consecutive
host slots is one contiguous copy. The device pool is SGLang's, per layer
``[num_token_slots, Hkv, D]``, viewed as pages of ``chunk_size`` tokens.

On CUDA a window's misses move as: one async copy per run of consecutive host slots
(pinned memory -> a device staging tensor) on a side stream, then per layer one
``index_copy_`` of K and of V into the pool, and an event the decode stream waits on
before it reads those pages. Device -> host is the mirror image. In both directions
the side stream first waits for the work already queued on the caller's current
stream (the forward pass that wrote the KV, the decode steps that still read pages
being refilled), and overlaps with everything queued after the call. On CPU (or with ``backend="torch"``) plain indexing does the same, exactly.

Safety rules for callers: a device page may be written only when no attention read
of it is in flight, and the host slots (or device pages) copied into may be read only
after the returned event has completed (``event.synchronize()`` on the host, or
``torch.cuda.current_stream().wait_event(event)`` on the device).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .paged_layout import as_pages

Index = Union[Sequence[int], torch.Tensor]

_side_streams: Dict[torch.device, "torch.cuda.Stream"] = {}


def _as_list(index: Index) -> List[int]:
    if isinstance(index, torch.Tensor):
        return [int(i) for i in index.flatten().tolist()]
    return [int(i) for i in index]


def host_mirror_shape(num_host_slots: int, num_layers: int, chunk_size: int, num_kv_heads: int, head_dim: int) -> Tuple[int, ...]:
    """Shape of the page-first host mirror tensor."""
    return (num_host_slots, num_layers, 2, chunk_size, num_kv_heads, head_dim)


def _check_layout(host: torch.Tensor, k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], host_slots: List[int], device_pages: List[int]) -> int:
    """Validate shapes and indices; returns chunk_size."""
    if host.dim() != 6 or host.shape[2] != 2:
        raise ValueError(f"host mirror must be [slots, layers, 2, chunk, Hkv, D], got {tuple(host.shape)}")
    _, layers, _, chunk, hkv, d = host.shape
    if len(k_buffers) != layers or len(v_buffers) != layers:
        raise ValueError(f"host mirror has {layers} layers, got {len(k_buffers)} K and {len(v_buffers)} V buffers")
    for buf in list(k_buffers) + list(v_buffers):
        if buf.dim() != 3 or tuple(buf.shape[1:]) != (hkv, d) or buf.dtype != host.dtype:
            raise ValueError("device buffers must be [slots, Hkv, D] with the host mirror's heads, dim and dtype")
    if len(host_slots) != len(device_pages):
        raise ValueError(f"{len(host_slots)} host slots for {len(device_pages)} device pages")
    if host_slots and (min(host_slots) < 0 or max(host_slots) >= host.shape[0]):
        raise ValueError("host slot out of range")
    num_pages = k_buffers[0].shape[0] // chunk if layers else 0
    if device_pages and (min(device_pages) < 0 or max(device_pages) >= num_pages):
        raise ValueError("device page out of range")
    if len(set(device_pages)) != len(device_pages):
        raise ValueError("device pages must be distinct")
    return chunk


def contiguous_runs(host_slots: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``(host_start, list_start, length)`` for each run of consecutive host slots."""
    runs: List[Tuple[int, int, int]] = []
    for i, slot in enumerate(host_slots):
        if runs and slot == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, i, 1))
    return runs


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The per-device stream chunk copies run on unless the caller passes one."""
    stream = _side_streams.get(device)
    if stream is None:
        stream = torch.cuda.Stream(device=device)
        _side_streams[device] = stream
    return stream


def _copy_to_device_torch(host: torch.Tensor, host_slots: List[int], k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], device_pages: List[int], chunk: int) -> None:
    src = torch.tensor(host_slots, dtype=torch.long)
    dst = torch.tensor(device_pages, dtype=torch.long, device=k_buffers[0].device)
    block = host.index_select(0, src).to(k_buffers[0].device)
    for layer, (kb, vb) in enumerate(zip(k_buffers, v_buffers)):
        as_pages(kb, chunk).index_copy_(0, dst, block[:, layer, 0])
        as_pages(vb, chunk).index_copy_(0, dst, block[:, layer, 1])


def _copy_to_host_torch(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], device_pages: List[int], host: torch.Tensor, host_slots: List[int], chunk: int) -> None:
    src = torch.tensor(device_pages, dtype=torch.long, device=k_buffers[0].device)
    dst = torch.tensor(host_slots, dtype=torch.long)
    for layer, (kb, vb) in enumerate(zip(k_buffers, v_buffers)):
        host[dst, layer, 0] = as_pages(kb, chunk).index_select(0, src).to(host.device)
        host[dst, layer, 1] = as_pages(vb, chunk).index_select(0, src).to(host.device)


def _device_index(values: List[int], device: torch.device) -> torch.Tensor:
    # Pinned source: the async upload is safe even after this tensor goes out of
    # scope (PyTorch's pinned allocator holds the block until the copy completes).
    return torch.tensor(values, dtype=torch.long).pin_memory().to(device, non_blocking=True)


def _copy_to_device_cuda(host: torch.Tensor, host_slots: List[int], k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], device_pages: List[int], chunk: int, stream: "torch.cuda.Stream", after: Optional["torch.cuda.Event"] = None) -> "torch.cuda.Event":
    device = k_buffers[0].device
    event = torch.cuda.Event()
    # Pages being refilled were released by earlier decode steps whose reads may still
    # be queued on the decode stream: start after them, overlap with what follows. From
    # another thread the current stream is that thread's, so the caller passes `after`.
    if after is not None:
        stream.wait_event(after)
    else:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        if host_slots:
            # Allocated on the side stream and only used there: no record_stream needed.
            staging = torch.empty((len(host_slots),) + tuple(host.shape[1:]), dtype=host.dtype, device=device)
            for host_start, pos, length in contiguous_runs(host_slots):
                staging[pos : pos + length].copy_(host[host_start : host_start + length], non_blocking=True)
            dst = _device_index(device_pages, device)
            for layer, (kb, vb) in enumerate(zip(k_buffers, v_buffers)):
                as_pages(kb, chunk).index_copy_(0, dst, staging[:, layer, 0])
                as_pages(vb, chunk).index_copy_(0, dst, staging[:, layer, 1])
        event.record(stream)
    return event


def _copy_to_host_cuda(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], device_pages: List[int], host: torch.Tensor, host_slots: List[int], chunk: int, stream: "torch.cuda.Stream") -> "torch.cuda.Event":
    device = k_buffers[0].device
    event = torch.cuda.Event()
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        if host_slots:
            staging = torch.empty((len(host_slots),) + tuple(host.shape[1:]), dtype=host.dtype, device=device)
            src = _device_index(device_pages, device)
            for layer, (kb, vb) in enumerate(zip(k_buffers, v_buffers)):
                staging[:, layer, 0].copy_(as_pages(kb, chunk).index_select(0, src))
                staging[:, layer, 1].copy_(as_pages(vb, chunk).index_select(0, src))
            for host_start, pos, length in contiguous_runs(host_slots):
                host[host_start : host_start + length].copy_(staging[pos : pos + length], non_blocking=True)
        event.record(stream)
    return event


def copy_chunks_to_device(
    host: torch.Tensor,
    host_slots: Index,
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    device_pages: Index,
    stream: Optional["torch.cuda.Stream"] = None,
    backend: str = "auto",
    after: Optional["torch.cuda.Event"] = None,
) -> Optional["torch.cuda.Event"]:
    """Copy chunks ``host[host_slots[i]]`` (all layers, K and V) into device page ``device_pages[i]``.

    Returns ``None`` when the copy is complete on return (torch path), else a CUDA event
    recorded after the copy on ``stream`` (default: a per-device side stream). The copy
    starts after ``after`` (an event the decode thread recorded on its stream when it
    released the pages; needed when this runs on another thread), else after the work
    queued on the current stream.
    """
    slots, pages = _as_list(host_slots), _as_list(device_pages)
    chunk = _check_layout(host, k_buffers, v_buffers, slots, pages)
    if not k_buffers:
        return None
    if backend == "torch" or k_buffers[0].device.type != "cuda":
        if slots:
            _copy_to_device_torch(host, slots, k_buffers, v_buffers, pages, chunk)
        return None
    stream = stream or side_stream(k_buffers[0].device)
    return _copy_to_device_cuda(host, slots, k_buffers, v_buffers, pages, chunk, stream, after)


def copy_chunks_to_host(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    device_pages: Index,
    host: torch.Tensor,
    host_slots: Index,
    stream: Optional["torch.cuda.Stream"] = None,
    backend: str = "auto",
) -> Optional["torch.cuda.Event"]:
    """Copy device pages (all layers, K and V) into host mirror slots; the write-through path.

    Returns ``None`` when complete on return, else a CUDA event to wait on before the
    host slots are read or the device pages are released.
    """
    slots, pages = _as_list(host_slots), _as_list(device_pages)
    chunk = _check_layout(host, k_buffers, v_buffers, slots, pages)
    if not k_buffers:
        return None
    if len(set(slots)) != len(slots):
        raise ValueError("host slots must be distinct")
    if backend == "torch" or k_buffers[0].device.type != "cuda":
        if slots:
            _copy_to_host_torch(k_buffers, v_buffers, pages, host, slots, chunk)
        return None
    stream = stream or side_stream(k_buffers[0].device)
    return _copy_to_host_cuda(k_buffers, v_buffers, pages, host, slots, chunk, stream)
