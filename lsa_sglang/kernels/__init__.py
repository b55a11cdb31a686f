"""Triton and torch kernels for sparse paged decode, chunk scoring and chunk copies.

Public API (see each module for the why):

* ``sparse_decode`` - one entry point: ``auto`` | ``torch`` | ``triton`` | ``flashinfer``;
  ``sparse_decode_torch`` (the oracle), ``sparse_decode_triton`` with its
  preallocated ``SplitWorkspace``, ``FlashInferSparseDecoder`` (plan per window,
  update in place, run per step) and ``sparse_decode_flashinfer`` (one-shot).
* ``score_chunks`` - indexer chunk scores, threshold mask and per-page counts;
  ``score_chunks_torch`` and ``score_chunks_triton``.
* ``copy_chunks_to_device`` / ``copy_chunks_to_host`` - host mirror <-> device pool.
* ``plan_sparse_decode`` / ``DecodePlan`` - CSR page lists from chunk residency with
  tensor ops (``DecodePlan``: buffers allocated once, re-plan flag for FlashInfer).

Triton kernels on CPU tensors need ``TRITON_INTERPRET=1`` set before triton is first
imported (``interpreter_active`` tells whether it was).
"""

from ._triton_env import interpreter_active, triton_can_run_on
from .attention_state import add_sinks_, merge_states
from .chunk_copy import contiguous_runs, copy_chunks_to_device, copy_chunks_to_host, host_mirror_shape
from .chunk_scoring import ChunkScores, page_layout, score_chunks_torch
from .chunk_scoring_triton import score_chunks_triton
from .dispatch import BACKENDS, resolve_backend, score_chunks, sparse_decode
from .flashinfer_decode import FlashInferSparseDecoder, flashinfer_available, sparse_decode_flashinfer
from .paged_layout import as_pages, check_decode_inputs, tokens_per_request
from .planning import DecodePlan, SparsePlan, plan_sparse_decode, resident_mask_from_sets
from .reference import sparse_decode_torch
from .triton_decode import SplitWorkspace, choose_num_splits, sparse_decode_triton

__all__ = [
    "BACKENDS",
    "ChunkScores",
    "DecodePlan",
    "FlashInferSparseDecoder",
    "SparsePlan",
    "SplitWorkspace",
    "add_sinks_",
    "as_pages",
    "check_decode_inputs",
    "choose_num_splits",
    "contiguous_runs",
    "copy_chunks_to_device",
    "copy_chunks_to_host",
    "flashinfer_available",
    "host_mirror_shape",
    "interpreter_active",
    "merge_states",
    "page_layout",
    "plan_sparse_decode",
    "resident_mask_from_sets",
    "resolve_backend",
    "score_chunks",
    "score_chunks_torch",
    "score_chunks_triton",
    "sparse_decode",
    "sparse_decode_flashinfer",
    "sparse_decode_torch",
    "sparse_decode_triton",
    "tokens_per_request",
    "triton_can_run_on",
]
