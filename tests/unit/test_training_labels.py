"""Golden labels on hand-made attention where the answer is known; attention rows vs brute force."""

import pytest
import torch

from lsa_sglang.indexer.selector import SelectionParams, candidate_chunks
from lsa_sglang.training.capture import attention_rows, rotate
from lsa_sglang.training.dump import DumpParams, sample_positions
from lsa_sglang.training.labels import (
    candidate_mask,
    chunk_mass,
    default_vote_layers,
    default_votes,
    top_p_picks,
    window_positives,
)


def test_chunk_mass_sums_positions_per_chunk_and_pads_the_partial_chunk():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.0, 0.5, 0.5]])
    m = chunk_mass(probs, 2)
    assert torch.allclose(m, torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.5, 0.5]]))


def test_top_p_picks_smallest_prefix_reaching_p():
    mass = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_picks(mass, 0.6).tolist() == [[True, True, False, False]]
    assert top_p_picks(mass, 0.5).tolist() == [[True, False, False, False]]  # 0.5 already reaches p
    assert top_p_picks(mass, 1.0).tolist() == [[True, True, True, True]]


def test_top_p_excludes_the_sink_from_total_and_picks():
    # Without the sink the rest renormalises to [0.6, 0.3, 0.1]: chunk 1 alone reaches p = 0.6.
    mass = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    sink = torch.tensor([True, False, False, False])
    assert top_p_picks(mass, 0.6, sink).tolist() == [[False, True, False, False]]


def test_top_p_ties_break_to_the_lower_chunk_and_zero_rows_pick_nothing():
    mass = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    assert top_p_picks(mass, 0.5).tolist() == [[True, True, False, False], [False] * 4]
    with pytest.raises(ValueError):
        top_p_picks(mass, 0.0)


def test_full_label_construction_on_hand_made_attention():
    """Three layers, a window of two rows, five chunks of two tokens; the answer by hand:
    row 0: layers pick {2}, {2}, {3}; row 1: {4}, {4}, {2}. With >= 2 votes: row 0 -> {2},
    row 1 -> {4}; union -> {2, 4}; only chunks complete at t = 8 (ids < 4) count -> {2}."""
    cs = 2

    def row(chunk_masses):  # spread each chunk's mass evenly over its two tokens
        return torch.tensor(chunk_masses, dtype=torch.float64).repeat_interleave(cs) / cs

    # chunk 0 is the sink: huge mass that must not win anything.
    layers = [
        [row([0.9, 0.0, 0.08, 0.01, 0.01]), row([0.9, 0.01, 0.01, 0.0, 0.08])],
        [row([0.5, 0.05, 0.4, 0.05, 0.0]), row([0.5, 0.0, 0.05, 0.05, 0.4])],
        [row([0.2, 0.0, 0.1, 0.7, 0.0]), row([0.2, 0.0, 0.7, 0.0, 0.1])],
    ]
    sink = torch.arange(5) < 1
    votes = torch.zeros(2, 5, dtype=torch.int64)
    for rows in layers:
        m = chunk_mass(torch.stack(rows).float(), cs)
        votes += top_p_picks(m, 0.6, sink).long()
    assert votes.tolist() == [[0, 0, 2, 1, 0], [0, 0, 1, 0, 2]]
    golden = votes >= 2
    pos = window_positives(golden[None], torch.tensor([4]))
    assert pos.tolist() == [[False, False, True, False, False]]
    # the tail would have been positive had it been complete
    assert window_positives(golden[None], torch.tensor([5])).tolist() == [[False, False, True, False, True]]


@pytest.mark.parametrize("n", [0, 1, 3, 5, 6, 9, 40])
def test_candidate_mask_matches_the_selector(n):
    params = SelectionParams(sink_chunks=1, recent_chunks=4)
    got = candidate_mask(torch.tensor([n]), 48, 1, 4)[0].nonzero().flatten()
    assert got.tolist() == candidate_chunks(n, params).tolist()


def test_default_votes_and_layers():
    assert default_votes(21) == 9 and default_votes(17) == 7 and default_votes(1) == 1 and default_votes(2) == 1
    assert default_vote_layers(30) == tuple(range(2, 30)) and default_vote_layers(3) == (0, 1, 2)


def _brute_rows(q, k, rows, scale):
    H, Hk = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(H // Hk, dim=1)  # [T, H, D]
    logits = torch.einsum("rhd,thd->rht", q.double(), kk.double()) * scale
    mask = torch.arange(k.shape[0])[None, None, :] > rows[:, None, None]
    return torch.softmax(logits.masked_fill(mask, float("-inf")), -1).mean(1)


def test_attention_rows_equals_brute_force_softmax_with_gqa():
    g = torch.Generator().manual_seed(0)
    T, H, Hk, D = 37, 6, 2, 8
    q = torch.randn(11, H, D, generator=g)
    k = torch.randn(T, Hk, D, generator=g)
    rows = torch.tensor([0, 3, 5, 8, 15, 16, 17, 20, 30, 35, 36])
    want = _brute_rows(q, k, rows, 0.3)
    got = attention_rows(q, k, rows, 0.3, block=4)
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(11), atol=1e-5)
    by_chunk = attention_rows(q, k, rows, 0.3, block=3, chunk_size=8)  # 37 tokens: partial last chunk
    assert torch.allclose(by_chunk.double(), chunk_mass(want, 8), atol=1e-6)


def test_rotate_is_neox_rope():
    x = torch.randn(3, 2, 8)
    ang = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    y = rotate(x, cos, sin)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * ang)[:, None, :]
    assert torch.allclose(y, torch.cat([z.real, z.imag], -1), atol=1e-6)


def test_sample_positions_focus_range_and_determinism():
    p = DumpParams(docs="x", counts=None, doc_tokens=1024, positions=8, focus_fraction=0.5, min_position=256,
                   chunk_size=16, tau=32, recent_chunks=4, sink_chunks=1)
    a = sample_positions(1000, [600, 900], p, torch.Generator().manual_seed(1))
    b = sample_positions(1000, [600, 900], p, torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist() and len(a) == 8 and len(set(a.tolist())) == 8
    assert int(a.min()) >= 256 and int(a.max()) <= 1000 - 32
    for f in (600, 900):  # each focus token gets a window that covers it
        assert any(t < f < t + 32 for t in a.tolist())
    assert sample_positions(200, [], p, torch.Generator()).numel() == 0  # too short
