"""The window cycle (memory/window.py) at a boundary, against a small stand-in for SGLang's model
runner and KV pools (`StandInRunner`, `StandInAllocator`: tensors and a free list, named as such),
with the real DeviceCells, HostMirror and chunk tables."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lsa_sglang.config import LSAConfig
from lsa_sglang.memory import window as window_mod
from lsa_sglang.memory.cells import DeviceCells
from lsa_sglang.memory.host_mirror import HostMirror
from lsa_sglang.memory.state import SENTINEL_SLOT, ChunkTable, Pending, RequestStats, ServerStats, carry_swaps
from lsa_sglang.memory.window import WindowCycle

CS, LAYERS, HEADS, DIM, PAGES = 8, 2, 1, 2, 32


class StandInAllocator:
    """Stand-in for SGLang's paged token allocator: whole pages from a free list."""

    def __init__(self, pages: int) -> None:
        self.free_pages = list(range(1, pages))  # page 0 holds the sentinel slot

    def available_size(self) -> int:
        return len(self.free_pages) * CS

    def alloc(self, tokens: int):
        n = tokens // CS
        if n > len(self.free_pages):
            return None
        got, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        return (torch.tensor(got)[:, None] * CS + torch.arange(CS)).reshape(-1)

    def free(self, slots) -> None:
        self.free_pages += sorted(set((slots // CS).tolist()))


class StandInPool:
    """Stand-in for SGLang's KV pool: one K and one V buffer per layer."""

    def __init__(self) -> None:
        self.layer_num = LAYERS
        self.k = [torch.zeros(PAGES * CS, HEADS, DIM) for _ in range(LAYERS)]
        self.v = [torch.zeros(PAGES * CS, HEADS, DIM) for _ in range(LAYERS)]

    def get_key_buffer(self, i):
        return self.k[i]

    def get_value_buffer(self, i):
        return self.v[i]


def _cycle(chunks: int, resident: set[int], config: LSAConfig):
    """A request row with `chunks` mirrored chunks (chunk c's KV all equal to c + 1), `resident`
    of them on the device."""
    runner = SimpleNamespace(  # stand-in for SGLang's ModelRunner: the attributes DeviceCells reads
        req_to_token_pool=SimpleNamespace(req_to_token=torch.full((2, 512), SENTINEL_SLOT, dtype=torch.int32)),
        token_to_kv_pool=StandInPool(), token_to_kv_pool_allocator=StandInAllocator(PAGES),
    )
    cells = DeviceCells(runner, CS, poison_released=True)
    host = HostMirror(LAYERS, CS, HEADS, DIM, torch.float32, 64 * cells.page_bytes, pin=False)
    capture = SimpleNamespace(layers=(0,), take_queries=lambda idx: None, last_hidden=lambda idx: None)
    cycle = WindowCycle(cells, host, capture, None, ServerStats(), req_of=lambda t: None, reserved_tokens=lambda: 0)
    slots = host.alloc(chunks)
    for c, s in enumerate(slots):
        host.buffer[s] = c + 1
    table = ChunkTable("r", 0, config, chunks * CS, host_slots=slots, stats=RequestStats("r"))
    cycle._swap_in(table, set(), sorted(resident))
    table.swapped_in = []  # admission's set, not an in-window swap
    return cycle, table


def _check(cycle: WindowCycle, table: ChunkTable) -> None:
    """Every resident chunk's cell holds that chunk's KV; every other chunk points at the sentinel;
    every page is either free or in use (resident or prefetched), never both."""
    table.check_integrity(cycle.cells.req_to_token[0], CS)
    used = {cycle.cells.page_of(0, c) for c in table.resident}
    used |= set(table.pending.new_pages.values()) if table.pending is not None else set()
    assert not used & set(cycle.cells.allocator.free_pages)
    assert len(used) + len(cycle.cells.allocator.free_pages) == PAGES - 1
    for c in table.resident:
        slots = cycle.cells.page_slots([cycle.cells.page_of(0, c)])
        assert torch.all(cycle.cells.k_buffers[1][slots] == c + 1), c


def test_carry_swaps():
    # 1 released by a swap that brought 7: 7 takes its place; 4 is being prefetched
    assert carry_swaps({0, 1, 2, 4}, {0, 2, 3, 7}, {4}, [7]) == ({0, 2, 4, 7}, [])
    # released with nothing brought: copied back in, so the set keeps its size
    assert carry_swaps({0, 1, 2, 4}, {0, 2, 3}, {4}, []) == ({0, 1, 2, 4}, [1])
    # a brought chunk whose victim the target dropped anyway takes the weakest target chunk's
    # place only when its evidence is stronger, never a sink or a chunk being fetched
    strength = {2: 0.1, 7: 0.5, 0: 0.0, 4: 0.0}.get
    assert carry_swaps({0, 2, 4}, {0, 2, 7}, {4}, [7], strength, range(1, 8)) == ({0, 4, 7}, [])
    assert carry_swaps({0, 2, 4}, {0, 2, 7}, {4}, [7], {2: 0.9, 7: 0.5}.get, range(1, 8)) == ({0, 2, 4}, [])
    assert carry_swaps({0, 2, 4}, {0, 2, 7}, {4}, [7]) == ({0, 2, 4}, [])  # no evidence: the selection stands


@pytest.mark.parametrize("prefetched", [True, False])
def test_boundary_keeps_in_window_swaps_and_the_budget(prefetched):
    """At the last boundary the selection kept {0, 1, 2} and chose 4 over 3; during the window
    re-selection released 1 for 7. The next boundary swaps in {0, 2, 4, 7}: four chunks as
    selected, 7 kept, nothing leaked. (Before: {0, 2, 4}, 7 dropped and the set a chunk short.)"""
    config = LSAConfig(chunk_size=CS, tau=4, sink_chunks=1, recent_tokens=CS, page_budget=3, policy="recency")
    cycle, table = _cycle(10, {0, 1, 2, 3}, config)
    if prefetched:
        (page,) = cycle.cells.alloc(1)
        cycle.cells.load(cycle.host.buffer, [table.host_slots[4]], [page])
        table.pending = Pending({0, 1, 2, 4}, {4: page}, None)
    else:
        table.pending = Pending({0, 1, 2, 4}, {}, None, deferred=[4])
    assert cycle._swap_in(table, table.resident - {1}, [7])
    _check(cycle, table)
    cycle.boundary(table, 10 * CS + 1)
    assert table.resident == {0, 2, 4, 7}
    assert table.swapped_in == []
    _check(cycle, table)


def test_boundary_copies_back_a_selected_chunk_a_swap_released_for_nothing():
    config = LSAConfig(chunk_size=CS, tau=4, sink_chunks=1, recent_tokens=CS, page_budget=3, policy="recency")
    cycle, table = _cycle(10, {0, 1, 2, 3}, config)
    table.pending = Pending({0, 1, 2, 3}, {}, None)
    cycle.apply(table, {0, 2, 3}, {})  # a swap that released 1 and brought nothing (none free)
    cycle.boundary(table, 10 * CS + 1)
    assert table.resident == {0, 1, 2, 3}
    _check(cycle, table)


def test_write_through_orders_its_side_stream_copy_before_the_pages_are_reused_with_stand_in_cuda(monkeypatch):
    """On CUDA the host copy runs on a side stream and returns an event; the decode stream must
    wait for it before the pages it reads can be reused (they are freed once the set is
    selected). Stand-ins: the event and the current CUDA stream (no GPU here)."""
    config = LSAConfig(chunk_size=CS, tau=4, sink_chunks=1, recent_tokens=CS, page_budget=3, policy="recency")
    cycle, table = _cycle(0, set(), config)
    pages = cycle.cells.alloc(3)
    cycle.cells.set_rows(0, [0, 1, 2], pages)
    waited = []
    event = object()  # stand-in for the torch.cuda.Event of the side-stream copy
    real = window_mod.copy_chunks_to_host
    monkeypatch.setattr(window_mod, "copy_chunks_to_host", lambda *a, **k: (real(*a, **k), event)[1])
    monkeypatch.setattr(torch.cuda, "current_stream",  # stand-in for the decode stream
                        lambda device=None: SimpleNamespace(wait_event=waited.append))
    cycle.write_through(table, 3 * CS + 1)
    assert table.mirrored == 3 and waited == [event]


def test_lookahead_hits_count_the_steps_top_chunks_already_resident_or_prefetched():
    """A step whose own shares rank chunks 2, 5, 6 highest, with {1, 2, 3} of the candidates
    resident (3 wanted): one hit; with 5 being prefetched for the next window, two."""
    config = LSAConfig(chunk_size=CS, tau=4, sink_chunks=1, recent_tokens=CS, page_budget=3, policy="recency")
    cycle, table = _cycle(10, {0, 1, 2, 3}, config)
    lo, hi = 1, 9
    share = torch.zeros(hi - lo)
    share[[2 - lo, 5 - lo, 6 - lo]] = torch.tensor([0.3, 0.5, 0.2])
    cycle._count_lookahead(table, share, lo, hi)
    assert (table.stats.lookahead_wanted, table.stats.lookahead_hits) == (3, 1)
    table.pending = Pending({0, 1, 2, 5}, {}, None, deferred=[5])
    cycle._count_lookahead(table, share, lo, hi)
    assert (table.stats.lookahead_wanted, table.stats.lookahead_hits) == (6, 3)
    assert (cycle.server.lookahead_wanted, cycle.server.lookahead_hits) == (6, 3)
