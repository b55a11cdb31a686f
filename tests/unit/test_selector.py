"""Tier-1 selector: hand-made cases with known answers, and invariants over random inputs."""

import random

import pytest
import torch

from lsa_sglang.indexer.selector import (
    SelectionParams,
    candidate_chunks,
    device_budget_chunks,
    forced_chunks,
    needs_fallback,
    select_chunks,
)


def ids(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t]


def params(**kw) -> SelectionParams:
    base = dict(threshold=0.5, chunks_per_page=4, page_budget=2, min_pages=0, sink_chunks=1, recent_chunks=4)
    base.update(kw)
    return SelectionParams(**base)


# 40 chunks, pages of 4: sink = chunk 0, tail = 36..39, candidates 1..35 = pages 0..8.
N = 40


def base_scores() -> torch.Tensor:
    s = torch.full((N,), 0.1)
    s[12:16] = 0.9  # page 3: density 4
    s[24:26] = 0.8  # page 6: density 2
    s[5] = 0.99  # page 1: density 1, but the highest single score
    return s


def test_densest_pages_win() -> None:
    sel = select_chunks(N, params(), base_scores())
    assert ids(sel.picked) == [12, 13, 14, 15, 24, 25, 26, 27]
    assert sel.pages_kept == 2 and not sel.fallback
    assert ids(sel.forced) == [0, 36, 37, 38, 39]
    assert ids(sel.resident) == sorted(ids(sel.forced) + ids(sel.picked))
    assert sel.resident.dtype == torch.int64


def test_budget_caps_pages_and_only_dense_pages_are_kept() -> None:
    sel = select_chunks(N, params(page_budget=3), base_scores())
    assert ids(sel.picked) == [4, 5, 6, 7, 12, 13, 14, 15, 24, 25, 26, 27]
    # budget 5 but only 3 dense pages: "at most", no top-up without min_pages
    sel = select_chunks(N, params(page_budget=5), base_scores())
    assert sel.pages_kept == 3


def test_partial_page_next_to_sink_counts_only_candidates() -> None:
    s = torch.full((N,), 0.1)
    s[0] = 0.99  # sink chunk: forced, must not make page 0 dense
    s[1] = 0.9
    sel = select_chunks(N, params(page_budget=1), s)
    assert ids(sel.picked) == [1, 2, 3]  # page 0 minus the sink chunk


def test_ties_break_by_max_score_then_recency() -> None:
    s = torch.full((N,), 0.1)
    s[8] = 0.7  # page 2, density 1, max 0.7
    s[20] = 0.9  # page 5, density 1, max 0.9
    s[28] = 0.7  # page 7, density 1, max 0.7
    sel = select_chunks(N, params(page_budget=2), s)
    assert ids(sel.picked) == list(range(20, 24)) + list(range(28, 32))  # page 5, then page 7 (more recent)
    sel = select_chunks(N, params(page_budget=1), s)
    assert ids(sel.picked) == list(range(20, 24))


def test_confident_scores_rank_beyond_float32_resolution() -> None:
    """Sigmoids of logits 19 and 18 both round to 1.0 in float32, so a float32 selector would
    break the tie by recency (page 7); their order is the indexer's: page 2."""
    logits = torch.full((N,), -3.0, dtype=torch.float64)
    logits[8], logits[28] = 19.0, 18.0
    assert torch.sigmoid(logits).float()[8] == torch.sigmoid(logits).float()[28] == 1.0
    sel = select_chunks(N, params(page_budget=1), torch.sigmoid(logits))
    assert ids(sel.picked) == list(range(8, 12))


def test_min_pages_top_up_by_max_score() -> None:
    s = torch.full((N,), 0.1)
    s[13] = 0.9  # the only dense page: 3
    s[30] = 0.45  # page 7, best non-dense
    s[9] = 0.4  # page 2, second best
    sel = select_chunks(N, params(page_budget=4, min_pages=3), s)
    assert ids(sel.picked) == list(range(8, 16)) + list(range(28, 32))
    assert sel.pages_kept == 3
    # nothing dense and min_pages 0: no pages beyond the forced ones
    sel = select_chunks(N, params(page_budget=4), torch.full((N,), 0.2))
    assert sel.picked.numel() == 0 and sel.pages_kept == 0
    assert ids(sel.resident) == ids(sel.forced)


def test_widen_keeps_exactly_budget_pages_by_max_score() -> None:
    s = torch.full((N,), 0.1)
    s[17] = 0.3  # page 4
    s[2] = 0.2  # page 0
    sel = select_chunks(N, params(page_budget=3), s, widen=True)
    assert sel.fallback and sel.pages_kept == 3
    # page 4 (0.3), page 0 (0.2), then all others tie at 0.1: most recent (page 8) wins
    assert ids(sel.picked) == [1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35]
    off = select_chunks(N, params(page_budget=3, needle_fallback=False), s, widen=True)
    assert not off.fallback and off.pages_kept == 0


