"""Time the sparse decode kernel paths against dense FlashInfer decode.

Sparse decode should cost what its bytes cost: reading ``budget_tokens`` of K/V per
request instead of ``context_tokens``. Every decode row reports the achieved
bandwidth (K/V bytes read / time) and its ratio to the device's measured copy
bandwidth, so a path that is slow for reasons other than bytes shows up.

Paths: ``torch`` (reference), ``triton`` (split-K), ``flashinfer`` (sparse pages),
``flashinfer-dense-budget`` (dense decode over the same number of tokens, contiguous),
``flashinfer-dense-full`` and ``triton-dense-full`` (the whole context), plus the
indexer's ``score-*`` and the window's ``copy-h2d`` rows. On a CPU host only the torch
timings run (the Triton interpreter and FlashInfer say nothing about GPU speed).

    lsa-bench kernels [--json OUT]
GPU results are committed as bench/results/kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from lsa_sglang.kernels import (
    FlashInferSparseDecoder,
    SplitWorkspace,
    copy_chunks_to_device,
    flashinfer_available,
    host_mirror_shape,
    score_chunks_torch,
    sparse_decode_torch,
    sparse_decode_triton,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name(device: torch.device) -> str:
    """A file-name-safe device id, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-x86_64``."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9_]+", "-", raw.lower()).strip("-")


