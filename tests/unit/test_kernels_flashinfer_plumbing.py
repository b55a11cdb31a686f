"""FlashInferSparseDecoder's plumbing on CPU, against a stand-in for FlashInfer's wrapper.

The real kernel needs a GPU (tests/gpu). What can break without one is ours: which
buffers the wrapper reads after ``update``, the base-2 -> natural-log lse conversion,
and folding sinks in. The stand-in behaves as FlashInfer 0.7.2 documents: in graph
mode ``plan`` copies the metadata into the caller's buffers, otherwise it keeps
``tensor.to(device)`` (the same tensor for device tensors); ``run`` reads those
buffers and returns a base-2 lse.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton's first import; see test_kernels_triton_decode.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

from lsa_sglang.kernels import FlashInferSparseDecoder, resolve_backend, sparse_decode, sparse_decode_torch  # noqa: E402
from lsa_sglang.kernels.testing import make_paged_problem  # noqa: E402


class FakeDecodeWrapper:
    def __init__(self, workspace, kv_layout, use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        assert kv_layout == "NHD"
        self.device = workspace.device
        self.graph = use_cuda_graph
        self.indptr, self.indices, self.last = paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer
        self.plans = 0

    def plan(self, indptr, indices, last_page_len, hq, hkv, d, page_size, q_data_type=None, kv_data_type=None, sm_scale=None):
        if self.graph:
            self.indptr.copy_(indptr)
            self.last.copy_(last_page_len)
            self.indices[: len(indices)].copy_(indices)
        else:
            self.indptr, self.indices, self.last = indptr.to(self.device), indices.to(self.device), last_page_len.to(self.device)
        self.planned_counts = (indptr[1:] - indptr[:-1]).tolist()
        self.sm_scale = sm_scale
        self.plans += 1

    def run(self, q, kv, out=None, lse=None, return_lse=False):
        # The plan fixed the page counts: read page ids from the live buffer with them.
        indptr = torch.tensor([0] + torch.tensor(self.planned_counts).cumsum(0).tolist(), dtype=torch.int32)
        o, l = sparse_decode_torch(q, kv[0], kv[1], indptr, self.indices[: int(indptr[-1])], self.last[: q.shape[0]], self.sm_scale)
        out = o if out is None else out.copy_(o)
        lse = l / math.log(2.0) if lse is None else lse.copy_(l / math.log(2.0))
        return (out, lse) if return_lse else out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = FakeDecodeWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    return module


def _new_selection(problem, seed):
    gen = torch.Generator().manual_seed(seed)
    bounds = problem.kv_indptr.tolist()
    ids = []
    for b in range(len(bounds) - 1):
        ids += sorted(torch.randperm(problem.k_pages.shape[0], generator=gen)[: bounds[b + 1] - bounds[b]].tolist())
    last = torch.randint(1, problem.k_pages.shape[1] + 1, (len(bounds) - 1,), generator=gen)
    return torch.tensor(ids, dtype=torch.int32), last.to(torch.int32)


@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_plan_once_then_update_in_place(fake_flashinfer, use_cuda_graph):
    problem = make_paged_problem([3, 1, 4], [2, 8, 5], 8, 2, 64, 8, dtype=torch.bfloat16, with_sinks=True, num_pages=12, seed=1)
    decoder = FlashInferSparseDecoder(8, 2, 64, 8, max_batch=3, max_pages=16, device="cpu", q_dtype=torch.bfloat16, use_cuda_graph=use_cuda_graph)
    decoder.plan(*problem[3:6], problem.sm_scale)
    out = torch.full_like(problem.q, float("nan"))
    lse = torch.full((3, 8), float("nan"))
    got = decoder.run(*problem[:3], sinks=problem.sinks, out=out, lse=lse)
    want = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    assert got[0] is out and got[1] is lse
    torch.testing.assert_close(out.float(), want[0].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-5)
    for seed in range(3):
        ids, last = _new_selection(problem, seed)
        decoder.update(ids, last)
        out.fill_(float("nan"))
        decoder.run(*problem[:3], sinks=problem.sinks, out=out, lse=lse)
        want = sparse_decode_torch(*problem[:4], ids, last, problem.sm_scale, sinks=problem.sinks)
        torch.testing.assert_close(out.float(), want[0].float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-5)
    assert decoder.wrapper.plans == 1


def test_graph_decoder_has_a_fixed_batch(fake_flashinfer):
    problem = make_paged_problem([2, 2], [1, 1], 8, 2, 64, 8)
    decoder = FlashInferSparseDecoder(8, 2, 64, 8, max_batch=3, max_pages=16, device="cpu", use_cuda_graph=True)
    with pytest.raises(ValueError, match="fixed to batch 3"):
        decoder.plan(*problem[3:6], problem.sm_scale)


def test_update_rejects_fewer_ids_and_tensor_core_length_changes(fake_flashinfer):
    problem = make_paged_problem([2, 2], [1, 1], 8, 2, 64, 8)
    decoder = FlashInferSparseDecoder(8, 2, 64, 8, max_batch=2, max_pages=4, device="cpu", use_tensor_cores=True)
    decoder.plan(*problem[3:6], problem.sm_scale)
    with pytest.raises(ValueError, match="page ids"):
        decoder.update(problem.kv_indices[:3])
    decoder.update(problem.kv_indices.flip(0))
    with pytest.raises(ValueError, match="re-planned"):
        decoder.update(problem.kv_indices, problem.kv_last_page_len)


def test_non_graph_decoder_grows_its_buffers(fake_flashinfer):
    decoder = FlashInferSparseDecoder(8, 2, 64, 8, max_batch=1, max_pages=1, device="cpu", q_dtype=torch.float16)
    problem = make_paged_problem([5, 6, 2], [3, 8, 1], 8, 2, 64, 8, dtype=torch.float16, seed=4)
    decoder.plan(*problem[3:6], problem.sm_scale)
    out, lse = decoder.run(*problem[:3])
    want = sparse_decode_torch(*problem[:7])
    torch.testing.assert_close(out, want[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-5)


def test_fp32_is_refused(fake_flashinfer):
    with pytest.raises(ValueError, match="fp16/bf16"):
        FlashInferSparseDecoder(8, 2, 64, 8, 1, 1, "cpu", q_dtype=torch.float32)


def test_flashinfer_backend_needs_cuda():
    problem = make_paged_problem([1], [1], 4, 2, 64, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        sparse_decode(*problem[:7], backend="flashinfer")
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, torch.bfloat16) == "torch"
