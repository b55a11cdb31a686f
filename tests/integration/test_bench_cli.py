"""lsa-bench end to end on the embedded model: one LSA server for the module, started and stopped by
lsa-bench's own server helper (the code `compare` and `throughput` use), and each subcommand run
against it through `--url` / `--lsa-url` with tiny workloads (short prompts, a few decode tokens).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from lsa_sglang.bench.scoring import string_match_all

pytestmark = pytest.mark.slow

PRESET = Path(__file__).parent / "lsa-test.yaml"  # recent_tokens 128, poisoned released cells


@pytest.fixture(scope="module")
def bench_server(model_path, tmp_path_factory):
    from lsa_sglang.bench.servers import common_flags, lsa_server

    flags = common_flags(dtype="float32", context_length=2048, max_total_tokens=8192, max_running_requests=4,
                         mem_fraction_static=None, extra=["--log-level", "info"])
    server = lsa_server(model_path, PRESET, flags, tmp_path_factory.mktemp("bench") / "lsa.log")
    server.start(progress=False)
    yield server
    server.stop()


def run_cli(args: list[str], capsys) -> str:
    from lsa_sglang.bench.cli import main

    rc = main(args + ["--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return out.out


def test_accuracy_against_a_running_server(bench_server, tmp_path, capsys):
    out_json = tmp_path / "acc.json"
    table = run_cli(["accuracy", "--url", bench_server.url, "--tasks", "passkey,niah_single", "--lengths", "400",
                     "--samples", "1", "--max-new-tokens", "8", "--json", str(out_json),
                     "--results-dir", str(tmp_path / "results"), "--label", "test"], capsys)
    assert "passkey" in table and "niah_single" in table
    data = json.loads(out_json.read_text())
    assert len(data["records"]) == 2
    for r in data["records"]:
        assert "error" not in r, r
        assert r["prompt_tokens"] == r["n_tokens"]  # the server counts the fitted length we count
        assert 400 - 8 <= r["n_tokens"] <= 400
        assert r["completion_tokens"] <= 8
        assert r["score"] == string_match_all(r["prediction"], r["answers"])
        # /lsa/stats matched by request id; a prompt this short stays whole on the device, plus its
        # chunk keys (the selection metadata, 0.23% of a chunk's KV for this model)
        assert r["full_kv_bytes"] > 0 and 0 < r["kv_ratio"] <= 1.01
    assert data["meta"]["versions"]["sglang"] and data["meta"]["machine"]["cpu_count"]
    assert data["meta"]["model"]["name"] == Path(data["meta"]["model"]["path"]).name
    saved = list((tmp_path / "results").glob("accuracy-*-test.json"))
    assert len(saved) == 1 and (tmp_path / "results" / "runs.jsonl").read_text().count("\n") == 1


def test_compare_methods_on_one_lsa_server(bench_server, model_path, tmp_path, capsys):
    out_json = tmp_path / "cmp.json"
    table = run_cli(["compare", "--model-path", model_path, "--lsa-url", bench_server.url,
                     "--methods", "dense,indexer,recency", "--budgets", "1", "--tasks", "niah_single",
                     "--lengths", "600", "--samples", "1", "--max-new-tokens", "4", "--json", str(out_json),
                     "--png", str(tmp_path / "cmp.png"), "--no-save"], capsys)
    for label in ("dense", "indexer@1", "recency@1"):
        assert label in table
    cached = int(table.split("served from the prefix cache over the run: ")[1].split()[0])
    assert cached >= 2 * 512  # the 600-token prompt prefilled once, reused by the 2 later methods
    data = json.loads(out_json.read_text())
    recs = {r["method"]: r for r in data["records"]}
    assert set(recs) == {"dense", "indexer@1", "recency@1"}
    assert len({r["n_tokens"] for r in recs.values()}) == 1  # the same prompt for every method
    assert recs["dense"]["kv_ratio"] == 1.0 and recs["dense"]["lsa_enabled"] is False
    for m in ("indexer@1", "recency@1"):
        assert recs[m]["lsa_enabled"] is True and recs[m]["kv_ratio"] < 0.8, recs[m]
    assert recs["recency@1"]["lsa_policy"] == "recency"
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["method"] for r in data["summary"]] == ["dense", "indexer@1", "recency@1"]


def test_throughput_dense_vs_lsa(bench_server, model_path, tmp_path, capsys):
    out_json = tmp_path / "tp.json"
    table = run_cli(["throughput", "--model-path", model_path, "--lsa-url", bench_server.url,
                     "--targets", "dense,lsa", "--lsa", '{"page_budget": 1}', "--context", "500",
                     "--output-len", "32", "--concurrency", "2", "--num-requests", "2", "--sample-interval", "0.2",
                     "--json", str(out_json), "--png", str(tmp_path / "tp.png"), "--no-save"], capsys)
    assert "LSA/dense at 2 clients" in table
    data = json.loads(out_json.read_text())
    assert [r["target"] for r in data["runs"]] == ["dense", "lsa"]
    for r in data["runs"]:
        assert r["completed"] == 2 and r["n_errors"] == 0 and r["output_tokens"] == 64
        assert 0 < r["ttft_s_p50"] <= r["ttft_s_p99"] and not math.isnan(r["tpot_s_p50"])
        assert r["timeline"] and r["admitted_max"] >= 1  # sampled from the server during the load
        assert r["device_kv_bytes_max"] > 0 and r["max_total_num_tokens"] == 8192
        assert 490 <= r["prompt_tokens_mean"] <= 500
    assert data["ratios"][0]["baseline"] == "dense" and data["ratios"][0]["output_tok_s"] > 0
    assert (tmp_path / "tp.png").stat().st_size > 1000


def test_footprint_decodes_one_prompt_lsa_on_and_off(bench_server, tmp_path, capsys):
    from lsa_sglang.bench.cli import main

    out = tmp_path / "fp.json"
    assert main(["footprint", "--url", bench_server.url, "--context", "900", "--new", "8", "--json", str(out)]) == 0
    assert "LSA/dense: device KV" in capsys.readouterr().out
    lsa, dense = json.loads(out.read_text())["rows"]
    assert lsa["lsa"] and not dense["lsa"]
    assert lsa["prompt_tokens"] == dense["prompt_tokens"] == 900
    assert lsa["full_kv_bytes"] == dense["full_kv_bytes"] > 0
    # 900 tokens is over the test preset's budget + tail: LSA holds less than the full KV, off holds it all
    assert lsa["device_kv_bytes_peak"] < dense["device_kv_bytes_peak"] == dense["full_kv_bytes"]
    assert lsa["decode_tok_s"] > 0 and 0 < lsa["ttft_s"]


def test_script_commands_parse_their_own_flags(capsys):
    from lsa_sglang.bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["planning", "--help"])
    assert e.value.code == 0 and "usage: lsa-bench planning" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["tasks", "--reps", "3"])  # a flag of another command is refused, not passed on
    assert e.value.code == 2 and "unrecognized arguments: --reps 3" in capsys.readouterr().err


def test_server_helper_stops_the_whole_process_group(bench_server):
    pgid = os.getpgid(bench_server.proc.pid)
    bench_server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no scheduler or detokenizer child left behind
    assert bench_server.proc is None


def test_cli_errors_are_one_line(capsys):
    from lsa_sglang.bench.cli import main

    assert main(["accuracy", "--url", "http://127.0.0.1:9", "--tasks", "passkey"]) == 1
    assert "no healthy server" in capsys.readouterr().err
    assert main(["compare", "--model-path", "smollm2-135m", "--tasks", "nope", "--no-save"]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err
