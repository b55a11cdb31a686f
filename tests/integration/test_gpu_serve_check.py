"""scripts/gpu_serve_check.sh in its CPU form (--smoke): the steps the GPU call runs (bundle check,
dummy model, stock vs LSA throughput with the gate-off check), on a tiny dummy model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_serve_check_smoke_serves_stock_and_lsa_and_gate_off_is_exact(tmp_path):
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_serve_check.sh"), "--smoke", str(tmp_path)],
                         capture_output=True, text=True, timeout=1150)
    log = (tmp_path / "gpu_serve_check.log").read_text()
    assert out.returncode == 0, log[-4000:]
    for name in ("check", "model", "throughput"):
        assert f"=== [{name}] exit 0" in log
    data = json.loads((tmp_path / "serve-throughput-cpu-smoke.json").read_text())
    rows = {(r["target"], r["concurrency"]): r for r in data["summary"]}
    assert set(rows) == {("stock", 1), ("stock", 2), ("lsa", 1), ("lsa", 2)}
    assert all(r["completed"] == r["requests"] and r["n_errors"] == 0 for r in rows.values())
    assert all(r["output_tokens"] == 16 * r["requests"] for r in rows.values())
    # LSA decoded (a window opened: window 0 at admission) and says what its decode steps cost
    lsa = rows[("lsa", 2)]
    assert lsa["lsa_windows"] >= 1 and lsa["lsa_decode_steps"] > 0 and lsa["lsa_host_ms_per_step"] > 0
    # gate-off: LSA with LSA off per request decodes stock's tokens
    gate = data["gate_off"]
    assert gate["prompts"] == 2 and gate["identical"] == 2
    assert all(len(ids) == 32 for ids in gate["stock"])
