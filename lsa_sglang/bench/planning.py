"""Per-step sparse-decode planning cost: the backend's old per-request loop vs tensor ops.

Every decode step the attention backend turns the chunk tables into CSR page lists.
The old code ran, per request, ``read_positions`` (one ``arange`` per resident chunk),
an ``index_select`` of the row and a slice, then ``.tolist``-style host bookkeeping;
``kernels.planning`` builds a host resident mask once and gathers/scatters page ids for
the whole batch (``DecodePlan.update``, buffers reused). Both are timed on the same
random tables (default: batch 64, 8K-token contexts, chunk 64, 16 resident chunks =
sink + 7 selected + 8 recency, and an unmirrored partial tail), after checking they
give identical tensors.

    lsa-bench planning [--device cpu|cuda] [--json bench/results/planning-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from lsa_sglang.kernels.planning import (
    DecodePlan,
    plan_sparse_decode,
    plan_sparse_decode_loop,
    resident_mask_from_sets,
)


def make_tables(batch: int, context: int, chunk: int, resident: int, recency: int, seed: int, device: torch.device):
    rng = random.Random(seed)
    rows = batch + 8
    width = context + 4 * chunk
    pages = width // chunk
    perm = torch.randperm(rows * pages, generator=torch.Generator().manual_seed(seed)) + 1
    r2t = (perm.view(rows, pages, 1) * chunk + torch.arange(chunk)).reshape(rows, width).to(torch.int32)
    idxs = rng.sample(range(rows), batch)
    seq_lens, sets, mirrored = [], [], []
    for _ in range(batch):
        seq_len = context + rng.randint(1, chunk)  # somewhere inside a window
        n_mirrored = (seq_len - 1) // chunk
        recent = set(range(max(1, n_mirrored - recency), n_mirrored))
        picked = rng.sample(range(1, max(2, n_mirrored - recency)), max(0, resident - 1 - len(recent)))
        seq_lens.append(seq_len)
        mirrored.append(n_mirrored)
        sets.append({0} | recent | set(picked))
    return r2t.to(device), idxs, seq_lens, sets, mirrored


def median_us(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--resident", type=int, default=16, help="resident mirrored chunks per request")
    ap.add_argument("--recency", type=int, default=8, help="of which the most recent mirrored chunks")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to time", file=sys.stderr)
        return 1
    r2t, idxs, seq_lens, sets, mirrored = make_tables(
        args.batch, args.context, args.chunk, args.resident, args.recency, 0, device
    )
    cs = args.chunk
    pool_idx = torch.tensor(idxs, device=device)
    plan = DecodePlan(r2t.shape[0], -(-r2t.shape[1] // cs), cs, device)

    def old():
        return plan_sparse_decode_loop(r2t, idxs, seq_lens, sets, mirrored, cs)

    def mask():
        num_chunks = -(-max(seq_lens) // cs)
        return resident_mask_from_sets(sets, num_chunks), torch.tensor(mirrored)

    def new():  # what LSAAttnBackend._plan_pages does per step
        resident, n_mirrored = mask()
        plan.update(r2t, pool_idx, torch.tensor(seq_lens), resident, n_mirrored)
        return plan.csr()

    def new_alloc():
        resident, n_mirrored = mask()
        return plan_sparse_decode(r2t, pool_idx, torch.tensor(seq_lens), resident, n_mirrored, cs)

    want = old()
    for got in (new(), new_alloc()):
        for g, w in zip(got, want):
            assert torch.equal(g, w), "planner and loop disagree"
    times = {name: median_us(fn, device, args.reps) for name, fn in
             (("old_loop_us", old), ("new_decode_plan_us", new), ("new_allocating_us", new_alloc), ("mask_build_us", mask))}
    result = {
        "bench": "planning",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "context_tokens": args.context,
        "chunk_size": cs,
        "resident_chunks": args.resident,
        "pages_per_request_mean": float(want.kv_indptr[-1]) / args.batch,
        "reps": args.reps,
        **{k: round(v, 1) for k, v in times.items()},
        "speedup": round(times["old_loop_us"] / times["new_decode_plan_us"], 2),
        "identical": True,
        "note": "median wall time of one step's planning (old: per-request read_positions + index_select "
                "loop; new: host resident mask from the chunk-id sets + DecodePlan.update, buffers reused)",
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
