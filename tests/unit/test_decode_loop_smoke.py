"""CI form of the GPU benchmarks: `lsa-bench decode-loop --smoke` and scripts/gpu_check.sh --smoke on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_decode_loop_smoke_writes_the_fields_and_matches_the_reference(tmp_path):
    out = tmp_path / "decode.json"
    # The interpreter also runs the Triton kernel on the checked sample.
    proc = subprocess.run(
        [sys.executable, "-m", "lsa_sglang.bench", "decode-loop", "--smoke", "--json", str(out)],
        cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = json.loads(out.read_text())
    assert d["mode"] == "smoke" and d["bench"] == "decode_loop"
    for key in ("device", "torch", "triton", "shape", "settings", "host_mirror", "reference_bandwidth", "configs", "summary"):
        assert key in d, key
    assert d["settings"]["copier"].startswith("sync-stand-in")
    assert "shared" in d["host_mirror"]
    c = d["correctness"]
    assert c["ok"] and c["sparse_output_ok"] and c["prefetched_pages_match_host"]
    assert c["max_abs_err_vs_sparse_decode_torch"] <= c["tolerance"]
    assert c["max_abs_err_torch_vs_float64"] <= 1e-4
    assert c["max_abs_err_triton_interpreter_vs_torch"] <= c["tolerance"]
    kinds = {r["kind"] for r in d["configs"]}
    assert kinds == {"lsa", "dense"} and not d["skipped"]
    for r in d["configs"]:
        assert "error" not in r, r
        for key in ("step_s", "attn_step_s", "tokens_per_s", "hbm_gbps", "hbm_frac_of_copy_bw", "stall_frac", "device_kv_bytes"):
            assert r[key] is not None and r[key] >= 0, (key, r)
        if r["kind"] == "lsa":
            assert r["h2d_bytes_per_window"] > 0 and r["h2d_gbps"] > 0
            assert r["lsa_read_pages"] < r["lsa_device_pages"]
    budget = d["settings"]["budget_gib"] * 2**30
    for s in d["summary"]:
        assert s["dense_batch"] * s["dense_kv_bytes_per_request"] <= budget
        assert s["lsa_batch"] * s["lsa_device_kv_bytes_per_request"] <= budget
        assert s["lsa_fits"] > s["dense_fits"]
        assert s["tokens_per_s_ratio_lsa_over_dense"] > 0


def test_gpu_check_smoke_runs_every_cpu_step(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", str(tmp_path)],
        cwd=ROOT, env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "gpu_check: all steps passed" in log
    for step in ("kernels", "decode-loop", "planning"):
        assert f"=== [{step}] ok" in log
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [n.split("-")[0] for n in names] == ["decode", "kernels", "planning"], names
