"""Triton split-K sparse decode against the torch reference, on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported in the process, so it is
set here before any import that could pull triton in; `make test` also exports it. If
another module imported triton first, these tests skip and
test_kernels_interpreter_guard.py runs this module in a fresh interpreter process.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lsa_sglang.kernels import (  # noqa: E402
    SplitWorkspace,
    choose_num_splits,
    interpreter_active,
    sparse_decode,
    sparse_decode_torch,
    sparse_decode_triton,
)
from lsa_sglang.kernels.testing import make_paged_problem  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreter_active(),
    reason="triton was imported without TRITON_INTERPRET=1; test_kernels_interpreter_guard runs this file",
)

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
LSE_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-3, rtol=1e-3),
}


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _run_and_compare(problem, num_splits, dtype, workspace=None, q=None):
    q = problem.q if q is None else q
    want_out, want_lse = sparse_decode_torch(q, *problem[1:7], sinks=problem.sinks)
    out = _nan_like(q)
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32)
    if workspace is None:
        workspace = SplitWorkspace.allocate(q.shape[0], q.shape[1], q.shape[2], num_splits, "cpu")
    workspace.mid_out.fill_(float("nan"))
    workspace.mid_lse.fill_(float("nan"))
    got_out, got_lse = sparse_decode_triton(
        q, *problem[1:7], sinks=problem.sinks, out=out, lse=lse, workspace=workspace
    )
    assert got_out is out and got_lse is lse
    assert got_out.dtype == dtype and got_lse.dtype == torch.float32
    torch.testing.assert_close(got_out.float(), want_out.float(), **TOL[dtype])
    torch.testing.assert_close(got_lse, want_lse, **LSE_TOL[dtype])


# pages per request, last page lens, Hq, Hkv, D, page_size, num_splits, sinks
SHAPES = [
    ([1], [1], 4, 4, 64, 4, 1, False),  # one token, MHA
    ([1], [3], 8, 2, 64, 16, 8, True),  # one partial page, 7 of 8 splits empty
    ([2, 5, 9], [16, 1, 7], 8, 2, 64, 16, 4, False),  # budgets 2..9 pages
    ([3, 1], [4, 4], 8, 1, 128, 4, 3, True),  # MQA, full tails
    ([4], [5], 16, 2, 256, 8, 2, False),  # head_dim 256
    ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 6, 3, 64, 8, 2, True),  # group 2, non power-of-two heads
    ([12], [64], 4, 1, 64, 64, 5, False),  # chunk-size pages, tokens not a multiple of splits
    ([20], [1], 2, 2, 64, 1, 4, False),  # page_size 1
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"p{s[0]}-h{s[2]}x{s[3]}-d{s[4]}-ps{s[5]}-s{s[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_reference(shape, dtype):
    pages, lasts, hq, hkv, d, page, splits, sinks = shape
    problem = make_paged_problem(pages, lasts, hq, hkv, d, page, dtype=dtype, with_sinks=sinks, seed=hq + d + page)
    _run_and_compare(problem, splits, dtype)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("tail", [1, 9, 16])
def test_budgets_and_tail_lengths(budget, tail):
    problem = make_paged_problem([budget, max(1, budget - 1)], [tail, 16 - tail + 1], 8, 2, 64, 16, seed=budget * 31 + tail)
    _run_and_compare(problem, 4, torch.float32)


def test_group_larger_than_one_head_tile():
    # 80 query heads on one KV head: two 64-row head tiles, the second one partial.
    problem = make_paged_problem([3], [5], 80, 1, 64, 8, with_sinks=True, seed=11)
    _run_and_compare(problem, 2, torch.float32)


def test_large_logits_stay_finite():
    problem = make_paged_problem([4, 2], [8, 3], 8, 2, 64, 8, seed=12, kv_scale=40.0)
    _run_and_compare(problem, 3, torch.float32)


def test_strided_inputs():
    # K and V as views into one fused [pages, 2, page, Hkv, D] pool, q a slice of a wider tensor.
    problem = make_paged_problem([3, 2], [5, 8], 8, 2, 64, 8, seed=13)
    fused = torch.stack([problem.k_pages, problem.v_pages], dim=1)
    wide_q = torch.randn(2, 12, 64)
    wide_q[:, 2:10] = problem.q
    strided = problem._replace(k_pages=fused[:, 0], v_pages=fused[:, 1])
    assert not strided.k_pages.is_contiguous()
    _run_and_compare(strided, 3, torch.float32, q=wide_q[:, 2:10])


def test_workspace_reused_across_batches():
    workspace = SplitWorkspace.allocate(4, 8, 64, 4, "cpu")
    for seed, pages in enumerate([[3, 1, 4, 2], [6], [1, 1]]):
        problem = make_paged_problem(pages, [2] * len(pages), 8, 2, 64, 8, with_sinks=True, seed=seed)
        _run_and_compare(problem, 4, torch.float32, workspace=workspace)


def test_workspace_must_fit():
    problem = make_paged_problem([1, 1], [1, 1], 8, 2, 64, 8)
    small = SplitWorkspace.allocate(1, 8, 64, 2, "cpu")
    with pytest.raises(ValueError, match="workspace"):
        sparse_decode_triton(*problem[:7], workspace=small)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode_triton(*problem[:7], workspace=SplitWorkspace.allocate(2, 8, 64, 2, "cpu"), num_splits=3)


def test_zero_pages_raise_value_error():
    problem = make_paged_problem([1, 1], [1, 1], 8, 2, 64, 8)
    with pytest.raises(ValueError, match="no KV pages"):
        sparse_decode_triton(problem.q, problem.k_pages, problem.v_pages, torch.tensor([0, 1, 1], dtype=torch.int32), problem.kv_indices, problem.kv_last_page_len, problem.sm_scale)


def test_default_allocations_and_dispatch():
    problem = make_paged_problem([2, 3], [3, 8], 8, 4, 64, 8, dtype=torch.bfloat16, with_sinks=True, seed=14)
    want_out, want_lse = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    out, lse = sparse_decode(*problem[:7], sinks=problem.sinks, backend="triton")
    torch.testing.assert_close(out.float(), want_out.float(), **TOL[torch.bfloat16])
    torch.testing.assert_close(lse, want_lse, **LSE_TOL[torch.bfloat16])


def test_choose_num_splits():
    assert choose_num_splits(1, 8, 8192, num_sms=132) == 32  # few programs: split up to the cap
    assert choose_num_splits(1, 8, 300, num_sms=132) == 2  # short budget: >= 256 tokens a split
    assert choose_num_splits(64, 8, 8192, num_sms=132) == 1  # the batch alone fills the GPU
    assert choose_num_splits(4, 8, 8192, num_sms=132) == 9
