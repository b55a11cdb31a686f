"""FlashInfer paged decode over the selected chunk pages (GPU only).

A sparse page subset is just a shorter page list for FlashInfer's
``BatchDecodeWithPagedKVCacheWrapper``: decode has no causal mask and RoPE is already
in K. The wrapper's plan (host side, outside CUDA graphs) depends on the page count
of every request; on the CUDA-core path (``use_tensor_cores=False``) it reads nothing
else. So with a fixed per-request page budget the plan made at a window boundary stays
valid, and ``update`` rewrites the page ids and last-page lengths in the wrapper's own
device buffers in place, which a captured CUDA graph then replays.

FlashInfer's log-sum-exp is base 2 and this kernel path ignores sinks, so ``run``
converts the lse to natural log and folds the sinks in with torch ops (see
``attention_state``), giving the same contract as ``sparse_decode_torch``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .attention_state import add_sinks_, log2_to_ln_
from .paged_layout import check_decode_inputs, should_check_values

FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024

_workspaces: Dict[torch.device, torch.Tensor] = {}


def flashinfer_available() -> bool:
    """True when ``flashinfer`` imports (it imports on CPU too; its ops need CUDA)."""
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def _import_flashinfer() -> Any:
    try:
        import flashinfer
    except Exception as exc:  # ImportError, or a broken CUDA install underneath
        raise ImportError(
            "the flashinfer decode path needs flashinfer-python (pip install 'lsa-sglang[gpu]')"
        ) from exc
    return flashinfer


def _shared_workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    """One float workspace per device, shared by all wrappers that run on one stream."""
    ws = _workspaces.get(device)
    if ws is None or ws.numel() < nbytes:
        ws = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        _workspaces[device] = ws
    return ws


class FlashInferSparseDecoder:
    """Plan once per window, ``update`` page ids in place, ``run`` every step and layer.

    With ``use_cuda_graph=True`` the batch size is fixed to ``max_batch`` (one decoder
    per captured batch size, as SGLang does) and all metadata lives in buffers owned
    here, so a graph captured around ``run`` sees every later ``update``.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        max_batch: int,
        max_pages: int,
        device: torch.device | str,
        q_dtype: torch.dtype = torch.bfloat16,
        kv_dtype: Optional[torch.dtype] = None,
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        flashinfer = _import_flashinfer()
        self.device = torch.device(device)
        kv_dtype = kv_dtype or q_dtype
        if q_dtype not in FLASHINFER_DTYPES or kv_dtype not in FLASHINFER_DTYPES:
            raise ValueError(f"FlashInfer decode takes fp16/bf16, got q={q_dtype} kv={kv_dtype}")
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self.q_dtype = q_dtype
        self.kv_dtype = kv_dtype
        self.use_cuda_graph = use_cuda_graph
        self.use_tensor_cores = use_tensor_cores
        self.max_batch = max_batch
        self.indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=self.device)
        self.indices = torch.zeros(max(1, max_pages), dtype=torch.int32, device=self.device)
        self.last_page_len = torch.ones(max_batch, dtype=torch.int32, device=self.device)
        self.lse = torch.empty(max_batch, num_q_heads, dtype=torch.float32, device=self.device)
        self._batch = 0
        self._nnz = 0
        graph_buffers = {}
        if use_cuda_graph:
            graph_buffers = dict(
                paged_kv_indptr_buffer=self.indptr,
                paged_kv_indices_buffer=self.indices,
                paged_kv_last_page_len_buffer=self.last_page_len,
            )
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            _shared_workspace(self.device, workspace_bytes),
            "NHD",
            use_cuda_graph=use_cuda_graph,
            use_tensor_cores=use_tensor_cores,
            **graph_buffers,
        )

    def plan(
        self,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_last_page_len: torch.Tensor,
        sm_scale: float,
    ) -> None:
        """Host-side planning (reads ``kv_indptr`` on the host); never inside a graph."""
        batch = kv_last_page_len.numel()
        nnz = int(kv_indptr[-1])
        if self.use_cuda_graph and batch != self.max_batch:
            raise ValueError(f"a CUDA-graph decoder is fixed to batch {self.max_batch}, got {batch}")
        if batch > self.max_batch or nnz > self.indices.numel():
            if self.use_cuda_graph:
                raise ValueError("batch or page count exceeds this CUDA-graph decoder's buffers")
            self._grow(batch, nnz)
        plan_args = dict(
            q_data_type=self.q_dtype, kv_data_type=self.kv_dtype, sm_scale=float(sm_scale)
        )
        meta = (kv_indptr, kv_indices[:nnz], kv_last_page_len)
        if not self.use_cuda_graph:
            # Stage into our buffers first: the wrapper then keeps views of them
            # (``.to(device)`` of a device tensor is the tensor itself), so ``update``
            # reaches it the same way as in graph mode.
            self.indptr[: batch + 1].copy_(kv_indptr)
            self.indices[:nnz].copy_(kv_indices[:nnz])
            self.last_page_len[:batch].copy_(kv_last_page_len)
            meta = (self.indptr[: batch + 1], self.indices[:nnz], self.last_page_len[:batch])
        self.wrapper.plan(
            *meta, self.num_q_heads, self.num_kv_heads, self.head_dim, self.page_size, **plan_args
        )
        self._batch, self._nnz = batch, nnz

    def update(self, kv_indices: torch.Tensor, kv_last_page_len: Optional[torch.Tensor] = None) -> None:
        """Rewrite page ids (and last-page lengths) in place; graph safe, no host sync.

        Every request must keep the page count it was planned with. On the tensor-core
        path the plan also depends on the token counts, so there a new last-page length
        needs ``plan`` instead.
        """
        if kv_indices.numel() < self._nnz:
            raise ValueError(f"expected {self._nnz} page ids, got {kv_indices.numel()}")
        self.indices[: self._nnz].copy_(kv_indices[: self._nnz], non_blocking=True)
        if kv_last_page_len is not None:
            if self.use_tensor_cores:
                raise ValueError("tensor-core FlashInfer decode must be re-planned when lengths change")
            self.last_page_len[: self._batch].copy_(kv_last_page_len, non_blocking=True)

    def run(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        sinks: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
        lse: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode with the planned pages; returns ``(out, lse)`` with natural-log lse."""
        if q.shape[0] != self._batch:
            raise ValueError(f"planned for batch {self._batch}, got q of batch {q.shape[0]}")
        if lse is None:
            lse = self.lse[: self._batch]
        out, lse = self.wrapper.run(q, (k_pages, v_pages), out=out, lse=lse, return_lse=True)
        log2_to_ln_(lse)
        if sinks is not None:
            add_sinks_(out, lse, sinks)
        return out, lse

    def _grow(self, batch: int, nnz: int) -> None:
        if batch > self.max_batch:
            self.max_batch = batch
            self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=self.device)
            self.last_page_len = torch.ones(batch, dtype=torch.int32, device=self.device)
            self.lse = torch.empty(batch, self.num_q_heads, dtype=torch.float32, device=self.device)
        if nnz > self.indices.numel():
            self.indices = torch.zeros(nnz, dtype=torch.int32, device=self.device)


_one_shot: Dict[tuple, FlashInferSparseDecoder] = {}


def sparse_decode_flashinfer(
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
    validate: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plan and run in one call (plans every time: a host sync). Same contract as the others.

    The attention backend should hold a ``FlashInferSparseDecoder`` instead and plan
    once per window.
    """
    check_decode_inputs(
        q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, sinks, out,
        check_values=should_check_values(q.device, validate),
    )
    if q.device.type != "cuda":
        raise ValueError("FlashInfer decode runs on CUDA devices only")
    if q.dtype not in FLASHINFER_DTYPES or k_pages.dtype not in FLASHINFER_DTYPES:
        raise ValueError(f"FlashInfer decode takes fp16/bf16, got q={q.dtype} kv={k_pages.dtype}")
    _, page_size, hkv, d = k_pages.shape
    key = (q.device, q.shape[1], hkv, d, page_size, q.dtype, k_pages.dtype)
    decoder = _one_shot.get(key)
    if decoder is None:
        decoder = FlashInferSparseDecoder(
            q.shape[1], hkv, d, page_size, max(1, q.shape[0]), max(1, kv_indices.numel()),
            q.device, q_dtype=q.dtype, kv_dtype=k_pages.dtype,
        )
        _one_shot[key] = decoder
    decoder.plan(kv_indptr, kv_indices, kv_last_page_len, sm_scale)
    if lse is None:
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    return decoder.run(q, k_pages, v_pages, sinks=sinks, out=out, lse=lse)
