"""Window-0 scores from the backbone's own attention (indexer.attention_signal)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lsa_sglang.indexer import SelectionParams, attention_scores, layer_chunk_mass, select_chunks
from lsa_sglang.indexer.attention_signal import (
    copied_chunks, copy_start, evidence_swap, head_scores, list_siblings, quest_shares, quest_window0, raise_held,
    release_copied,
)


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


@pytest.mark.parametrize("spill", [1, 3, 4])
def test_spill_adds_the_previous_chunks_last_tokens(spill):
    g = torch.Generator().manual_seed(spill)
    cs, n = 4, 5
    q = torch.randn(2, 8, generator=g)
    k = torch.randn(n * cs + 2, 1, 8, generator=g)
    per_token = _loop_mass(q, k, 0.35, n * cs, 1)
    want = _loop_mass(q, k, 0.35, n, cs)
    want[1:] += per_token.view(n, cs)[:-1, cs - spill :].sum(1)
    torch.testing.assert_close(layer_chunk_mass(q, k, 0.35, n, cs, spill=spill).double(), want, rtol=1e-5, atol=1e-6)


def test_spill_keeps_the_rest_of_a_fact_that_straddles_a_chunk_boundary():
    """The rows attend to a key at the end of chunk 3 whose value lies in chunk 4; chunk 6 holds
    a weaker look-alike. Without spill the one page left after chunk 3 goes to chunk 6 and the
    value is lost; with it, to chunk 4."""
    cs, n = 8, 10
    q = torch.ones(1, 1)
    logits = torch.zeros(n * cs)
    logits[4 * cs - 2 :4 * cs] = 4.0  # the key, last two tokens of chunk 3
    logits[6 * cs + 1] = 3.0  # the look-alike
    keys = [logits.view(-1, 1, 1)]
    params = SelectionParams(page_budget=2, sink_chunks=1, recent_chunks=2, policy="attention")
    picks = {}
    for spill in (0, 2):
        s = attention_scores([q], keys, [1.0], n, cs, (1, n - 2), spill=spill)
        picks[spill] = sorted(select_chunks(n, params, scores=s).picked.tolist())
    assert picks == {0: [3, 6], 2: [3, 4]}


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


def test_rows_are_causal_and_add_up(monkeypatch):
    """Row r of R sits at position T - R + r: it does not see later keys, and the rows' masses
    add up (each row's softmax sums to one per head)."""
    g = torch.Generator().manual_seed(3)
    cs, n, d, heads, rows = 4, 6, 8, 2, 3
    t = n * cs + 2  # a partial chunk at the end, its mass not counted
    k = torch.randn(t, 1, d, generator=g)
    q = torch.randn(rows, heads, d, generator=g)
    want = torch.zeros(t, dtype=torch.float64)
    for r in range(rows):
        seen = t - rows + r + 1
        for h in range(heads):
            lg = (k[:seen, 0].double() @ q[r, h].double()) * 0.5
            want[:seen] += torch.softmax(lg, 0)
    got = layer_chunk_mass(q, k, 0.5, n, cs)
    torch.testing.assert_close(got.double(), want[: n * cs].view(n, cs).sum(1), rtol=1e-5, atol=1e-6)
    per_head = layer_chunk_mass(q, k, 0.5, n, cs, per_head=True)
    assert per_head.shape == (heads, n)
    torch.testing.assert_close(per_head.sum(0), got)
    import lsa_sglang.indexer.attention_signal as signal

    monkeypatch.setattr(signal, "_BLOCK_ELEMENTS", heads * t)  # one row per block: same masses
    torch.testing.assert_close(layer_chunk_mass(q, k, 0.5, n, cs), got)


def _capture():
    from torch import nn

    from lsa_sglang.models.adapter import HiddenCapture

    layer = nn.Module()
    layer.self_attn = nn.Identity()
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    return HiddenCapture(model, (0,))


def test_query_rows_carry_over_a_chunked_prefill_and_never_across_requests():
    capture = _capture()
    q = torch.arange(200.0).view(200, 1, 1)  # row i's query is i
    # request a on pool row 3 wants 64 rows, prefilled in two steps of 150 and 50 tokens
    capture.record_queries(0, q[:150], [3], ["a"], torch.arange(150 - 64, 150), [64], [64], 0.5)
    capture.record_queries(0, q[150:200], [3], ["a"], torch.arange(0, 50), [50], [64], 0.5)
    rows, scale = capture.take_queries(3)[0]
    assert scale == 0.5 and rows.flatten().tolist() == [float(i) for i in range(200 - 64, 200)]
    assert capture.take_queries(3) is None  # handed over once
    # a new request on the same pool row starts from nothing, whatever the last one left
    capture.record_queries(0, q[:10], [3], ["a"], torch.arange(0, 10), [10], [64], 0.5)
    capture.record_queries(0, q[:4], [3], ["b"], torch.arange(0, 4), [4], [64], 0.5)
    assert capture.take_queries(3)[0][0].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    # one row wanted: only the last prompt token's, beside a request that wants none
    capture.record_queries(0, q[:30], [3, 4], ["c", "d"], torch.tensor([19, 29]), [1, 1], [1, 0], 0.5)
    assert capture.take_queries(3)[0][0].flatten().tolist() == [19.0] and capture.take_queries(4) is None


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_quest_shares_match_the_definition_and_bound_the_keys(heads, kv_heads):
    g = torch.Generator().manual_seed(heads)
    n, cs, layers, d = 6, 5, 3, 8
    keys = torch.randn(n, cs, layers, kv_heads, d, generator=g)
    kmin, kmax = keys.amin(1), keys.amax(1)
    queries = [torch.randn(heads, d, generator=g) for _ in range(layers)]
    got = quest_shares(queries, kmin, kmax, [0.3] * layers)
    want = torch.zeros(n, dtype=torch.float64)
    for l, q in enumerate(queries):
        mass = torch.zeros(n, dtype=torch.float64)
        for h in range(heads):
            grp = h // (heads // kv_heads)
            bound = []
            for c in range(n):
                corners = [max(float(q[h, i] * kmin[c, l, grp, i]), float(q[h, i] * kmax[c, l, grp, i])) for i in range(d)]
                bound.append(sum(corners))
                assert all(float(q[h] @ keys[c, t, l, grp]) <= bound[-1] + 1e-5 for t in range(cs))  # an upper bound
            mass += torch.softmax(torch.tensor(bound, dtype=torch.float64) * 0.3, 0)
        want = torch.maximum(want, mass / mass.sum())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_quest_window0_bounds_each_candidate_chunk_from_its_keys():
    """Window 0 of the `quest` policy: the candidate chunks' min/max over their own tokens' keys
    (a trailing partial chunk and the chunks outside the range play no part), scored as
    `quest_shares`; a key one layer's query points at wins its chunk the top score even when
    every other layer's keys are noise."""
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, cs, n, layers = 4, 2, 8, 4, 7, 3
    keys = [torch.randn(n * cs + 2, kv_heads, d, generator=g) for _ in range(layers)]  # + a partial chunk
    queries = [torch.randn(heads, d, generator=g) for _ in range(layers)]
    lo, hi = 1, 6
    got = quest_window0(queries, iter(keys), [0.3] * layers, n, cs, (lo, hi))
    pages = torch.stack([k[: n * cs].view(n, cs, kv_heads, d) for k in keys], 2)  # [n, cs, L, Hk, D]
    want = quest_shares(queries, pages[lo:hi].amin(1), pages[lo:hi].amax(1), [0.3] * layers)
    torch.testing.assert_close(got[lo:hi], want)
    assert got[:lo].eq(0).all() and got[hi:].eq(0).all()
    assert float(got.sum()) > 0
    keys[1][4 * cs + 2] = 8.0 * queries[1][0]  # chunk 4 holds a key layer 1's head 0 reads
    got = quest_window0(queries, iter(keys), [0.3] * layers, n, cs, (lo, hi))
    assert int(got.argmax()) == 4
    assert quest_window0(queries, iter(keys), [0.3] * layers, n, cs, (3, 3)).eq(0).all()


def test_evidence_swap_takes_the_best_outsider_for_the_weakest_insider():
    resident = torch.tensor([True, True, False, False, True])
    held = torch.tensor([0.30, 0.05, 0.20, 0.00, 0.50])  # chunk 1 is the weakest resident one
    assert evidence_swap(torch.tensor([0.1, 0.0, 0.04, 0.06, 0.2]), held, resident) == (3, 1)
    # the outsider must beat what the weakest resident chunk ever drew, not what it draws now
    assert evidence_swap(torch.tensor([0.1, 0.0, 0.05, 0.04, 0.2]), held, resident) is None
    assert evidence_swap(torch.rand(5), held, torch.ones(5, dtype=torch.bool)) is None
    assert evidence_swap(torch.rand(5), held, torch.zeros(5, dtype=torch.bool)) is None
    # `allowed`: only those outsiders may come in (chunk 3 barred, chunk 2 does not beat 0.05)
    share = torch.tensor([0.1, 0.0, 0.04, 0.06, 0.2])
    assert evidence_swap(share, held, resident, torch.tensor([True, True, True, False, True])) is None
    assert evidence_swap(torch.tensor([0.1, 0.0, 0.07, 0.09, 0.2]), held, resident,
                         torch.tensor([False, False, True, False, False])) == (2, 1)


def test_held_shares_rise_in_place_to_what_the_step_read():
    held = torch.tensor([0.6, 0.3, 0.0])
    assert raise_held(held, torch.tensor([0.0, 0.25, 0.2])) is held
    torch.testing.assert_close(held, torch.tensor([0.6, 0.3, 0.2]))


def test_copied_chunks_are_those_holding_the_answers_last_tokens_as_a_run():
    """Chunk size 8: the value 5 0 4 2 9 sits inside chunk 1 (positions 10..14) and 4 2 again
    at the start of chunk 3. The answer copying "5 0 4" points at chunk 1 only; "4 2" at
    chunks 1 and 3; a run cut by a chunk boundary points at the chunk holding its end; a chunk
    not asked about, or a run that only matches the answer's own copy do not count."""
    words = [100 + i for i in range(40)]
    prompt = words[:10] + [5, 0, 4, 2, 9] + words[10:19] + [4, 2] + words[19:25]
    assert len(prompt) == 32 and prompt[24:26] == [4, 2]
    assert copied_chunks(prompt + [7, 5, 0, 4], 3, [0, 1, 2, 3], 8) == [1]
    assert copied_chunks(prompt + [7, 5, 0, 4, 2], 2, [0, 1, 2, 3], 8) == [1, 3]
    assert copied_chunks(prompt + [7, 5, 0, 4, 2], 2, [3], 8) == [3]
    assert copied_chunks(prompt + [7, 5, 0, 4, 2], 5, [0, 1, 2, 3], 8) == []  # no run of 5 (7 5 0 4 2)
    cut = words[:6] + [5, 0, 4, 2] + words[6:12]  # 5 0 | 4 2 across the boundary at 8
    assert copied_chunks(cut + [5, 0, 4], 3, [0, 1], 8) == [1]  # "5 0" ends chunk 0, "4" opens chunk 1
    assert copied_chunks(cut + [5, 0, 4], 3, [0], 8) == []
    assert copied_chunks(cut + [5, 0], 2, [0, 1], 8) == [0]
    assert copied_chunks(cut + [5, 0, 4, 2], 3, [0, 1], 8) == [1]
    assert copied_chunks([1, 2, 3, 1, 2, 3], 3, [0], 8) == [0]  # an earlier run in the same chunk
    assert copied_chunks([9, 1, 2, 3], 3, [0], 8) == []  # the run is the answer's own tail
    assert copied_chunks(prompt + [5, 0, 4], 0, [1], 8) == []


def test_a_copied_chunk_holds_its_page_through_the_copy_then_lets_an_unread_one_in():
    """Candidates are chunks 5..7 (lo = 5). Chunk 5 (resident) was read once (0.6); chunk 7 (not
    resident) draws 0.3. Kept for good chunk 5 never leaves. While the answer copies it, it
    holds its page even when a step reads it less than chunk 7 (held 1); at the first step after
    the copy it holds only what that step read of it (0.1), so chunk 7 takes its page. A chunk
    outside the candidate range is left alone."""
    resident = torch.tensor([True, True, False])
    share = torch.tensor([0.1, 0.35, 0.3])
    held = torch.tensor([0.6, 0.4, 0.0])
    raise_held(held, share)
    assert evidence_swap(share, held, resident) is None
    assert release_copied(held, share, [5, 9], [], 5, 8) == 0  # copying chunk 5 (and 9, not a candidate)
    torch.testing.assert_close(held, torch.tensor([1.0, 0.4, 0.3]))
    assert evidence_swap(share, held, resident) is None
    raise_held(held, share)
    assert release_copied(held, share, [5], [5], 5, 8) == 0  # still copying
    assert evidence_swap(share, held, resident) is None
    raise_held(held, share)
    assert release_copied(held, share, [], [5, 9], 5, 8) == 1  # the copy ended
    torch.testing.assert_close(held, torch.tensor([0.1, 0.4, 0.3]))
    assert evidence_swap(share, held, resident) == (2, 0)
    assert release_copied(held, torch.zeros(3), [4, 8], [3], 5, 8) == 0  # outside [5, 8): nothing changes
    torch.testing.assert_close(held, torch.tensor([0.1, 0.4, 0.3]))


def _list_prompt():
    """100 tokens of filler (0) holding a list of three items, each after the lead-in 7 8 9: at
    10 (chunk 0 of 16), 45 (chunk 2) and 78 (its four tokens cross from chunk 4 into 5); a
    look-alike lead-in 6 8 9 before a fourth item at 60."""
    p = [0] * 100
    for at, lead, item in [(10, [7, 8, 9], [1, 2, 3, 4]), (45, [7, 8, 9], [5, 6, 3, 1]),
                           (60, [6, 8, 9], [5, 5, 5, 5]), (78, [7, 8, 9], [2, 2, 3, 3])]:
        p[at - 3 : at], p[at : at + 4] = lead, item
    return p


def test_copy_start_is_where_the_answers_copy_began():
    """The answer copies item 45 (5 6 3 1) after a token that is not the prompt's (4): found from
    its last three tokens, extended back as far as the answer agrees with the prompt, never past
    the answer's own start; None when the chunk holds no such run."""
    p = _list_prompt()
    assert copy_start(p + [4, 5, 6, 3], 3, 2, 16, 4) == 45
    assert copy_start(p + [4, 5, 6, 3, 1], 3, 3, 16, 5) == 45  # the run 6 3 1 ends in chunk 3
    assert copy_start(p + [9, 5, 6, 3], 3, 2, 16, 4) == 44  # the lead-in's last token copied too
    assert copy_start(p + [9, 5, 6, 3], 3, 2, 16, 3) == 45  # the answer is only the last three
    assert copy_start(p + [4, 5, 6, 3], 3, 1, 16, 4) is None  # not in chunk 1
    assert copy_start(p + [5, 6, 3], 0, 2, 16, 3) is None


def test_list_siblings_are_the_items_after_the_same_lead_in():
    """Items after the same three tokens, the next ones in document order first, then the earlier
    ones; an item crossing a chunk boundary brings both chunks; the look-alike lead-in (6 8 9)
    and the copied item's own chunk are not siblings; a shorter lead-in (8 9) takes the
    look-alike too (each item spans as many tokens as the lead-in); nothing when the lead-in does
    not recur, recurs more than `most` times (filler) or cannot be read."""
    p = _list_prompt()
    assert list_siblings(p, 45, 3, 16, 8) == [4, 5, 0]
    assert list_siblings(p, 10, 3, 16, 8) == [2, 4, 5]
    assert list_siblings(p, 78, 3, 16, 8) == [0, 2]
    assert list_siblings(p, 45, 2, 16, 8) == [3, 4, 0]
    assert list_siblings(p, 45, 3, 16, 2) == [4, 5, 0] and list_siblings(p, 45, 3, 16, 1) == []
    assert list_siblings(p, 30, 3, 16, 8) == []  # the lead-in 0 0 0 is filler: it recurs 60 times
    p2 = list(p)
    p2[42:45] = [1, 1, 1]
    assert list_siblings(p2, 45, 3, 16, 8) == []
    assert list_siblings(p, 2, 3, 16, 8) == [] and list_siblings(p, 45, 0, 16, 8) == []


def test_request_tokens_read_like_the_joined_list():
    """`RequestTokens` (prompt then answer, not joined) gives the same items, slices and copy
    checks as the joined list, for every slice the copy checks take."""
    from types import SimpleNamespace

    from lsa_sglang.memory.window import RequestTokens

    rng = random.Random(3)
    for trial in range(30):
        prompt = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        answer = [rng.randrange(6) for _ in range(rng.randrange(0, 12))]
        joined, view = prompt + answer, RequestTokens(SimpleNamespace(origin_input_ids=prompt, output_ids=answer))
        assert len(view) == len(joined)
        for a in range(-len(joined) - 2, len(joined) + 3):
            assert view[a:] == joined[a:] and view[:a] == joined[:a]
            for b in range(a, a + 9):
                assert view[a:b] == joined[a:b], (a, b)
            if -len(joined) <= a < len(joined):
                assert view[a] == joined[a]
        for n in (1, 2, 3):
            chunks = range(len(joined) // 4 + 1)
            assert copied_chunks(view, n, chunks, 4) == copied_chunks(joined, n, chunks, 4)
    with pytest.raises(ValueError, match="no step"):
        RequestTokens(SimpleNamespace(origin_input_ids=[1, 2], output_ids=[3]))[::2]


def test_head_scores_read_only_the_listed_heads():
    """`attention_heads`: the listed heads' chunk masses (each head a softmax over the prompt, as
    `layer_chunk_mass` per head) added over heads and layers, renormalised over the candidates.
    A head left out that stares at another chunk does not move the scores, and the pick is the
    chunk the listed head reads even where a layer's summed heads favour another."""
    g = torch.Generator().manual_seed(5)
    cs, n, d, heads, kv_heads = 4, 10, 8, 4, 2
    keys = [torch.randn(n * cs, kv_heads, d, generator=g) * 0.1 for _ in range(2)]
    queries = [torch.randn(3, heads, d, generator=g) * 0.1 for _ in range(2)]
    keys[1][6 * cs + 1, 0] = 4.0  # head 1 of layer 1 (KV head 0) reads chunk 6
    queries[1][:, 1] = 4.0
    keys[1][3 * cs + 2, 1] = 4.0  # heads 2 and 3 of layer 1 (KV head 1) read chunk 3
    queries[1][:, 2:] = 4.0
    listed = [[0], [1]]
    got = head_scores(queries, keys, [0.5, 0.5], listed, n, cs, (1, n - 1))
    want = torch.zeros(n, dtype=torch.float64)
    for q, k, hs in zip(queries, keys, listed):
        want[1 : n - 1] += layer_chunk_mass(q, k, 0.5, n, cs, per_head=True)[hs, 1 : n - 1].sum(0).double()
    want /= want.sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[0] == 0 and got[n - 1] == 0 and int(got.argmax()) == 6
    layers = attention_scores(queries, keys, [0.5, 0.5], n, cs, (1, n - 1))
    assert int(layers.argmax()) == 3  # the layer rule sums heads 2 and 3 of layer 1
    moved = [k.clone() for k in keys]
    moved[1][8 * cs, 1] = 6.0  # an unlisted head now reads chunk 8 instead
    torch.testing.assert_close(head_scores(queries, moved, [0.5, 0.5], listed, n, cs, (1, n - 1)), got)
