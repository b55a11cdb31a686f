"""GPU checks of the kernel paths against the torch reference (skipped without CUDA).

Covers what the CPU interpreter cannot: compiled Triton (native bf16/fp16 tl.dot),
CUDA-graph capture and replay with indices rewritten in place, FlashInfer, and the
pinned-memory side-stream chunk copies.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from lsa_sglang.kernels import (  # noqa: E402
    SplitWorkspace,
    as_pages,
    copy_chunks_to_device,
    copy_chunks_to_host,
    flashinfer_available,
    host_mirror_shape,
    interpreter_active,
    resolve_backend,
    score_chunks_torch,
    score_chunks_triton,
    sparse_decode,
    sparse_decode_torch,
    sparse_decode_triton,
)
from lsa_sglang.kernels.testing import make_paged_problem  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
needs_compiled_triton = pytest.mark.skipif(interpreter_active(), reason="TRITON_INTERPRET=1 is set: no compiled Triton")
needs_flashinfer = pytest.mark.skipif(not flashinfer_available(), reason="flashinfer is not installed")


def _problem(pages, lasts, hq, hkv, d, page, dtype, sinks=False, seed=0, num_pages=None):
    return make_paged_problem(pages, lasts, hq, hkv, d, page, dtype=dtype, device=DEV, with_sinks=sinks, seed=seed, num_pages=num_pages)


def _check(got, want, dtype):
    torch.testing.assert_close(got[0].float(), want[0].float(), **TOL[dtype])
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)


SHAPES = [
    # pages, lasts, Hq, Hkv, D, page_size, sinks
    ([1, 7, 33], [1, 64, 17], 32, 8, 128, 64, False),
    ([128, 96], [64, 5], 32, 8, 128, 64, True),
    ([5, 2, 9, 1], [3, 16, 16, 1], 8, 8, 64, 16, False),
    ([40], [30], 16, 2, 256, 32, True),
    ([64, 3], [7, 64], 64, 1, 128, 64, True),
]


@needs_compiled_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_triton_matches_reference(shape, dtype, splits):
    pages, lasts, hq, hkv, d, page, sinks = shape
    problem = _problem(pages, lasts, hq, hkv, d, page, dtype, sinks=sinks, seed=splits)
    want = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    ws = SplitWorkspace.allocate(len(pages), hq, d, splits, DEV)
    ws.mid_out.fill_(float("nan"))
    ws.mid_lse.fill_(float("nan"))
    out = torch.full_like(problem.q, float("nan"))
    lse = torch.full(problem.q.shape[:2], float("nan"), device=DEV)
    got = sparse_decode_triton(*problem[:7], sinks=problem.sinks, out=out, lse=lse, workspace=ws)
    _check(got, want, dtype)


def _rewrite_selection(problem, seed):
    """New page ids with the same per-request page counts, and new tail lengths."""
    gen = torch.Generator().manual_seed(seed)
    num_pages, page_size = problem.k_pages.shape[:2]
    bounds = problem.kv_indptr.tolist()
    ids = []
    for b in range(len(bounds) - 1):
        ids += sorted(torch.randperm(num_pages, generator=gen)[: bounds[b + 1] - bounds[b]].tolist())
    lasts = torch.randint(1, page_size + 1, (len(bounds) - 1,), generator=gen)
    return torch.tensor(ids, dtype=torch.int32), lasts.to(torch.int32)


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_cuda_graph_replays_rewritten_indices(dtype):
    problem = _problem([12, 3, 30], [64, 1, 20], 32, 8, 128, 64, dtype, sinks=True, num_pages=64)
    ws = SplitWorkspace.for_budget(3, 32, 8, 128, 64 * 64, DEV)
    indices, last = problem.kv_indices.clone(), problem.kv_last_page_len.clone()
    out = torch.empty_like(problem.q)
    lse = torch.empty(3, 32, device=DEV)
    args = (problem.q, problem.k_pages, problem.v_pages, problem.kv_indptr, indices, last, problem.sm_scale)
    sparse_decode_triton(*args, sinks=problem.sinks, out=out, lse=lse, workspace=ws)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_decode_triton(*args, sinks=problem.sinks, out=out, lse=lse, workspace=ws)
    for seed in range(3):
        new_ids, new_last = _rewrite_selection(problem, seed)
        indices.copy_(new_ids)
        last.copy_(new_last)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = sparse_decode_torch(problem.q, problem.k_pages, problem.v_pages, problem.kv_indptr, indices, last, problem.sm_scale, sinks=problem.sinks)
        _check((out, lse), want, dtype)


@needs_flashinfer
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flashinfer_matches_reference(shape, dtype):
    from lsa_sglang.kernels import sparse_decode_flashinfer

    pages, lasts, hq, hkv, d, page, sinks = shape
    problem = _problem(pages, lasts, hq, hkv, d, page, dtype, sinks=sinks, seed=5)
    want = sparse_decode_torch(*problem[:7], sinks=problem.sinks)
    out = torch.full_like(problem.q, float("nan"))
    got = sparse_decode_flashinfer(*problem[:7], sinks=problem.sinks, out=out)
    _check(got, want, dtype)


@needs_flashinfer
@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_flashinfer_plan_once_update_in_place(use_cuda_graph):
    from lsa_sglang.kernels import FlashInferSparseDecoder

    dtype = torch.bfloat16
    problem = _problem([12, 3, 30], [64, 1, 20], 32, 8, 128, 64, dtype, sinks=True, num_pages=64)
    decoder = FlashInferSparseDecoder(32, 8, 128, 64, max_batch=3, max_pages=64, device=DEV, q_dtype=dtype, use_cuda_graph=use_cuda_graph)
    decoder.plan(problem.kv_indptr, problem.kv_indices, problem.kv_last_page_len, problem.sm_scale)
    out = torch.empty_like(problem.q)
    lse = torch.empty(3, 32, device=DEV)
    decoder.run(problem.q, problem.k_pages, problem.v_pages, sinks=problem.sinks, out=out, lse=lse)
    _check((out, lse), sparse_decode_torch(*problem[:7], sinks=problem.sinks), dtype)
    graph = None
    if use_cuda_graph:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decoder.run(problem.q, problem.k_pages, problem.v_pages, sinks=problem.sinks, out=out, lse=lse)
    for seed in range(3):
        new_ids, new_last = _rewrite_selection(problem, seed)
        decoder.update(new_ids.to(DEV), new_last.to(DEV))
        out.fill_(float("nan"))
        if graph is not None:
            graph.replay()
        else:
            decoder.run(problem.q, problem.k_pages, problem.v_pages, sinks=problem.sinks, out=out, lse=lse)
        torch.cuda.synchronize()
        want = sparse_decode_torch(problem.q, problem.k_pages, problem.v_pages, problem.kv_indptr, new_ids.to(DEV), new_last.to(DEV), problem.sm_scale, sinks=problem.sinks)
        _check((out, lse), want, dtype)


def test_auto_backend_on_cuda():
    expected = "flashinfer" if flashinfer_available() else "triton"
    assert resolve_backend("auto", DEV, torch.bfloat16, torch.bfloat16) == expected
    assert resolve_backend("auto", DEV, torch.float32, torch.float32) == "triton"
    if not interpreter_active():
        problem = _problem([4, 2], [5, 64], 32, 8, 128, 64, torch.bfloat16, sinks=True)
        _check(sparse_decode(*problem[:7], sinks=problem.sinks), sparse_decode_torch(*problem[:7], sinks=problem.sinks), torch.bfloat16)


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads, key_groups, cpp", [(128, 1, 64), (32, 8, 16)])
def test_chunk_scoring_triton_on_gpu(dtype, heads, key_groups, cpp):
    gen = torch.Generator().manual_seed(heads)
    counts = [4000, 0, 129, 64]
    indptr = torch.tensor([0] + torch.cumsum(torch.tensor(counts), 0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(4, heads, 128, generator=gen).to(dtype).to(DEV)
    w = (torch.randn(4, heads, generator=gen) * 4 * (128 * heads) ** -0.5).to(DEV)
    keys = torch.randn(int(indptr[-1]), key_groups, 128, generator=gen).to(dtype).to(DEV)
    want = score_chunks_torch(q, w, keys, indptr, 0.5, cpp)
    got = score_chunks_triton(q, w, keys, indptr, 0.5, cpp)
    torch.testing.assert_close(got.scores, want.scores, atol=2e-3, rtol=2e-3)
    clear = (want.scores - 0.5).abs() > 5e-3
    assert torch.equal(got.selected[clear], want.selected[clear])
    assert torch.equal(got.selected, got.scores > 0.5)
    assert torch.equal(got.page_indptr, want.page_indptr)
    assert int(got.page_counts.sum()) == int(got.selected.sum())


def _bits(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("pinned", [True, False])
def test_chunk_copies_on_side_stream_are_bitwise(pinned):
    layers, chunk, hkv, d = 4, 64, 8, 128
    host = torch.randn(host_mirror_shape(16, layers, chunk, hkv, d)).to(torch.bfloat16)
    if pinned:
        host = host.pin_memory()
    k = [torch.randn(32 * chunk, hkv, d, device=DEV).to(torch.bfloat16) for _ in range(layers)]
    v = [torch.randn(32 * chunk, hkv, d, device=DEV).to(torch.bfloat16) for _ in range(layers)]
    slots, pages = [3, 4, 5, 11, 0], [30, 2, 3, 0, 17]
    event = copy_chunks_to_device(host, slots, k, v, pages)
    assert isinstance(event, torch.cuda.Event)
    torch.cuda.current_stream().wait_event(event)
    for layer in range(layers):
        for slot, page in zip(slots, pages):
            assert torch.equal(_bits(as_pages(k[layer], chunk)[page].cpu()), _bits(host[slot, layer, 0]))
            assert torch.equal(_bits(as_pages(v[layer], chunk)[page].cpu()), _bits(host[slot, layer, 1]))
    # Write-through after a forward pass on the current stream: the side stream must wait for it.
    for layer in range(layers):
        as_pages(k[layer], chunk)[9].mul_(3.0)
    event = copy_chunks_to_host(k, v, [9, 30], host, [14, 15])
    event.synchronize()
    for layer in range(layers):
        assert torch.equal(_bits(host[14, layer, 0]), _bits(as_pages(k[layer], chunk)[9].cpu()))
        assert torch.equal(_bits(host[15, layer, 1]), _bits(as_pages(v[layer], chunk)[30].cpu()))
    empty = copy_chunks_to_device(host, [], k, v, [])
    empty.synchronize()


def test_copy_from_a_worker_thread_waits_for_the_decode_stream():
    """The prefetcher copies from its own thread, whose current stream is not the decode
    stream: a page released by a forward still queued there must be refilled after it. The
    forward here sleeps, then writes the page; with `after` recorded on the decode stream
    the copy lands last (waiting on the worker's own stream, it would land first)."""
    from concurrent.futures import ThreadPoolExecutor

    layers, chunk, hkv, d = 2, 64, 8, 128
    host = torch.randn(host_mirror_shape(4, layers, chunk, hkv, d)).to(torch.bfloat16).pin_memory()
    k = [torch.randn(8 * chunk, hkv, d, device=DEV).to(torch.bfloat16) for _ in range(layers)]
    v = [torch.randn(8 * chunk, hkv, d, device=DEV).to(torch.bfloat16) for _ in range(layers)]
    decode = torch.cuda.Stream()
    with torch.cuda.stream(decode):
        torch.cuda._sleep(100_000_000)  # tens of ms of queued forward work
        for kb, vb in zip(k, v):
            as_pages(kb, chunk)[5].fill_(7.0)
            as_pages(vb, chunk)[5].fill_(7.0)
        after = torch.cuda.Event()
        after.record(decode)
    with ThreadPoolExecutor(1) as pool:
        event = pool.submit(lambda: copy_chunks_to_device(host, [2], k, v, [5], after=after)).result()
    event.synchronize()
    torch.cuda.synchronize()
    for layer in range(layers):
        assert torch.equal(_bits(as_pages(k[layer], chunk)[5].cpu()), _bits(host[2, layer, 0]))
        assert torch.equal(_bits(as_pages(v[layer], chunk)[5].cpu()), _bits(host[2, layer, 1]))
