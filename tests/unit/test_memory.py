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
    m.free(a)
    m.check_integrity()
    assert m.free_slots == 5 and sorted(m.alloc(5)) == [0, 1, 2, 3, 4]


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
