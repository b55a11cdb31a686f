"""Closed-loop load: a fixed number of concurrent streaming /generate requests, with server sampling.

Why our own client rather than `sglang.benchmark.serving`: on a CPU host its dataset and tokenizer
set-up cost more than the run, and we also sample the server while the load runs. Each of the
`concurrency` workers sends its next prompt as soon as the previous one finished (ignore_eos, a
fixed output length), streaming, so TTFT and TPOT are measured per request. A sampler polls SGLang's
`/v1/loads` (requests in the running batch, KV tokens in use) and, on LSA, `/lsa/stats`, which is
how "requests admitted concurrently" and the device KV bytes are read under the same load.
The scheduler publishes `/v1/loads` between batches, so it lags during a long prefill; the client's
own count of requests that have their first token and are not finished ("decoding max") is the
second view of the same quantity.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from lsa_sglang.bench.client import ServerClient


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _one(session: aiohttp.ClientSession, url: str, text: str, output_len: int,
               lsa: dict[str, Any] | None, live: dict[str, int]) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}
    if lsa is not None:
        params["custom_params"] = {"lsa": lsa}
    body = {"text": text, "sampling_params": params, "stream": True}
    t0 = time.perf_counter()
    first = None
    meta: dict[str, Any] = {}
    stamps: list[float] = []
    live["in_flight"] += 1
    try:
        async with session.post(url + "/generate", json=body) as resp:
            if resp.status != 200:
                return {"error": f"HTTP {resp.status}: {(await resp.text())[:300]}"}
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:") or line == b"data: [DONE]":
                        continue
                    data = json.loads(line[5:])
                    meta = data.get("meta_info", meta)
                    now = time.perf_counter()
                    if first is None and meta.get("completion_tokens", 0) >= 1:
                        first = now
                        live["decoding"] += 1
                    stamps.append(now)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"error": str(e)}
    finally:
        live["in_flight"] -= 1
        if first is not None:
            live["decoding"] -= 1
    end = time.perf_counter()
    finish = meta.get("finish_reason") or {}
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return {"error": f"aborted: {finish.get('message')}"}
    out = int(meta.get("completion_tokens", 0))
    ttft = (first - t0) if first is not None else math.nan
    return {
        "rid": meta.get("id"), "prompt_tokens": meta.get("prompt_tokens"), "output_tokens": out,
        "cached_tokens": meta.get("cached_tokens"), "ttft_s": ttft, "e2e_s": end - t0,
        "tpot_s": (end - first) / (out - 1) if first is not None and out > 1 else math.nan,
    }


async def _sampler(client: ServerClient, live: dict[str, int], samples: list[dict[str, Any]],
                   interval: float, stop: asyncio.Event, lsa: bool) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = time.perf_counter()
        row: dict[str, Any] = {"t": t, "client_in_flight": live["in_flight"], "client_decoding": live["decoding"]}
        loads = await loop.run_in_executor(None, client.loads)
        if loads:
            row.update(loads)
        if lsa:
            st = await loop.run_in_executor(None, client.lsa_stats)
            if st:
                s = st["server"]
                row.update(lsa_running=s.get("running_requests"), lsa_device_kv_bytes=s.get("device_kv_bytes"),
                           lsa_full_kv_bytes=s.get("full_kv_bytes"))
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, interval - (time.perf_counter() - t)))
        except asyncio.TimeoutError:
            pass


async def _drive(url: str, prompts: Sequence[str], output_len: int, concurrency: int,
                 lsa: dict[str, Any] | None, interval: float, progress: bool, desc: str) -> dict[str, Any]:
    from tqdm import tqdm

    client = ServerClient(url)
    is_lsa = client.is_lsa()
    live = {"in_flight": 0, "decoding": 0}
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=7200)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while True:
                try:
                    text = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one(session, url, text, output_len, lsa, live))
                bar.update(1)

        sampler = asyncio.create_task(_sampler(client, live, samples, interval, stop, is_lsa))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        await sampler
    bar.close()
    return {"results": results, "samples": samples, "wall_s": wall}


def retracted_in_log(text: str) -> int:
    """Requests SGLang's scheduler retracted (KV pool full), summed over its log lines."""
    return sum(int(n) for n in re.findall(r"Retract requests\. #retracted_reqs: (\d+)", text))