@pytest.mark.parametrize("policy", ["indexer", "quest", "recency", "random"])
def test_every_policy_keeps_the_same_count(policy: str) -> None:
    p = params(policy=policy, sink_chunks=4, recent_chunks=8, page_budget=3)  # page-aligned forced set
    torch.manual_seed(0)
    s = torch.rand(N) * 0.5 + 0.5  # every candidate clears the threshold
    sel = select_chunks(N, p, s, rng=7)
    assert sel.pages_kept == 3 and sel.picked.numel() == 12
    assert sel.resident.numel() == device_budget_chunks(p)


def test_recency_takes_pages_just_before_the_tail() -> None:
    sel = select_chunks(N, params(policy="recency", page_budget=2))
    assert ids(sel.picked) == list(range(28, 36))


def test_quest_ranks_by_max_bound_without_threshold() -> None:
    s = torch.full((N,), -3.0)
    s[7] = 12.0  # page 1
    s[22] = 4.0  # page 5
    s[33] = 3.9  # page 8
    sel = select_chunks(N, params(policy="quest", page_budget=2), s)
    assert ids(sel.picked) == [4, 5, 6, 7, 20, 21, 22, 23]
    sel = select_chunks(N, params(policy="quest", page_budget=1), torch.full((N,), -3.0))
    assert sel.pages_kept == 1  # no threshold: the budget is always used


def test_random_is_reproducible_per_seed() -> None:
    n = 400
    p = params(policy="random", chunks_per_page=1, page_budget=10)
    a = select_chunks(n, p, rng=1)
    b = select_chunks(n, p, rng=torch.Generator().manual_seed(1))
    c = select_chunks(n, p, rng=2)
    assert torch.equal(a.picked, b.picked)
    assert not torch.equal(a.picked, c.picked)
    assert a.picked.numel() == c.picked.numel() == 10
    with pytest.raises(ValueError, match="rng"):
        select_chunks(n, p)


@pytest.mark.parametrize("policy", ["indexer", "quest", "recency", "random"])
def test_everything_resident_when_small(policy: str) -> None:
    p = params(policy=policy, page_budget=2)  # budget: 1 + 4 + 8 = 13 chunks
    for n in (0, 1, 3, 5, 9, 13):
        sel = select_chunks(n, p, torch.zeros(n), rng=0)
        assert ids(sel.resident) == list(range(n)), n
        assert not sel.fallback
    sel = select_chunks(14, p, torch.zeros(14), rng=0)
    assert sel.resident.numel() < 14


def test_invariants_on_random_inputs() -> None:
    r = random.Random(0)
    for trial in range(300):
        p = SelectionParams(
            threshold=r.random(),
            chunks_per_page=r.randint(1, 5),
            page_budget=r.randint(1, 6),
            sink_chunks=r.randint(0, 3),
            recent_chunks=r.randint(0, 6),
            policy=r.choice(["indexer", "quest", "recency", "random"]),
        )
        p = SelectionParams(**{**p.__dict__, "min_pages": r.randint(0, p.page_budget)})
        n = r.randint(0, 80)
        sel = select_chunks(n, p, torch.rand(n), rng=trial, widen=r.random() < 0.3)
        res = ids(sel.resident)
        assert res == sorted(set(res)) and all(0 <= x < n for x in res)
        assert set(ids(sel.forced)) <= set(res)
        assert set(range(min(p.sink_chunks, n))) <= set(res)
        assert set(range(max(0, n - p.recent_chunks), n)) <= set(res)
        assert not set(ids(sel.picked)) & set(ids(sel.forced))
        assert len(res) <= max(n if n <= device_budget_chunks(p) else 0, device_budget_chunks(p))
        assert sel.pages_kept <= p.page_budget + 1  # +1: a fitting set may straddle one extra page
        if candidate_chunks(n, p).numel() > p.page_budget * p.chunks_per_page:
            assert sel.pages_kept <= p.page_budget
            if p.policy != "indexer":
                assert sel.pages_kept == p.page_budget


def test_swap_limit_brings_in_the_best_new_pages_and_keeps_the_best_held() -> None:
    # quest, 1 chunk per page: candidates 1..35, budget 4
    p = params(policy="quest", chunks_per_page=1, page_budget=4)
    s = torch.arange(N, dtype=torch.float32) / 100  # later chunks score higher
    s[[3, 9, 14, 20]] = torch.tensor([5.0, 4.0, 3.0, 2.0])  # the new best four, none of them held
    held = torch.tensor([0, 10, 11, 12, 13, 36, 37, 38, 39])  # sink, four picks, the tail
    assert ids(select_chunks(N, p, s, held=held).picked) == [3, 9, 14, 20]  # no limit: all four swap
    sel = select_chunks(N, p, s, held=held, swap_limit=1)
    assert ids(sel.picked) == [3, 11, 12, 13]  # the best new page, then the best held ones
    assert ids(select_chunks(N, p, s, held=held, swap_limit=0).picked) == [10, 11, 12, 13]
    assert torch.equal(select_chunks(N, p, s, held=held, swap_limit=4).picked, select_chunks(N, p, s).picked)
    # more held than the budget (chunks that left the tail): the worst held ones go, nothing comes
    held = torch.arange(N)
    assert ids(select_chunks(N, p, s, held=held, swap_limit=0).picked) == [3, 9, 14, 20]