def time_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return statistics.median(samples)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measured_copy_gbps(device: torch.device) -> float:
    """Device memory bandwidth from a large copy, counting bytes read plus bytes written."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, iters=10 if device.type == "cuda" else 5)
    return 2 * nbytes / seconds / 1e9


class Problem:
    """One batch on a pool holding every request's whole context as pages.

    Request ``b`` owns pages ``[b * ctx_pages, (b+1) * ctx_pages)``. Its sparse
    selection keeps random earlier pages plus the last ``tail_pages`` (recency tail),
    ascending, ``budget_pages`` in all; the dense-budget layout is the first
    ``budget_pages`` pages of its region, the full layout all of them.
    """

    def __init__(self, batch: int, context: int, budget: int, hq: int, hkv: int, d: int, page: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.batch, self.page, self.dtype, self.device = batch, page, dtype, device
        self.ctx_pages = context // page
        self.budget_pages = min(budget // page, self.ctx_pages)
        self.context_tokens = self.ctx_pages * page
        self.budget_tokens = self.budget_pages * page
        shape = (batch * self.ctx_pages, page, hkv, d)
        self.k = torch.randn(shape, device=device, dtype=dtype)
        self.v = torch.randn(shape, device=device, dtype=dtype)
        self.q = torch.randn(batch, hq, d, device=device, dtype=dtype)
        self.sm_scale = d**-0.5
        self.kv_bytes_per_token = 2 * hkv * d * self.k.element_size()
        tail = min(self.budget_pages, max(1, self.budget_pages // 3))
        sparse: List[int] = []
        for b in range(batch):
            base = b * self.ctx_pages
            head = torch.randperm(self.ctx_pages - tail, generator=gen)[: self.budget_pages - tail]
            picked = sorted(head.tolist()) + list(range(self.ctx_pages - tail, self.ctx_pages))
            sparse += [base + p for p in picked]
        self.sparse = self._csr(sparse, self.budget_pages)
        self.dense_budget = self._csr([b * self.ctx_pages + p for b in range(batch) for p in range(self.budget_pages)], self.budget_pages)
        self.full = self._csr(list(range(batch * self.ctx_pages)), self.ctx_pages)

    def _csr(self, ids: List[int], per_request: int):
        indptr = torch.arange(0, (self.batch + 1) * per_request, per_request, dtype=torch.int32, device=self.device)
        indices = torch.tensor(ids, dtype=torch.int32, device=self.device)
        last = torch.full((self.batch,), self.page, dtype=torch.int32, device=self.device)
        return indptr, indices, last


def decode_rows(args, device: torch.device, hbm: float) -> List[Dict[str, object]]:
    rows = []
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    for batch in args.batch:
        p = Problem(batch, args.context, args.budget, args.q_heads, args.kv_heads, args.head_dim, args.page_size, dtype, device)
        out = torch.empty_like(p.q)
        lse = torch.empty(batch, args.q_heads, device=device)
        runs: Dict[str, tuple] = {}
        runs["torch"] = (lambda: sparse_decode_torch(p.q, p.k, p.v, *p.sparse, p.sm_scale, out=out, lse=lse), p.budget_tokens)
        if cuda:
            ws = SplitWorkspace.for_budget(batch, args.q_heads, args.kv_heads, args.head_dim, p.budget_tokens, device)
            ws_full = SplitWorkspace.for_budget(batch, args.q_heads, args.kv_heads, args.head_dim, p.context_tokens, device)
            runs["triton"] = (lambda: sparse_decode_triton(p.q, p.k, p.v, *p.sparse, p.sm_scale, out=out, lse=lse, workspace=ws), p.budget_tokens)
            runs["triton-dense-full"] = (lambda: sparse_decode_triton(p.q, p.k, p.v, *p.full, p.sm_scale, out=out, lse=lse, workspace=ws_full), p.context_tokens)
            if flashinfer_available() and dtype != torch.float32:
                for name, layout, tokens in (
                    ("flashinfer", p.sparse, p.budget_tokens),
                    ("flashinfer-dense-budget", p.dense_budget, p.budget_tokens),
                    ("flashinfer-dense-full", p.full, p.context_tokens),
                ):
                    dec = FlashInferSparseDecoder(args.q_heads, args.kv_heads, args.head_dim, args.page_size, batch, layout[1].numel(), device, q_dtype=dtype)
                    dec.plan(*layout, p.sm_scale)
                    runs[name] = ((lambda dec=dec: dec.run(p.q, p.k, p.v, out=out, lse=lse)), tokens)
        for name, (fn, tokens) in runs.items():
            seconds = time_call(fn, device, args.iters)
            gbps = batch * tokens * p.kv_bytes_per_token / seconds / 1e9
            rows.append(_row(device, name, batch, tokens, p.context_tokens, seconds, gbps, hbm))
        del p
        if cuda:
            torch.cuda.empty_cache()
    return rows


def scoring_rows(args, device: torch.device, hbm: float) -> List[Dict[str, object]]:
    """The indexer pass at a window boundary: all chunks of the batch, one key group."""
    rows = []
    dtype = DTYPES[args.dtype]
    heads, dim, chunk = 64, 128, args.page_size
    for batch in args.batch:
        n_chunks = args.context // chunk
        indptr = torch.arange(0, (batch + 1) * n_chunks, n_chunks, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
        w = torch.randn(batch, heads, device=device) * (heads * dim) ** -0.5
        keys = torch.randn(batch * n_chunks, 1, dim, device=device, dtype=dtype)
        paths = {"score-torch": lambda: score_chunks_torch(q, w, keys, indptr, 0.5, 64)}
        if device.type == "cuda":
            from lsa_sglang.kernels import score_chunks_triton

            paths["score-triton"] = lambda: score_chunks_triton(q, w, keys, indptr, 0.5, 64)
        for name, fn in paths.items():
            seconds = time_call(fn, device, args.iters)
            gbps = keys.numel() * keys.element_size() / seconds / 1e9
            rows.append(_row(device, name, batch, 0, args.context, seconds, gbps, hbm))
    return rows


def copy_rows(args, device: torch.device, hbm: float) -> List[Dict[str, object]]:
    """A window's host->device refill: ``--copy-chunks`` chunks of all ``--layers`` layers."""
    dtype = DTYPES[args.dtype]
    chunk, hkv, d, layers, n = args.page_size, args.kv_heads, args.head_dim, args.layers, args.copy_chunks
    host = torch.randn(host_mirror_shape(2 * n, layers, chunk, hkv, d), dtype=torch.float32).to(dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    k = [torch.empty(n * chunk, hkv, d, device=device, dtype=dtype) for _ in range(layers)]
    v = [torch.empty_like(t) for t in k]
    slots = list(range(0, 2 * n, 2))  # every other slot: n separate runs, the worst case
    pages = list(range(n))

    def run():
        event = copy_chunks_to_device(host, slots, k, v, pages)
        if event is not None:
            event.synchronize()

    seconds = time_call(run, device, max(3, args.iters // 4))
    nbytes = n * host[0].numel() * host.element_size()
    return [_row(device, "copy-h2d", 1, n * chunk, n * chunk, seconds, nbytes / seconds / 1e9, hbm)]


def _row(device, path, batch, budget, context, seconds, gbps, hbm) -> Dict[str, object]:
    return {
        "device": device_name(device),
        "path": path,
        "batch": batch,
        "budget_tokens": budget,
        "context_tokens": context,
        "seconds": seconds,
        "achieved_gbps": gbps,
        "measured_hbm_gbps": hbm,
    }


def parse_args(argv: Optional[List[str]], cuda: bool, prog: Optional[str] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows to this JSON file")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32] if cuda else [1, 4])
    ap.add_argument("--context", type=int, default=131072 if cuda else 8192, help="tokens per request")
    ap.add_argument("--budget", type=int, default=12288 if cuda else 1024, help="selected tokens per request")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64, help="chunk size = page size")
    ap.add_argument("--layers", type=int, default=32, help="layers moved by the copy row")
    ap.add_argument("--copy-chunks", type=int, default=64 if cuda else 8, help="chunks moved by the copy row")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    ap.add_argument("--iters", type=int, default=50 if cuda else 5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (a loaded host times better with 1)")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args = parse_args(argv, cuda, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cuda:
        print("CPU host: timing the torch paths only (Triton and FlashInfer need a GPU; "
              "the interpreter's speed means nothing).")
    elif not flashinfer_available():
        print("flashinfer is not installed: the flashinfer rows are skipped.")
    hbm = measured_copy_gbps(device)
    print(f"device {device_name(device)}: measured copy bandwidth {hbm:.1f} GB/s (read + write)")
    rows = decode_rows(args, device, hbm) + scoring_rows(args, device, hbm) + copy_rows(args, device, hbm)
    header = f"{'path':<24}{'batch':>6}{'budget':>9}{'context':>9}{'ms':>10}{'GB/s':>9}{'of copy bw':>11}"
    print(header)
    for r in rows:
        print(f"{r['path']:<24}{r['batch']:>6}{r['budget_tokens']:>9}{r['context_tokens']:>9}"
              f"{r['seconds'] * 1e3:>10.3f}{r['achieved_gbps']:>9.1f}{r['achieved_gbps'] / r['measured_hbm_gbps']:>11.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
        if cuda:
            print(f"commit GPU runs as bench/results/kernels-{device_name(device)}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
