"""Chunk copies host mirror <-> device pool, torch fallback on CPU: bitwise exact, all layers."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton's first import; see test_kernels_triton_decode.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lsa_sglang.kernels import as_pages, contiguous_runs, copy_chunks_to_device, copy_chunks_to_host, host_mirror_shape  # noqa: E402

LAYERS, CHUNK, HKV, DIM = 3, 4, 2, 8
HOST_SLOTS, DEVICE_PAGES = 10, 8


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so NaN payloads and -0.0 compare bit for bit."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


def _special(t: torch.Tensor) -> torch.Tensor:
    """Sprinkle NaN, infinities and negative zero over random data."""
    flat = t.view(-1)
    flat[::7] = float("nan")
    flat[1::11] = float("inf")
    flat[2::13] = -float("inf")
    flat[3::17] = -0.0
    return t


def _pool(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    host = _special(torch.randn(host_mirror_shape(HOST_SLOTS, LAYERS, CHUNK, HKV, DIM), generator=gen).to(dtype))
    k = [_special(torch.randn(DEVICE_PAGES * CHUNK, HKV, DIM, generator=gen).to(dtype)) for _ in range(LAYERS)]
    v = [_special(torch.randn(DEVICE_PAGES * CHUNK, HKV, DIM, generator=gen).to(dtype)) for _ in range(LAYERS)]
    return host, k, v


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_copy_to_device_is_bitwise_and_touches_only_target_pages(dtype, backend):
    host, k, v = _pool(dtype, 1)
    k0, v0 = [t.clone() for t in k], [t.clone() for t in v]
    slots, pages = [3, 4, 5, 9, 0], [7, 2, 3, 0, 5]
    assert copy_chunks_to_device(host, slots, k, v, pages, backend=backend) is None
    for layer in range(LAYERS):
        kp, vp = as_pages(k[layer], CHUNK), as_pages(v[layer], CHUNK)
        for slot, page in zip(slots, pages):
            assert _same_bits(kp[page], host[slot, layer, 0])
            assert _same_bits(vp[page], host[slot, layer, 1])
        for page in set(range(DEVICE_PAGES)) - set(pages):
            assert _same_bits(kp[page], as_pages(k0[layer], CHUNK)[page])
            assert _same_bits(vp[page], as_pages(v0[layer], CHUNK)[page])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_to_host_is_bitwise_and_touches_only_target_slots(dtype):
    host, k, v = _pool(dtype, 2)
    before = host.clone()
    pages, slots = torch.tensor([1, 6, 2]), torch.tensor([8, 0, 1])
    assert copy_chunks_to_host(k, v, pages, host, slots) is None
    for layer in range(LAYERS):
        for page, slot in zip(pages.tolist(), slots.tolist()):
            assert _same_bits(host[slot, layer, 0], as_pages(k[layer], CHUNK)[page])
            assert _same_bits(host[slot, layer, 1], as_pages(v[layer], CHUNK)[page])
    untouched = sorted(set(range(HOST_SLOTS)) - set(slots.tolist()))
    assert _same_bits(host[untouched], before[untouched])


def test_round_trip_through_other_slots_and_pages():
    host, k, v = _pool(torch.bfloat16, 3)
    original = host[[2, 3, 4, 7]].clone()
    copy_chunks_to_device(host, [2, 3, 4, 7], k, v, [0, 1, 6, 4])
    copy_chunks_to_host(k, v, [0, 1, 6, 4], host, [5, 6, 8, 9])
    assert _same_bits(host[[5, 6, 8, 9]], original)


def test_empty_lists_are_no_ops():
    host, k, v = _pool(torch.float32, 4)
    host0, k0, v0 = host.clone(), [t.clone() for t in k], [t.clone() for t in v]
    assert copy_chunks_to_device(host, [], k, v, []) is None
    assert copy_chunks_to_host(k, v, torch.tensor([], dtype=torch.long), host, torch.tensor([], dtype=torch.long)) is None
    assert _same_bits(host, host0)
    assert all(_same_bits(a, b) for a, b in zip(k + v, k0 + v0))


def test_duplicate_host_slots_may_fill_several_pages():
    host, k, v = _pool(torch.float32, 5)
    copy_chunks_to_device(host, [4, 4], k, v, [1, 2])
    for layer in range(LAYERS):
        assert _same_bits(as_pages(k[layer], CHUNK)[1], as_pages(k[layer], CHUNK)[2])


@pytest.mark.parametrize(
    "slots, pages, message",
    [
        ([1, 2], [3], "host slots for"),
        ([HOST_SLOTS], [0], "host slot out of range"),
        ([0], [DEVICE_PAGES], "device page out of range"),
        ([0, 1], [2, 2], "distinct"),
    ],
)
def test_bad_indices_raise(slots, pages, message):
    host, k, v = _pool(torch.float32, 6)
    with pytest.raises(ValueError, match=message):
        copy_chunks_to_device(host, slots, k, v, pages)


def test_layout_mismatches_raise():
    host, k, v = _pool(torch.float32, 7)
    with pytest.raises(ValueError, match="layers"):
        copy_chunks_to_device(host, [0], k[:-1], v[:-1], [0])
    with pytest.raises(ValueError, match="dtype"):
        copy_chunks_to_device(host, [0], [t.double() for t in k], v, [0])
    with pytest.raises(ValueError, match="host mirror"):
        copy_chunks_to_device(host[:, :, 0], [0], k, v, [0])
    with pytest.raises(ValueError, match="distinct"):
        copy_chunks_to_host(k, v, [0, 1], host, [3, 3])


def test_contiguous_runs():
    assert contiguous_runs([]) == []
    assert contiguous_runs([3, 4, 5, 9, 0, 1]) == [(3, 0, 3), (9, 3, 1), (0, 4, 2)]
    assert contiguous_runs([2, 2]) == [(2, 0, 1), (2, 1, 1)]
