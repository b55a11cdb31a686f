"""The entry points that choose a kernel path per device: sparse paged decode, chunk scoring.

``auto`` prefers FlashInfer on CUDA (fp16/bf16, when importable), then the Triton
split-K kernel on CUDA, and the torch reference on CPU. The Triton path also runs on
CPU when asked for explicitly, under the Triton interpreter (tests).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .chunk_scoring import ChunkScores, score_chunks_torch
from .chunk_scoring_triton import score_chunks_triton
from .flashinfer_decode import FLASHINFER_DTYPES, flashinfer_available, sparse_decode_flashinfer
from .reference import sparse_decode_torch
from .triton_decode import SplitWorkspace, sparse_decode_triton

BACKENDS = ("auto", "torch", "triton", "flashinfer")


def resolve_backend(backend: str, device: torch.device, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> str:
    """The concrete path ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse decode backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    if q_dtype in FLASHINFER_DTYPES and kv_dtype in FLASHINFER_DTYPES and flashinfer_available():
        return "flashinfer"
    return "triton"


def sparse_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    sm_scale: float,
    sinks: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    lse: Optional[torch.Tensor] = None,
    workspace: Optional[SplitWorkspace] = None,
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [B, Hq, D]`` over each request's selected chunk pages.

    ``k_pages``/``v_pages`` are ``[num_pages, chunk_size, Hkv, D]`` (see
    ``paged_layout.as_pages``). Returns ``(out [B, Hq, D] in q.dtype, lse [B, Hq]
    float32)``, lse in natural log and including the sink when ``sinks`` is given.
    ``workspace`` is used by the Triton path only. Raises ValueError for a request
    with zero pages (checked on the host: always for CPU tensors, on CUDA when
    ``validate=True``).
    """
    path = resolve_backend(backend, q.device, q.dtype, k_pages.dtype)
    args = (q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, sm_scale)
    if path == "torch":
        return sparse_decode_torch(*args, sinks=sinks, out=out, lse=lse)
    if path == "triton":
        return sparse_decode_triton(*args, sinks=sinks, out=out, lse=lse, workspace=workspace, validate=validate)
    return sparse_decode_flashinfer(*args, sinks=sinks, out=out, lse=lse, validate=validate)


def score_chunks(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    chunk_indptr: torch.Tensor,
    threshold: float = 0.5,
    chunks_per_page: int = 64,
    backend: str = "auto",
) -> ChunkScores:
    """Score all chunks of a batch; ``auto`` runs Triton on CUDA and torch on CPU."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown chunk scoring backend {backend!r}")
    if backend == "torch" or (backend == "auto" and q.device.type != "cuda"):
        return score_chunks_torch(q, w, keys, chunk_indptr, threshold, chunks_per_page)
    return score_chunks_triton(q, w, keys, chunk_indptr, threshold, chunks_per_page)
