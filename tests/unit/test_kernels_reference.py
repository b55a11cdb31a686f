"""The torch sparse decode reference against a token-by-token float64 oracle, and its input checks."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton's first import; see test_kernels_triton_decode.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from lsa_sglang.kernels import (  # noqa: E402
    add_sinks_,
    as_pages,
    merge_states,
    sparse_decode,
    sparse_decode_torch,
    tokens_per_request,
)
from lsa_sglang.kernels.testing import dense_attention_float64, make_paged_problem  # noqa: E402


def _poisoned(problem):
    out = torch.full_like(problem.q, float("nan"))
    lse = torch.full(problem.q.shape[:2], float("nan"), dtype=torch.float32)
    return out, lse


CASES = [
    # pages per request, last page lens, Hq, Hkv, D, page_size
    ([1], [1], 4, 4, 64, 4),
    ([3, 1, 5], [4, 2, 1], 8, 2, 64, 4),
    ([2, 4], [16, 9], 8, 1, 128, 16),
    ([6], [3], 16, 2, 256, 8),
    ([1, 2, 3, 4], [1, 2, 3, 4], 6, 3, 64, 4),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_sinks", [False, True])
def test_reference_matches_float64_oracle(case, with_sinks):
    pages, lasts, hq, hkv, d, page = case
    problem = make_paged_problem(pages, lasts, hq, hkv, d, page, with_sinks=with_sinks, seed=len(pages) + d)
    out, lse = _poisoned(problem)
    got_out, got_lse = sparse_decode_torch(*problem[:7], sinks=problem.sinks, out=out, lse=lse)
    want_out, want_lse = dense_attention_float64(problem)
    assert got_out is out and got_lse is lse
    torch.testing.assert_close(got_out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_only_selected_pages_and_valid_tail_tokens_are_read():
    problem = make_paged_problem([2, 3], [2, 5], 4, 2, 64, 8, seed=3)
    # Disjoint page sets, so garbage in one request's tail is not another's data.
    problem = problem._replace(kv_indices=torch.tensor([1, 4, 0, 5, 6], dtype=torch.int32))
    selected = set(problem.kv_indices.tolist())
    k, v = problem.k_pages.clone(), problem.v_pages.clone()
    for p in range(k.shape[0]):
        if p not in selected:
            k[p] = float("nan")
            v[p] = float("nan")
    # Tail slots past kv_last_page_len hold garbage too.
    for b, last in enumerate(problem.kv_last_page_len.tolist()):
        tail = int(problem.kv_indices[int(problem.kv_indptr[b + 1]) - 1])
        k[tail, last:] = float("inf")
        v[tail, last:] = float("nan")
    want, _ = sparse_decode_torch(*problem[:7])
    got, _ = sparse_decode_torch(problem.q, k, v, *problem[3:7])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def test_sinks_shrink_output_and_join_lse():
    problem = make_paged_problem([3], [7], 4, 2, 64, 8, with_sinks=True, seed=5)
    plain_out, plain_lse = sparse_decode_torch(*problem[:7])
    sink_out, sink_lse = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    torch.testing.assert_close(sink_lse, torch.logaddexp(plain_lse, problem.sinks[None, :]))
    scale = torch.exp(plain_lse - sink_lse)[..., None]
    torch.testing.assert_close(sink_out, plain_out * scale)
    # A dominant sink takes all the mass: the output goes to zero.
    huge = torch.full_like(problem.sinks, 80.0)
    zero_out, zero_lse = sparse_decode_torch(*problem[:7], sinks=huge)
    assert zero_out.abs().max() < 1e-20
    torch.testing.assert_close(zero_lse, huge[None, :].expand_as(zero_lse))


def test_add_sinks_and_merge_states_compose_states():
    problem = make_paged_problem([4], [8], 4, 4, 64, 8, with_sinks=True, seed=6)
    full_out, full_lse = sparse_decode_torch(*problem[:7])
    # Split the four pages into two disjoint sets and merge their states.
    ip = torch.tensor([0, 2], dtype=torch.int32)
    a = sparse_decode_torch(problem.q, problem.k_pages, problem.v_pages, ip, problem.kv_indices[:2], torch.tensor([8], dtype=torch.int32), problem.sm_scale)
    b = sparse_decode_torch(problem.q, problem.k_pages, problem.v_pages, ip, problem.kv_indices[2:], torch.tensor([8], dtype=torch.int32), problem.sm_scale)
    out, lse = merge_states(a[0], a[1], b[0], b[1])
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse)
    want_out, want_lse = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    add_sinks_(out, lse, problem.sinks)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse)


def test_lse_is_natural_log_of_scaled_logits():
    problem = make_paged_problem([1], [1], 1, 1, 64, 4, seed=7)
    _, lse = sparse_decode_torch(*problem[:7])
    k0 = problem.k_pages[int(problem.kv_indices[0]), 0, 0]
    # A single token: lse is exactly its logit, and the output is its value.
    assert math.isclose(float(lse[0, 0]), float(problem.q[0, 0] @ k0) * problem.sm_scale, rel_tol=1e-5)


def test_dispatch_auto_uses_torch_on_cpu():
    problem = make_paged_problem([2, 1], [3, 4], 8, 2, 64, 4, with_sinks=True, seed=8)
    want = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    got = sparse_decode(*problem[:7], sinks=problem.sinks)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_as_pages_is_a_free_view_of_the_slot_buffer():
    buf = torch.randn(32, 2, 64)
    pages = as_pages(buf, 8)
    assert pages.shape == (4, 8, 2, 64)
    assert pages.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(pages[2, 3], buf[2 * 8 + 3])
    with pytest.raises(ValueError):
        as_pages(torch.randn(30, 2, 64), 8)


def test_tokens_per_request():
    indptr = torch.tensor([0, 1, 4], dtype=torch.int32)
    last = torch.tensor([3, 8], dtype=torch.int32)
    assert tokens_per_request(indptr, last, 8).tolist() == [3, 24]


@pytest.mark.parametrize(
    "indptr, indices, last, message",
    [
        ([0, 0, 2], [1, 2], [1, 1], "no KV pages"),
        ([0, 1, 2], [1, 2], [0, 1], "kv_last_page_len"),
        ([0, 1, 2], [1, 2], [1, 5], "kv_last_page_len"),
        ([0, 1, 2], [1, 99], [1, 1], "page ids"),
        ([0, 1, 3], [1, 2], [1, 1], "kv_indices has"),
    ],
)
def test_bad_indices_raise_value_error(indptr, indices, last, message):
    problem = make_paged_problem([1, 1], [1, 1], 4, 2, 64, 4)
    args = (
        torch.tensor(indptr, dtype=torch.int32),
        torch.tensor(indices, dtype=torch.int32),
        torch.tensor(last, dtype=torch.int32),
    )
    with pytest.raises(ValueError, match=message):
        sparse_decode_torch(problem.q, problem.k_pages, problem.v_pages, *args, problem.sm_scale)
    with pytest.raises(ValueError, match=message):
        sparse_decode(problem.q, problem.k_pages, problem.v_pages, *args, problem.sm_scale)


def test_bad_shapes_raise_value_error():
    problem = make_paged_problem([1], [1], 4, 2, 64, 4)
    meta = problem[3:7]
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode_torch(problem.q[:, :3], problem.k_pages, problem.v_pages, *meta)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_decode_torch(problem.q[..., :32], problem.k_pages, problem.v_pages, *meta)
    with pytest.raises(ValueError, match="sinks"):
        sparse_decode_torch(*problem[:7], sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        sparse_decode(*problem[:7], backend="cuda-magic")
