"""DecodePlan on CUDA: page ids gathered on the device from host masks, in buffers that a
captured Triton decode graph keeps reading across updates (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from lsa_sglang.kernels import SplitWorkspace, interpreter_active, sparse_decode_torch, sparse_decode_triton  # noqa: E402
from lsa_sglang.kernels.planning import DecodePlan, plan_sparse_decode_loop, resident_mask_from_sets  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
CS, ROWS, PAGES_PER_ROW = 16, 6, 12


def _r2t(seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(ROWS * PAGES_PER_ROW, generator=gen) + 1
    return (perm.view(ROWS, PAGES_PER_ROW, 1) * CS + torch.arange(CS)).reshape(ROWS, -1).to(torch.int32)


def _update(plan, r2t, idxs, seq_lens, sets, mirrored):
    num_chunks = -(-max(seq_lens) // CS)
    resident = resident_mask_from_sets([() if s is None else s for s in sets], num_chunks)
    return plan.update(r2t.to(DEV), torch.tensor(idxs, device=DEV), torch.tensor(seq_lens), resident, torch.tensor(mirrored))


@pytest.mark.skipif(interpreter_active(), reason="TRITON_INTERPRET=1 is set: no compiled Triton")
def test_decode_plan_on_cuda_matches_the_loop_and_feeds_a_captured_graph():
    r2t = _r2t(0)
    idxs, mirrored = [4, 1, 2], [6, 5, 0]
    steps = [  # same page counts in every step: a graph captured once stays valid
        ([101, 90, 70], [{0, 2, 5}, {0, 3}, None]),
        ([102, 91, 71], [{0, 1, 4}, {0, 4}, None]),
        ([104, 93, 73], [{0, 3, 4}, {1, 2}, None]),
    ]
    plan = DecodePlan(4, PAGES_PER_ROW, CS, DEV)
    ptrs = (plan.kv_indptr.data_ptr(), plan.kv_indices.data_ptr(), plan.kv_last_page_len.data_ptr())
    num_pages = ROWS * PAGES_PER_ROW + 1
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(num_pages, CS, 8, 128, generator=gen).to(torch.bfloat16).to(DEV)
    v = torch.randn(num_pages, CS, 8, 128, generator=gen).to(torch.bfloat16).to(DEV)
    q = torch.randn(3, 32, 128, generator=gen).to(torch.bfloat16).to(DEV)
    out, lse = torch.empty_like(q), torch.empty(3, 32, device=DEV)
    ws = SplitWorkspace.for_budget(3, 32, 8, 128, PAGES_PER_ROW * CS, DEV)
    graph = None
    for i, (seq_lens, sets) in enumerate(steps):
        replan = _update(plan, r2t, idxs, seq_lens, sets, mirrored)
        assert replan == (i == 0)
        assert (plan.kv_indptr.data_ptr(), plan.kv_indices.data_ptr(), plan.kv_last_page_len.data_ptr()) == ptrs
        want = plan_sparse_decode_loop(r2t, idxs, seq_lens, sets, mirrored, CS)
        for got, ref in zip(plan.csr(), want):
            assert torch.equal(got.cpu(), ref)
        csr = plan.csr(whole_buffer=True)
        if graph is None:
            sparse_decode_triton(q, k, v, *csr, 128**-0.5, out=out, lse=lse, workspace=ws)  # compile
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sparse_decode_triton(q, k, v, *csr, 128**-0.5, out=out, lse=lse, workspace=ws)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = sparse_decode_torch(q, k, v, *(t.to(DEV) for t in want), 128**-0.5)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)
    assert _update(plan, r2t, idxs, [105, 97, 73], steps[-1][1], mirrored)  # a tail grew a page
