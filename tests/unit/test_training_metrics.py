"""Offline metrics on inputs whose answers are known by hand; served selection == the selector."""

import math

import pytest
import torch

from lsa_sglang.indexer.selector import SelectionParams, select_chunks
from lsa_sglang.training.labels import candidate_mask
from lsa_sglang.training.metrics import (
    MethodAccumulator,
    auc,
    rank_order,
    recall_at_k,
    selection_counts,
    served_select,
    summarise,
    threshold_select,
    topk_select,
)


def test_rank_order_puts_candidates_first_and_breaks_ties_to_recent():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9]])
    cand = torch.tensor([[True, True, True, True, False]])
    assert rank_order(scores, cand)[0].tolist() == [1, 2, 0, 3, 4]


def test_topk_select_per_row_k_and_short_rows():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6]])
    cand = torch.tensor([[True, True, True, True], [False, True, False, False]])
    sel = topk_select(scores, cand, torch.tensor([2, 3]))
    assert sel.tolist() == [[False, True, True, False], [False, True, False, False]]  # row 2: one candidate only


def test_threshold_and_served_selection():
    scores = torch.tensor([[0.9, 0.7, 0.6, 0.4, 0.55]])
    cand = torch.ones(1, 5, dtype=torch.bool)
    assert threshold_select(scores, cand, 0.5).tolist() == [[True, True, True, False, True]]
    assert served_select(scores, cand, 0.5, 2).tolist() == [[True, True, False, False, False]]
    assert served_select(scores, cand, 0.95, 2).sum() == 0  # nothing above threshold: nothing kept


def test_counts_and_summary_by_hand():
    labels = torch.tensor([[True, True, False, False, True, False]])
    cand = torch.tensor([[False, True, True, True, True, True]])  # chunk 0 (a positive) is the sink
    sel = torch.tensor([[True, True, True, False, False, False]])
    mass = torch.tensor([[5.0, 0.4, 0.1, 0.1, 0.3, 0.1]])
    c = selection_counts(sel, labels, cand, mass)
    assert (c["tp"], c["fp"], c["fn"], c["kept"], c["cands"], c["samples"]) == (1, 1, 1, 2, 5, 1)
    s = summarise(c)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5
    assert s["keep_ratio"] == pytest.approx(0.4) and s["mass_recall"] == pytest.approx(0.5 / 1.0)
    assert recall_at_k(torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.9, 0.4]]), labels, cand, 1) == (1, 2)


def test_summary_without_positives_is_nan_not_a_crash():
    c = selection_counts(torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool),
                         torch.ones(1, 3, dtype=torch.bool))
    s = summarise(c)
    assert math.isnan(s["recall"]) and s["keep_ratio"] == 0.0


def test_auc_known_values():
    y = torch.tensor([True, False, True, False])
    assert auc([torch.tensor([0.9, 0.1, 0.8, 0.2])], [y]) == 1.0
    assert auc([torch.tensor([0.1, 0.9, 0.2, 0.8])], [y]) == 0.0
    assert auc([torch.full((4,), 0.5)], [y]) == 0.5
    assert auc([torch.tensor([0.9, 0.5, 0.5, 0.1])], [y]) == 0.875  # 3 wins + a tie (half) of 4 pairs


@pytest.mark.parametrize("seed", range(5))
def test_served_selection_equals_the_server_selector(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    params = SelectionParams(threshold=0.5, page_budget=6, sink_chunks=1, recent_chunks=4, chunks_per_page=1)
    scores = torch.rand(n, generator=g)
    scores[5] = scores[7]  # a tie
    picked = select_chunks(n, params, scores=scores).picked
    cand = candidate_mask(torch.tensor([n]), n, 1, 4)
    mine = served_select(scores[None], cand, 0.5, 6)[0].nonzero().flatten()
    assert mine.tolist() == picked.tolist()


def test_accumulator_equal_keep_and_budget():
    acc = MethodAccumulator((1, 2), threshold=0.5, budget=2)
    scores = torch.tensor([[0.9, 0.8, 0.2, 0.1]])
    labels = torch.tensor([[False, True, True, False]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    acc.add(scores, labels, cand, torch.ones(1, 4), keep=torch.tensor([3]))
    r = acc.result()
    assert r["recall@1"] == 0.0 and r["recall@2"] == 0.5
    assert r["threshold"]["recall"] == 0.5 and r["threshold"]["precision"] == 0.5
    assert r["served"]["kept"] == 2 and r["budget"]["kept"] == 2
    assert r["equal_keep"]["kept"] == 3 and r["equal_keep"]["recall"] == 1.0
    assert r["positives"] == 2
