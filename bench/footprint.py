"""Device KV footprint and decode speed, LSA on vs off, on one server in one run.

    python bench/footprint.py [--url URL] [--model smollm2-135m] [--context 7000] [--new 64] [--json OUT]

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
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def start(model: str, preset: str):
    from conftest import COMMON_FLAGS, start_server  # same launcher flags as the tests

    log = Path("/tmp/lsa-bench-footprint.log")
    from lsa_sglang.assets import model_path_or_fetch

    path = str(model_path_or_fetch(model))
    return start_server([sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", path,
                         "--lsa-config", preset, *COMMON_FLAGS], log)


def prompt_ids(url: str, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    words = "river stone lamp orchard violet copper window meadow harbor pencil".split()
    text = " ".join(rng.choice(words) for _ in range(n))
    return requests.post(url + "/tokenize", json={"prompt": text}, timeout=60).json()["tokens"][:n]


def run_one(url: str, ids: list[int], new: int, lsa: dict | None) -> dict:
    params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    if lsa is not None:
        params["custom_params"] = {"lsa": lsa}
    t0 = time.perf_counter()
    first = None
    rid = None
    with requests.post(url + "/generate", stream=True, timeout=3600,
                       json={"input_ids": ids, "sampling_params": params, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                if first is None:
                    first = time.perf_counter()
                rid = json.loads(line[6:])["meta_info"]["id"]
    end = time.perf_counter()
    st = requests.get(url + "/lsa/stats", timeout=60).json()
    req = next(x for x in st["requests"] if x["rid"] == rid)
    return {
        "lsa": lsa is None,
        "prompt_tokens": len(ids),
        "new_tokens": new,
        "ttft_s": first - t0,
        "decode_tok_s": (new - 1) / max(end - first, 1e-9),
        "device_kv_bytes_peak": req["peak_device_kv_bytes"],
        "full_kv_bytes": req["full_kv_bytes"],
        "ratio": req["peak_device_kv_bytes"] / req["full_kv_bytes"],
        "windows": req["windows"],
        "chunks_copied": req["chunks_copied"],
        "stalls": req["stalls"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default=str(ROOT / "server_configs/cpu-smollm2.yaml"))
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        server = start(args.model, args.preset)
        url = server.url
    try:
        ids = prompt_ids(url, args.context, seed=0)
        rows = [run_one(url, ids, args.new, None), run_one(url, ids, args.new, {"enabled": False})]
    finally:
        if server is not None:
            from conftest import stop_server

            stop_server(server.proc)
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
        out = {"machine": platform.machine(), "host": "cpu", "model": args.model, "rows": rows,
               "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=ROOT).stdout.strip()}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
