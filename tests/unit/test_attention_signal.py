"""Window-0 scores from the backbone's own attention (indexer.attention_signal)."""

from __future__ import annotations

import math

import pytest
import torch

from lsa_sglang.indexer import SelectionParams, attention_scores, layer_chunk_mass, select_chunks


def _loop_mass(q, k, scale, n_chunks, cs):
    """The definition, written out: per head a softmax over every token, heads summed."""
    heads, kv_heads = q.shape[0], k.shape[1]
    per_token = torch.zeros(k.shape[0], dtype=torch.float64)
    for h in range(heads):
        kh = k[:, h // (heads // kv_heads)].double()
        logits = [float(q[h].double() @ kh[t]) * scale for t in range(k.shape[0])]
        top = max(logits)
        w = [math.exp(x - top) for x in logits]
        per_token += torch.tensor(w, dtype=torch.float64) / sum(w)
    return per_token[: n_chunks * cs].view(n_chunks, cs).sum(1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
def test_layer_mass_matches_the_definition(heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    cs, n, d = 4, 5, 8
    q = torch.randn(heads, d, generator=g)
    k = torch.randn(n * cs + 3, kv_heads, d, generator=g)  # a partial chunk at the end
    got = layer_chunk_mass(q, k, 0.35, n, cs)
    torch.testing.assert_close(got.double(), _loop_mass(q, k, 0.35, n, cs), rtol=1e-5, atol=1e-6)
    assert float(got.sum()) <= heads + 1e-4  # the partial chunk's share is not counted


def test_a_needle_seen_by_one_layer_wins_over_layers_that_look_local():
    """Both layers attend mostly to the recency tail (forced, not scored). Layer 0 leaves a bit
    more on chunk 5; layer 1, a 'retrieval head', leaves less raw mass but all of it on one
    token of chunk 3. Summing layers ranks chunk 5 first; each layer's share of the candidate
    mass ranks chunk 3 first, as the model's retrieval reads it."""
    cs, n = 8, 10
    q = torch.ones(1, 1)  # one head, one dim: a key's value is its logit
    logits = [torch.zeros(n * cs), torch.full((n * cs,), -5.0)]
    for lg in logits:
        lg[8 * cs :] = 5.0  # the tail, chunks 8-9
    logits[0][5 * cs : 6 * cs] = 3.0
    logits[1][3 * cs + 2] = 3.5
    keys = [lg.view(-1, 1, 1) for lg in logits]
    cand = (1, n - 2)
    s = attention_scores([q, q], keys, [1.0, 1.0], n, cs, cand)
    assert s[0] == 0 and s[-1] == 0 and s[-2] == 0  # forced chunks are not scored
    assert int(torch.argmax(s)) == 3
    summed = sum(layer_chunk_mass(q, k, 1.0, n, cs) for k in keys)
    assert int(torch.argmax(summed[1 : n - 2])) + 1 == 5  # what a plain sum would pick
    params = SelectionParams(page_budget=1, sink_chunks=1, recent_chunks=2, policy="attention")
    sel = select_chunks(n, params, scores=s)
    assert sel.picked.tolist() == [3] and not sel.fallback


def test_attention_policy_always_fills_the_budget():
    n = 40
    params = SelectionParams(page_budget=6, sink_chunks=1, recent_chunks=4, policy="attention", threshold=0.9)
    s = torch.zeros(n)
    s[5], s[20] = 0.6, 0.3  # every other candidate scores 0, far below the threshold
    sel = select_chunks(n, params, scores=s)
    assert sel.picked.numel() == 6 and {5, 20} <= set(sel.picked.tolist())


def test_empty_candidate_range_scores_nothing():
    q, k = torch.randn(2, 4), torch.randn(16, 2, 4)
    assert attention_scores([q], [k], [0.5], 4, 4, (2, 2)).tolist() == [0.0] * 4


def test_mismatched_heads_are_refused():
    with pytest.raises(ValueError, match="do not group"):
        layer_chunk_mass(torch.randn(5, 4), torch.randn(8, 2, 4), 1.0, 2, 4)
