"""Device KV footprint and decode speed, LSA on vs off, on one server in one run.

    lsa-bench footprint [--url URL] [--model smollm2-135m] [--context 7000] [--new 64] [--json OUT]

Without --url it starts `lsa_sglang.launch_server` on the embedded model with the CPU preset.
Each prompt is decoded twice on the same server: LSA on (the preset) and LSA off (per-request
override `enabled: false`), so the ratio compares like with like. Device/full KV bytes come
from `/lsa/stats`; tokens/s is decode tokens over decode time (end-to-end minus prefill,
measured as the time to the first streamed token).
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
from lsa_sglang.bench.servers import SMALL_SERVER_FLAGS, REPO_ROOT, ManagedServer, lsa_server
from lsa_sglang.cli import CliError


def start(model: str, preset: str) -> ManagedServer:
    from lsa_sglang.assets import model_path_or_fetch

    log = Path(tempfile.gettempdir()) / "lsa-bench-footprint.log"
    return lsa_server(str(model_path_or_fetch(model)), preset, SMALL_SERVER_FLAGS, log).start()


def prompt_ids(client: ServerClient, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    words = "river stone lamp orchard violet copper window meadow harbor pencil".split()
    return client.tokenize(" ".join(rng.choice(words) for _ in range(n)))[:n]


def run_one(client: ServerClient, ids: list[int], new: int, lsa: dict | None) -> dict:
    params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    if lsa is not None:
        params["custom_params"] = {"lsa": lsa}
    out = client.stream(ids, params)
    req = client.request_stats(out["meta_info"]["id"])
    if req is None:
        raise CliError(f"{client.url} is not an LSA server (no /lsa/stats entry for the request)")
    return {
        "lsa": lsa is None,
        "prompt_tokens": len(ids),
        "new_tokens": new,
        "ttft_s": out["ttft_s"],
        "decode_tok_s": (new - 1) / max(out["total_s"] - out["ttft_s"], 1e-9),
        "device_kv_bytes_peak": req["peak_device_kv_bytes"],
        "full_kv_bytes": req["full_kv_bytes"],
        "ratio": req["peak_device_kv_bytes"] / req["full_kv_bytes"],
        "windows": req["windows"],
        "chunks_copied": req["chunks_copied"],
        "stalls": req["stalls"],
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--url")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default=str(REPO_ROOT / "server_configs" / "cpu-smollm2.yaml"))
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    server = None if args.url else start(args.model, args.preset)
    try:
        client = ServerClient(args.url or server.url)
        ids = prompt_ids(client, args.context, seed=0)
        rows = [run_one(client, ids, args.new, None), run_one(client, ids, args.new, {"enabled": False})]
    finally:
        if server is not None:
            server.stop()
    print(f"{'mode':8} {'prompt':>7} {'new':>4} {'device KV peak':>15} {'full KV':>12} {'ratio':>6} "
          f"{'TTFT s':>7} {'decode tok/s':>12} {'windows':>7} {'copied':>6} {'stalls':>6}")
    for r in rows:
        print(f"{'lsa' if r['lsa'] else 'dense':8} {r['prompt_tokens']:7d} {r['new_tokens']:4d} "
              f"{r['device_kv_bytes_peak']:15,d} {r['full_kv_bytes']:12,d} {r['ratio']:6.3f} "
              f"{r['ttft_s']:7.1f} {r['decode_tok_s']:12.2f} {r['windows']:7d} {r['chunks_copied']:6d} "
              f"{r['stalls']:6d}")
    print(f"LSA/dense: device KV {rows[0]['ratio'] / rows[1]['ratio']:.3f}, "
          f"decode tokens/s {rows[0]['decode_tok_s'] / rows[1]['decode_tok_s']:.2f}x")
    if args.json:
        out = {"machine": platform.machine(), "host": "cpu", "model": args.model, "rows": rows, "git": git_info()}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
