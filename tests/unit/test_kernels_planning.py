"""Tensor-op sparse-decode planning against the per-request loop the backend used to run."""

from __future__ import annotations

import random

import pytest
import torch

from lsa_sglang.kernels.planning import (
    DecodePlan,
    plan_counts,
    plan_sparse_decode,
    plan_sparse_decode_loop,
    resident_mask_from_sets,
)

CS = 16


def _tables(rng: random.Random, batch: int, max_len: int, cs: int = CS):
    """Random rows like the manager's: pages per chunk, sink, budgets, partial tails."""
    rows = batch + 3
    pages_per_row = max_len // cs
    perm = torch.randperm(rows * pages_per_row + 1, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    perm = perm[perm != 0][: rows * pages_per_row].view(rows, pages_per_row)  # page 0: SGLang's padding page
    r2t = (perm[:, :, None] * cs + torch.arange(cs)).reshape(rows, max_len).to(torch.int32)
    idxs = rng.sample(range(rows), batch)
    seq_lens, sets, mirrored = [], [], []
    for _ in range(batch):
        seq_len = rng.randint(1, max_len)
        seq_lens.append(seq_len)
        kind = rng.random()
        if kind < 0.15:
            sets.append(None)  # dense request
            mirrored.append(0)
            continue
        full = (seq_len - 1) // cs  # what the manager mirrors
        n_mirrored = full if rng.random() < 0.7 else rng.randint(0, full)  # host full: mirroring lags
        mirrored.append(n_mirrored)
        if kind < 0.3 or n_mirrored == 0:
            sets.append(set())  # empty resident set: tail only
            continue
        budget = rng.randint(0, n_mirrored)
        chosen = set(rng.sample(range(n_mirrored), budget))
        if rng.random() < 0.7:
            chosen.add(0)  # sink chunk
        sets.append(chosen)
    for idx, res, m in zip(idxs, sets, mirrored):  # released chunks point at the padding slot
        if res is not None:
            for c in set(range(m)) - res:
                r2t[idx, c * cs : (c + 1) * cs] = 0
    return r2t, idxs, seq_lens, sets, mirrored


def _planner_inputs(idxs, seq_lens, sets, mirrored, cs=CS):
    num_chunks = -(-max(seq_lens) // cs)
    resident = resident_mask_from_sets([() if s is None else s for s in sets], num_chunks)
    return torch.tensor(idxs), torch.tensor(seq_lens), resident, torch.tensor(mirrored)


def _assert_plans_equal(got, want):
    for g, w in zip(got, want):
        assert g.dtype == torch.int32 == w.dtype
        assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("seed", range(12))
def test_planner_matches_loop_on_random_tables(seed):
    rng = random.Random(seed)
    batch = [1, 2, 7, 64][seed % 4] if seed < 8 else rng.randint(1, 64)
    r2t, idxs, seq_lens, sets, mirrored = _tables(rng, batch, max_len=CS * rng.choice([4, 17, 40]))
    want = plan_sparse_decode_loop(r2t, idxs, seq_lens, sets, mirrored, CS)
    got = plan_sparse_decode(r2t, *_planner_inputs(idxs, seq_lens, sets, mirrored), CS)
    _assert_plans_equal(got, want)
    plan = DecodePlan(64, r2t.shape[1] // CS, CS, "cpu")
    plan.update(r2t, *_planner_inputs(idxs, seq_lens, sets, mirrored))
    _assert_plans_equal(plan.csr(), want)


def test_edge_cases_exact_chunk_boundary_and_empty_read():
    cs = 4
    r2t = (torch.arange(1, 9)[:, None] * cs + torch.arange(cs)).reshape(1, 32).repeat(3, 1).to(torch.int32)
    # seq 8 with 2 mirrored chunks: no tail; seq 9: one-token tail; seq 8, nothing resident: no pages.
    idxs, seq_lens, sets, mirrored = [0, 1, 2], [8, 9, 8], [{1}, {0, 1}, set()], [2, 2, 2]
    want = plan_sparse_decode_loop(r2t, idxs, seq_lens, sets, mirrored, cs)
    got = plan_sparse_decode(r2t, *_planner_inputs(idxs, seq_lens, sets, mirrored, cs), cs)
    _assert_plans_equal(got, want)
    assert got.kv_indptr.tolist() == [0, 1, 4, 4]
    assert got.kv_indices.tolist() == [2, 1, 2, 3]
    assert got.kv_last_page_len.tolist() == [4, 1, 4]


def test_counts_run_on_the_host_and_reject_a_short_mask():
    read, counts, last = plan_counts(torch.zeros(1, 2, dtype=torch.bool), torch.tensor([0]), torch.tensor([20]), 16)
    assert counts.tolist() == [2] and last.tolist() == [4] and read.tolist() == [[True, True]]
    with pytest.raises(ValueError, match="too few"):
        plan_counts(torch.zeros(1, 1, dtype=torch.bool), torch.tensor([0]), torch.tensor([20]), 16)
    with pytest.raises(ValueError, match="resident chunk ids"):
        resident_mask_from_sets([{3}], 3)


def test_static_buffers_keep_storage_and_replan_flag_fires_exactly_on_count_changes():
    cs, rows, pages = 8, 4, 32
    r2t = (torch.randperm(rows * pages)[:, None] * cs + torch.arange(cs)).reshape(rows, pages * cs).to(torch.int32)
    plan = DecodePlan(max_batch=4, max_pages_per_request=pages, chunk_size=cs, device="cpu")
    ptrs = [t.data_ptr() for t in (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)]

    def step(seq_lens, sets, mirrored, idxs=(0, 1, 2)):
        args = _planner_inputs(list(idxs), seq_lens, sets, mirrored, cs)
        flag = plan.update(r2t, *args)
        assert [t.data_ptr() for t in (plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len)] == ptrs
        want = plan_sparse_decode_loop(r2t, list(idxs), seq_lens, sets, mirrored, cs)
        _assert_plans_equal(plan.csr(), want)
        whole = plan.csr(whole_buffer=True)
        assert whole.kv_indices.data_ptr() == ptrs[1] and whole.kv_indices.numel() == 4 * pages
        return flag

    sets = [{0, 3}, {0, 1, 2}, None]
    assert step([41, 50, 30], sets, [5, 6, 0])  # first update: plan
    assert not step([42, 51, 31], sets, [5, 6, 0])  # tails grow inside their pages
    assert not step([42, 51, 31], [{0, 4}, {0, 2, 5}, None], [5, 6, 0])  # same-size swap: indices only
    assert step([42, 51, 33], [{0, 4}, {0, 2, 5}, None], [5, 6, 0])  # dense tail grew a page
    assert not step([43, 52, 34], [{0, 4}, {0, 2, 5}, None], [5, 6, 0])
    assert not step([48, 52, 34], [{0, 4}, {0, 2, 5}, None], [5, 6, 0])  # 8-token tail: still one page
    assert step([49, 52, 34], [{0, 4}, {0, 2, 5}, None], [5, 6, 0])  # 9 tokens: a new tail page
    assert not step([50, 53, 35], [{0, 4, 5}, {0, 2, 5}, None], [6, 6, 0])  # boundary, page moved to the set
    assert step([51, 53, 35], [{0, 1, 4, 5}, {0, 2, 5}, None], [6, 6, 0])  # boundary, bigger set
    assert not step([51, 53, 35], [{0, 1, 4, 5}, {0, 2, 5}, None], [6, 6, 0])
    assert step([51, 53], [{0, 1, 4, 5}, {0, 2, 5}], [6, 6], idxs=(0, 1))  # batch shrank
    assert plan.replans == 5 and plan.updates == 11
    with pytest.raises(ValueError, match="max_batch"):
        plan.update(r2t, *_planner_inputs([0] * 5, [8] * 5, [set()] * 5, [0] * 5, cs))
    small = DecodePlan(2, 2, cs, "cpu")
    with pytest.raises(ValueError, match="max_pages_per_request"):
        small.update(r2t, *_planner_inputs([0], [30], [None], [0], cs))


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_backend_plan_matches_the_loop_and_keeps_slot_lists_for_sdpa(kernel):
    from types import SimpleNamespace

    from lsa_sglang.attention.backend import LSAAttnBackend
    from lsa_sglang.config import LSAConfig
    from lsa_sglang.memory.state import ChunkTable

    rng = random.Random(7)
    r2t, idxs, seq_lens, sets, mirrored = _tables(rng, 9, max_len=CS * 24)
    backend = object.__new__(LSAAttnBackend)
    backend.config = LSAConfig(chunk_size=CS, kernel=kernel)
    backend.device = "cpu"
    backend.req_to_token_pool = SimpleNamespace(req_to_token=r2t)
    tables = [None if s is None else ChunkTable("r", idx, backend.config, 0, host_slots=list(range(m)), resident=set(s))
              for idx, s, m in zip(idxs, sets, mirrored)]
    batch = SimpleNamespace(req_pool_indices=torch.tensor(idxs))
    for _ in range(2):  # the second step reuses the plan's buffers
        backend._plan(batch, tables, idxs, seq_lens)
        if kernel == "torch":
            assert backend._csr is None
            for slots, idx, n, res, m in zip(backend._read, idxs, seq_lens, sets, mirrored):
                want = r2t[idx, :n] if res is None else r2t[idx][torch.cat(
                    [torch.arange(c * CS, (c + 1) * CS) for c in sorted(res)] + [torch.arange(m * CS, n)])]
                assert torch.equal(slots, want)
        else:
            _assert_plans_equal(backend._csr, plan_sparse_decode_loop(r2t, idxs, seq_lens, sets, mirrored, CS))
