"""Host mirror slot accounting and the release-range arithmetic of the radix cache."""

import pytest
import torch

from lsa_sglang.memory.host_mirror import HostMirror, HostMirrorFull
from lsa_sglang.memory.radix import _subtract


def test_host_mirror_alloc_free_and_budget():
    chunk_bytes = 2 * 3 * 16 * 2 * 8 * 4  # layers=3, chunk 16, 2 kv heads, dim 8, fp32
    m = HostMirror(3, 16, 2, 8, torch.float32, budget_bytes=chunk_bytes * 5 + 7, pin=False)
    assert m.capacity == 5 and m.buffer.shape == (5, 3, 2, 16, 2, 8)
    a = m.alloc(3)
    assert len(set(a)) == 3 and m.free_slots == 2
    with pytest.raises(HostMirrorFull, match="need 3 chunk slots, 2 of 5 free"):
        m.alloc(3)
    assert m.free_slots == 2  # a refused request takes nothing
    m.release(a)
    m.check_integrity()
    assert m.free_slots == 5 and sorted(m.alloc(5)) == [0, 1, 2, 3, 4]


def _mirror(n):
    chunk_bytes = 2 * 3 * 16 * 2 * 8 * 4
    return HostMirror(3, 16, 2, 8, torch.float32, budget_bytes=chunk_bytes * n, pin=False)


def test_host_mirror_shares_published_chunks_by_prefix_hash():
    m = _mirror(4)
    a, b = m.alloc(2)
    m.publish(a, b"h0", meta="keys0")
    assert m.lookup(b"h0") == a and m.refs(a) == 2  # second holder, no new slot
    assert m.lookup(b"other") is None
    assert m.used_slots == 2 and m.free_slots == 2
    m.release([a, b])  # first holder ends: a still held, b (unpublished) freed
    assert m.refs(a) == 1 and m.refs(b) == 0 and m.free_slots == 3
    m.release([a])  # last holder ends: a stays cached and findable, counted free
    assert m.cached_slots == 1 and m.free_slots == 4 and m.used_slots == 0
    assert m.lookup(b"h0") == a and m.meta[a] == "keys0" and m.cached_slots == 0
    m.release([a])
    m.check_integrity()


def test_host_mirror_evicts_least_recently_used_cached_chunks_only_when_needed():
    m = _mirror(3)
    s = m.alloc(3)
    for i, slot in enumerate(s):
        m.publish(slot, f"h{i}".encode())
    m.release([s[1]])
    m.release([s[0]])  # cached order: s1 then s0
    held = m.lookup(b"h0")  # s0 back in use: only s1 is evictable
    assert held == s[0]
    assert m.alloc(1) == [s[1]] and m.lookup(b"h1") is None  # evicted and unpublished
    with pytest.raises(HostMirrorFull):
        m.alloc(1)  # everything held: nothing evicted, nothing taken
    assert m.lookup(b"h2") == s[2] and m.refs(s[2]) == 2
    m.check_integrity()


def test_host_mirror_flush_forgets_cached_but_not_held():
    m = _mirror(2)
    a, b = m.alloc(2)
    m.publish(a, b"ha")
    m.publish(b, b"hb")
    m.release([a])
    assert m.flush() == 1
    assert m.lookup(b"ha") is None and m.lookup(b"hb") == b
    assert m.free_slots == 1 and m.refs(b) == 2
    m.check_integrity()


def test_host_mirror_too_small():
    with pytest.raises(ValueError, match="holds no chunk"):
        HostMirror(3, 16, 2, 8, torch.float32, budget_bytes=100, pin=False)


@pytest.mark.parametrize(
    "ranges,holes,expected",
    [
        ([(0, 640)], [], [(0, 640)]),
        ([(0, 640)], [(64, 128), (256, 384)], [(0, 64), (128, 256), (384, 640)]),
        ([(0, 640)], [(0, 64)], [(64, 640)]),
        ([(128, 640)], [(64, 192)], [(192, 640)]),  # hole straddling the protected prefix
        ([(0, 300)], [(0, 64), (64, 128), (128, 256)], [(256, 300)]),
        ([(0, 128)], [(0, 128)], []),
    ],
)
def test_subtract_released_ranges(ranges, holes, expected):
    assert _subtract(ranges, holes) == expected


def test_request_stats_hold_no_request_content():
    """`/lsa/stats` lists RequestStats as they are: counts, bytes, seconds and flags, plus the
    request id and the policy name. No field can hold prompt text, output text or token ids."""
    import dataclasses
    import json

    from lsa_sglang.config import POLICIES
    from lsa_sglang.memory.state import RequestStats

    types = {f.name: f.type for f in dataclasses.fields(RequestStats)}
    assert {n for n, t in types.items() if t not in ("int", "float", "bool")} == {"rid", "policy"}
    assert types["rid"] == "str" and types["policy"] == "str"
    assert RequestStats("r").policy in POLICIES
    # every *_tokens field is a count
    assert all(types[n] == "int" for n in types if "token" in n)
    row = dataclasses.asdict(RequestStats("r", prompt_tokens=7000, output_tokens=32))
    assert all(not isinstance(v, (list, dict, tuple, bytes)) for v in row.values())
    assert json.loads(json.dumps(row)) == row