def test_swap_limit_counts_pages_not_wholly_held() -> None:
    p = params(policy="quest", page_budget=2)  # pages of 4: page 3 = chunks 12..15, page 6 = 24..27
    s = base_scores()
    held = torch.tensor([0, 13, 14, 15, 28, 29, 30, 31])  # page 3 lacks chunk 12; page 7 is whole
    sel = select_chunks(N, p, s, held=held, swap_limit=1)
    assert ids(sel.picked) == [4, 5, 6, 7, 28, 29, 30, 31]  # one page comes (the best), page 7 stays


def test_swap_limit_on_random_inputs() -> None:
    r = random.Random(1)
    for trial in range(300):
        p = SelectionParams(
            threshold=r.random(), chunks_per_page=r.randint(1, 4), page_budget=r.randint(1, 6),
            sink_chunks=r.randint(0, 2), recent_chunks=r.randint(0, 5),
            policy=r.choice(["indexer", "quest", "attention", "recency", "random"]),
        )
        n = r.randint(0, 80)
        scores = torch.rand(n)
        held = torch.tensor(sorted(r.sample(range(n), r.randint(0, n))), dtype=torch.int64)
        limit = r.randint(0, 3)
        free = select_chunks(n, p, scores, rng=trial)
        sel = select_chunks(n, p, scores, rng=trial, held=held, swap_limit=limit)
        if candidate_chunks(n, p).numel() <= p.page_budget * p.chunks_per_page:
            assert torch.equal(sel.resident, free.resident)  # everything fits: nothing to limit
            continue
        cpp, cand = p.chunks_per_page, ids(candidate_chunks(n, p))
        wholly_held = {c // cpp for c in cand} - {c // cpp for c in cand if c not in set(ids(held))}
        pages = {int(c) // cpp for c in sel.picked}
        wanted = {int(c) // cpp for c in free.picked}
        incoming = pages - wholly_held
        assert incoming <= wanted and len(incoming) == min(limit, len(wanted - wholly_held))
        assert len(pages) == len(incoming) + min(len(wanted) - len(incoming), len(wholly_held))


def test_forced_and_candidates_partition() -> None:
    p = params(sink_chunks=2, recent_chunks=3)
    for n in range(0, 12):
        f, c = ids(forced_chunks(n, p)), ids(candidate_chunks(n, p))
        assert sorted(f + c) == list(range(n))


def test_nan_scores_never_win() -> None:
    s = torch.full((N,), 0.1)
    s[8:12] = float("nan")
    s[16] = 0.6
    sel = select_chunks(N, params(page_budget=1), s, widen=True)
    assert ids(sel.picked) == list(range(16, 20))


def test_score_errors() -> None:
    with pytest.raises(ValueError, match="needs scores"):
        select_chunks(N, params())
    with pytest.raises(ValueError, match="expected 40 scores"):
        select_chunks(N, params(policy="quest"), torch.zeros(39))


def test_needs_fallback() -> None:
    low = torch.tensor([0.1, 0.3, 0.49])
    assert needs_fallback(low, 0.5, tail_mass=0.2)
    assert not needs_fallback(low, 0.5, tail_mass=0.8)  # the tail explains the attention
    assert not needs_fallback(torch.tensor([0.1, 0.51]), 0.5, tail_mass=0.0)  # indexer is sure
    assert not needs_fallback(torch.zeros(0), 0.5, tail_mass=0.0)  # nothing to widen
    assert needs_fallback(low, 0.5, tail_mass=0.6, tail_mass_floor=0.7)
    with pytest.raises(ValueError):
        needs_fallback(low, 0.5, tail_mass=1.5)


def test_params_validation_and_from_config() -> None:
    from lsa_sglang.config import LSAConfig

    cfg = LSAConfig(chunk_size=64, recent_tokens=130, page_budget=7, chunks_per_page=2, sink_chunks=1)
    p = SelectionParams.from_config(cfg)
    assert p.recent_chunks == 3 and p.page_budget == 7 and p.chunks_per_page == 2
    assert device_budget_chunks(p) == 1 + 3 + 14
    for bad in ({"page_budget": 0}, {"min_pages": 3, "page_budget": 2}, {"policy": "oracle"},
                {"chunks_per_page": 0}, {"threshold": 2.0}, {"sink_chunks": -1}):
        with pytest.raises(ValueError):
            SelectionParams(**bad)
