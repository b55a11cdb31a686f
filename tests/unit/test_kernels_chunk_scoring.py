"""Chunk scoring: the torch reference against the formula, and the Triton kernel (interpreter) against torch.

TRITON_INTERPRET is set before anything imports triton (see test_kernels_triton_decode.py).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lsa_sglang.kernels import interpreter_active, page_layout, score_chunks, score_chunks_torch  # noqa: E402
from lsa_sglang.kernels import chunk_scoring_triton  # noqa: E402
from lsa_sglang.kernels.chunk_scoring import count_selected_per_page  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not interpreter_active(),
    reason="triton was imported without TRITON_INTERPRET=1; test_kernels_interpreter_guard runs this file",
)


def _problem(counts, heads, key_groups, dim, dtype=torch.float32, seed=0, w_scale=None):
    gen = torch.Generator().manual_seed(seed)
    batch = len(counts)
    indptr = torch.zeros(batch + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(counts), 0)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    # Weights as the indexer scales them (Dh^-0.5 * H^-0.5), signed, so scores spread around 0.5.
    w_scale = w_scale if w_scale is not None else dim**-0.5 * heads**-0.5
    w = torch.randn(batch, heads, generator=gen) * w_scale * 4
    keys = torch.randn(int(indptr[-1]), key_groups, dim, generator=gen).to(dtype)
    return q, w, keys, indptr


def _formula(q, w, keys, indptr):
    """sigmoid(sum_h w_h relu(q_h . k_{c, h // (H/Hk)})), chunk by chunk in float64."""
    heads, hk = q.shape[1], keys.shape[1]
    group = heads // hk
    out = []
    bounds = indptr.tolist()
    for b in range(q.shape[0]):
        for c in range(bounds[b], bounds[b + 1]):
            total = 0.0
            for h in range(heads):
                total += float(w[b, h]) * max(0.0, float(q[b, h].double() @ keys[c, h // group].double()))
            out.append(1.0 / (1.0 + torch.exp(torch.tensor(-total, dtype=torch.float64)).item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("heads, key_groups", [(8, 1), (8, 4), (6, 3), (4, 4)])
def test_reference_matches_formula(heads, key_groups):
    q, w, keys, indptr = _problem([3, 0, 5], heads, key_groups, 16, seed=heads + key_groups)
    result = score_chunks_torch(q, w, keys, indptr, threshold=0.5, chunks_per_page=2)
    want = _formula(q, w, keys, indptr)
    torch.testing.assert_close(result.scores.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(result.selected, result.scores > 0.5)
    assert result.page_indptr.tolist() == [0, 2, 2, 5]
    sel = result.selected.tolist()
    assert result.page_counts.tolist() == [sum(sel[0:2]), sel[2], sum(sel[3:5]), sum(sel[5:7]), sel[7]]


def test_page_layout_packs_pages_per_request():
    indptr = torch.tensor([0, 5, 5, 6, 14], dtype=torch.int32)
    page_indptr, page_of_chunk, total = page_layout(indptr, 4)
    assert page_indptr.tolist() == [0, 2, 2, 3, 5]
    assert total == 5
    assert page_of_chunk.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        page_layout(indptr, 0)


def test_bad_inputs_raise():
    q, w, keys, indptr = _problem([2], 6, 3, 16)
    with pytest.raises(ValueError, match="multiple"):
        score_chunks_torch(q, w, torch.randn(2, 4, 16), indptr)
    with pytest.raises(ValueError, match="w must be"):
        score_chunks_torch(q, w[:, :3], keys, indptr)
    with pytest.raises(ValueError, match="backend"):
        score_chunks(q, w, keys, indptr, backend="fast")


def test_dispatch_auto_uses_torch_on_cpu():
    q, w, keys, indptr = _problem([4, 2], 4, 1, 16, seed=3)
    a = score_chunks(q, w, keys, indptr, chunks_per_page=3)
    b = score_chunks_torch(q, w, keys, indptr, chunks_per_page=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make every torch.empty inside the Triton wrapper come back poisoned (NaN / True)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-7)
        return t

    monkeypatch.setattr(chunk_scoring_triton.torch, "empty", poisoned)


CASES = [
    # chunks per request, H, Hk, Dh, chunks_per_page
    ([5, 0, 70], 8, 1, 32, 4),  # shared DeepSeek-style key, an empty request, two chunk blocks
    ([150], 16, 4, 64, 100),  # a page spanning chunk blocks: atomics from two programs
    ([1, 2, 3], 6, 3, 16, 1),  # group 2, one chunk per page
    ([65, 64, 63], 128, 1, 128, 64),  # indexer-sized heads, block boundaries
    ([9], 12, 12, 16, 64),  # one key per head
]


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-h{c[1]}x{c[2]}-d{c[3]}-cpp{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_torch(case, dtype, poisoned_outputs):
    counts, heads, key_groups, dim, cpp = case
    q, w, keys, indptr = _problem(counts, heads, key_groups, dim, dtype=dtype, seed=sum(counts) + heads)
    want = score_chunks_torch(q, w, keys, indptr, threshold=0.5, chunks_per_page=cpp)
    got = chunk_scoring_triton.score_chunks_triton(q, w, keys, indptr, threshold=0.5, chunks_per_page=cpp)
    assert got.scores.dtype == torch.float32 and got.selected.dtype == torch.bool
    assert got.page_counts.dtype == torch.int32
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)
    # The decision and the counts are consistent with the kernel's own scores...
    assert torch.equal(got.selected, got.scores > 0.5)
    _, page_of_chunk, total = page_layout(indptr, cpp)
    assert torch.equal(got.page_counts, count_selected_per_page(got.selected, page_of_chunk, total))
    assert torch.equal(got.page_indptr, want.page_indptr)
    # ...and equal to the reference's away from the threshold, where rounding cannot flip them.
    clear = (want.scores - 0.5).abs() > 1e-4
    assert torch.equal(got.selected[clear], want.selected[clear])
    assert 0 < int(want.selected.sum()) < want.selected.numel()  # the data exercises both sides
    if bool(clear.all()):
        assert torch.equal(got.page_counts, want.page_counts)


@needs_interpreter
@pytest.mark.parametrize("threshold, expect_all", [(1e-30, True), (1.0, False)])
def test_threshold_extremes(threshold, expect_all, poisoned_outputs):
    q, w, keys, indptr = _problem([7, 3], 8, 2, 16, seed=21, w_scale=0.01)
    got = chunk_scoring_triton.score_chunks_triton(q, w, keys, indptr, threshold=threshold, chunks_per_page=4)
    assert bool(got.selected.all()) is expect_all and bool(got.selected.any()) is expect_all
    assert got.page_counts.tolist() == ([4, 3, 3] if expect_all else [0, 0, 0])


@needs_interpreter
def test_no_chunks_at_all():
    q, w, keys, indptr = _problem([0, 0], 8, 1, 16)
    got = chunk_scoring_triton.score_chunks_triton(q, w, keys, indptr)
    assert got.scores.numel() == 0 and got.page_counts.numel() == 0
    assert got.page_indptr.tolist() == [0, 0, 0]
