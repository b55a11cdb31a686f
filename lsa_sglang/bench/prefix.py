"""Multi-turn chat over a long document, LSA with the prefix cache vs LSA without it.

    lsa-bench prefix [--model smollm2-135m] [--doc 6000] [--turns 8] [--new 32] [--json OUT]

Starts `lsa_sglang.launch_server` twice on the embedded model with the CPU preset, the same
flags except `--disable-radix-cache` on the second, and plays the same conversation on each:
turn 1 asks about a `--doc`-token document, every later turn sends the whole history (document,
earlier questions and answers) plus a new question. Per turn: prompt tokens, tokens served from
the cache, tokens prefilled, time to first token (streamed), the request's peak device KV and the
device pool in use after the turn (prefix cache included), from `/lsa/stats`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
from pathlib import Path

from lsa_sglang.bench.client import ServerClient
from lsa_sglang.bench.results import git_info
from lsa_sglang.bench.servers import REPO_ROOT, SMALL_SERVER_FLAGS, ManagedServer, flag_value, lsa_server

WORDS = ("river stone lamp orchard violet copper window meadow harbor pencil thunder saddle lantern "
         "marble cedar falcon velvet glacier compass ember").split()


def start(model: str, preset: str, cache: bool) -> ManagedServer:
    from lsa_sglang.assets import model_path_or_fetch

    log = Path(tempfile.gettempdir()) / f"lsa-bench-prefix-{int(cache)}.log"
    flags = SMALL_SERVER_FLAGS + ([] if cache else ["--disable-radix-cache"])
    return lsa_server(str(model_path_or_fetch(model)), preset, flags, log).start()


def turn(client: ServerClient, ids: list[int], new: int) -> dict:
    out = client.stream(ids, {"max_new_tokens": new, "temperature": 0, "ignore_eos": True})
    meta = out["meta_info"]
    stats = client.lsa_stats()
    req = next(r for r in stats["requests"] if r["rid"] == meta["id"])
    return {
        "prompt_tokens": len(ids), "cached_tokens": meta.get("cached_tokens", 0),
        "prefill_tokens": len(ids) - meta.get("cached_tokens", 0), "ttft_s": out["ttft_s"],
        "peak_device_kv_bytes": req["peak_device_kv_bytes"], "full_kv_bytes": req["full_kv_bytes"],
        "output_ids": out["output_ids"], "device_free_tokens": stats["server"]["device_free_tokens"],
    }


def conversation(client: ServerClient, doc_tokens: int, turns: int, new: int) -> list[dict]:
    rng = random.Random(0)
    doc = client.tokenize("Remember: the secret code is 4817. " + " ".join(rng.choice(WORDS) for _ in range(doc_tokens)))
    history = doc[:doc_tokens]
    rows = []
    for i in range(turns):
        history = history + client.tokenize(f"\nQuestion {i + 1}: which word comes after '{rng.choice(WORDS)}'? Answer:")
        row = turn(client, history, new)
        history = history + row.pop("output_ids")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default=str(REPO_ROOT / "server_configs" / "cpu-smollm2.yaml"))
    ap.add_argument("--doc", type=int, default=6000)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    pool = int(flag_value(SMALL_SERVER_FLAGS, "--max-total-tokens"))
    runs = {}
    for mode, cache in (("prefix cache", True), ("no prefix cache", False)):
        with start(args.model, args.preset, cache) as server:
            rows = conversation(ServerClient(server.url), args.doc, args.turns, args.new)
        for r in rows:
            r["pool_used_tokens"] = pool - r.pop("device_free_tokens")
        runs[mode] = rows

    print(f"{'mode':16} {'turn':>4} {'prompt':>6} {'cached':>6} {'prefilled':>9} {'TTFT s':>7} "
          f"{'req device KV':>13} {'req full KV':>12} {'pool used tok':>13}")
    for mode, rows in runs.items():
        for i, r in enumerate(rows, 1):
            print(f"{mode:16} {i:4d} {r['prompt_tokens']:6d} {r['cached_tokens']:6d} {r['prefill_tokens']:9d} "
                  f"{r['ttft_s']:7.2f} {r['peak_device_kv_bytes']:13,d} {r['full_kv_bytes']:12,d} "
                  f"{r['pool_used_tokens']:13d}")
    summary = {}
    for mode, rows in runs.items():
        summary[mode] = {
            "prefill_tokens": sum(r["prefill_tokens"] for r in rows),
            "ttft_s_total": sum(r["ttft_s"] for r in rows),
            "ttft_s_mean_after_first": sum(r["ttft_s"] for r in rows[1:]) / max(len(rows) - 1, 1),
            "peak_device_kv_bytes_max": max(r["peak_device_kv_bytes"] for r in rows),
        }
    a, b = summary["prefix cache"], summary["no prefix cache"]
    print(f"prefill tokens: {a['prefill_tokens']} vs {b['prefill_tokens']} "
          f"({a['prefill_tokens'] / b['prefill_tokens']:.3f}); mean TTFT of turns 2-{args.turns}: "
          f"{a['ttft_s_mean_after_first']:.2f} s vs {b['ttft_s_mean_after_first']:.2f} s "
          f"({b['ttft_s_mean_after_first'] / a['ttft_s_mean_after_first']:.1f}x faster); "
          f"peak device KV per request {a['peak_device_kv_bytes_max']:,} vs {b['peak_device_kv_bytes_max']:,} bytes")
    if args.json:
        out = {"machine": platform.machine(), "host": "cpu", "model": args.model, "preset": args.preset,
               "doc_tokens": args.doc, "turns": args.turns, "new_tokens": args.new, "runs": runs,
               "summary": summary, "git": git_info()}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