def measure(url: str, prompts: Sequence[str], output_len: int, concurrency: int, *,
            lsa: dict[str, Any] | None = None, interval: float = 1.0, progress: bool = True,
            desc: str = "load", kv_bytes_per_token: int | None = None,
            server_log: Path | None = None) -> dict[str, Any]:
    """Run the load and reduce it to the numbers the report shows. `server_log`: the server's
    log file, read for retractions during this run (None: a server we did not start, unknown)."""
    client = ServerClient(url)
    log_start = server_log.stat().st_size if server_log else 0
    st0 = client.lsa_stats() if client.is_lsa() else None
    run = asyncio.run(_drive(url, prompts, output_len, concurrency, lsa, interval, progress, desc))
    st = client.lsa_stats() if st0 else None
    ok = [r for r in run["results"] if "error" not in r]
    errors = [r["error"] for r in run["results"] if "error" in r]
    samples = run["samples"]
    out_tokens = sum(r["output_tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok if not math.isnan(r["ttft_s"])]
    tpot = [r["tpot_s"] for r in ok if not math.isnan(r["tpot_s"])]
    running = [s["num_running_reqs"] for s in samples if "num_running_reqs" in s]
    used = [s["num_used_tokens"] for s in samples if "num_used_tokens" in s]
    decoding = [s["client_decoding"] for s in samples]
    busy = [s for s in samples if s["client_in_flight"] > 0]
    res: dict[str, Any] = {
        "concurrency": concurrency, "requests": len(run["results"]), "completed": len(ok), "errors": errors[:5],
        "n_errors": len(errors), "wall_s": run["wall_s"], "output_tokens": out_tokens,
        "output_tok_s": out_tokens / run["wall_s"] if run["wall_s"] > 0 else math.nan,
        "requests_per_s": len(ok) / run["wall_s"] if run["wall_s"] > 0 else math.nan,
        "cached_tokens": sum(int(r.get("cached_tokens") or 0) for r in ok),
        "prompt_tokens_mean": sum(int(r["prompt_tokens"] or 0) for r in ok) / len(ok) if ok else math.nan,
    }
    for name, xs in (("ttft_s", ttft), ("tpot_s", tpot)):
        for q in (50, 90, 99):
            res[f"{name}_p{q}"] = percentile(xs, q)
    if server_log:
        with open(server_log, "rb") as fh:
            fh.seek(log_start)
            res["retracted"] = retracted_in_log(fh.read().decode(errors="replace"))
    else:
        res["retracted"] = None
    # LSA only: requests that waited in the queue for host-mirror room, window boundaries, those
    # that swapped in place for lack of spare memory, the decode's waits on copies, bytes copied
    # in, selection (indexer and scoring) time, and the host time LSA adds to each decode step
    for key in ("host_waits", "windows", "sync_swaps", "stall_seconds", "bytes_copied", "indexer_seconds",
                "decode_steps", "decode_host_seconds"):
        res[key if key == "host_waits" else f"lsa_{key}"] = (
            st["server"].get(key, 0) - st0["server"].get(key, 0) if st else None)
    steps = res["lsa_decode_steps"]
    res["lsa_host_ms_per_step"] = 1000 * res["lsa_decode_host_seconds"] / steps if steps else None
    res["admitted_max"] = max(running) if running else None
    res["admitted_mean"] = (sum(s["num_running_reqs"] for s in busy if "num_running_reqs" in s)
                            / max(1, sum(1 for s in busy if "num_running_reqs" in s))) if running else None
    res["client_decoding_max"] = max(decoding) if decoding else 0
    res["used_tokens_max"] = max(used) if used else None
    res["used_tokens_mean"] = (sum(s["num_used_tokens"] for s in busy if "num_used_tokens" in s)
                               / max(1, sum(1 for s in busy if "num_used_tokens" in s))) if used else None
    res["max_total_num_tokens"] = next((s["max_total_num_tokens"] for s in samples if "max_total_num_tokens" in s), None)
    if kv_bytes_per_token:
        res["kv_bytes_per_token"] = kv_bytes_per_token
        for k in ("max", "mean"):
            v = res[f"used_tokens_{k}"]
            res[f"device_kv_bytes_{k}"] = None if v is None else v * kv_bytes_per_token
    lsa_dev = [s["lsa_device_kv_bytes"] for s in samples if s.get("lsa_device_kv_bytes") is not None]
    if lsa_dev:
        res["lsa_device_kv_bytes_max"] = max(lsa_dev)
        res["lsa_full_kv_bytes_max"] = max(s.get("lsa_full_kv_bytes") or 0 for s in samples)
    res["timeline"] = [{k: (round(v - samples[0]["t"], 2) if k == "t" else v) for k, v in s.items()} for s in samples]
    res["per_request"] = run["results"]
    return res


RATIO_KEYS = ("output_tok_s", "admitted_max", "admitted_mean", "device_kv_bytes_mean", "device_kv_bytes_max",
              "ttft_s_p50", "tpot_s_p50")


def ratios(target: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in RATIO_KEYS:
        a, b = target.get(k), base.get(k)
        out[k] = (a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["target", "conc", "done", "out tok/s", "admitted max/mean", "decoding max", "TTFT p50/p90/p99 s",
            "TPOT p50/p90/p99 ms", "KV MiB mean/max", "retracted", "host waits", "err"]
    lines = []
    for r in rows:
        mib = lambda v: None if v is None else v / 2**20  # noqa: E731
        lines.append([
            r["target"], str(r["concurrency"]), f"{r['completed']}/{r['requests']}", _fmt(r["output_tok_s"]),
            f"{_fmt(r['admitted_max'], 'd') if r['admitted_max'] is not None else '-'}/{_fmt(r['admitted_mean'], '.1f')}",
            str(r["client_decoding_max"]),
            "/".join(_fmt(r[f"ttft_s_p{q}"], ".1f") for q in (50, 90, 99)),
            "/".join(_fmt(r[f"tpot_s_p{q}"] * 1000 if r[f"tpot_s_p{q}"] == r[f"tpot_s_p{q}"] else None, ".0f")
                     for q in (50, 90, 99)),
            f"{_fmt(mib(r.get('device_kv_bytes_mean')), '.0f')}/{_fmt(mib(r.get('device_kv_bytes_max')), '.0f')}",
            _fmt(r.get("retracted"), "d"), _fmt(r.get("host_waits"), "d"), str(r["n_errors"]),
        ])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(c) for c in lines)])


def plot(rows: Sequence[dict[str, Any]], path: Any, title: str) -> Any:
    """Output tokens/s, requests admitted and TPOT against concurrency, one line per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = (("output_tok_s", "output tokens/s"), ("admitted_max", "requests admitted (max)"),
              ("tpot_s_p50", "TPOT p50 (s)"), ("device_kv_bytes_mean", "device KV in use, mean (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels):
        for target in dict.fromkeys(r["target"] for r in rows):
            pts = sorted((r["concurrency"], r.get(key)) for r in rows if r["target"] == target)
            pts = [(c, (v / 2**20 if key.startswith("device_kv") else v)) for c, v in pts if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=target)
        ax.set_xlabel("concurrency (clients)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
