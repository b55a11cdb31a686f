"""Chunk size 16 end to end: SGLang's page size, the host mirror, the prefix cache, selection and
the decode kernel all run on 16-token chunks. A server of its own with the test preset at
``chunk_size: 16`` and the same device tokens per request (sink, budget and tail kept in tokens);
released cells are NaN-poisoned, so a finite answer read only resident chunks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import requests
import yaml

from conftest import COMMON_FLAGS, PRESET, start_server, stop_server
from test_lsa_decode import greedy, haystack_ids, idle_baseline, stats, wait_idle

pytestmark = pytest.mark.slow

CS = 16


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chunk16")
    preset = yaml.safe_load(PRESET.read_text())
    # the budget given in tokens (the preset's pages x 64): the launcher turns it into 16-token pages
    tokens = preset.pop("page_budget") * preset["chunk_size"]
    preset.update(chunk_size=CS, budget_tokens=tokens, sink_chunks=preset["sink_chunks"] * preset["chunk_size"] // CS)
    path = tmp / "lsa-chunk16.yaml"
    path.write_text(yaml.safe_dump(preset))
    s = start_server(
        [sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model_path,
         "--lsa-config", str(path), *COMMON_FLAGS],
        tmp / "server.log",
    )
    yield s
    stop_server(s.proc)


@pytest.fixture(scope="module")
def baseline(server):
    return idle_baseline(server)


def test_chunk16_server_runs_16_token_pages(server, model_path):
    assert requests.get(server.url + "/get_server_info", timeout=60).json()["page_size"] == CS
    hf = json.loads((Path(model_path) / "config.json").read_text())
    kv_heads, head_dim = hf["num_key_value_heads"], hf["hidden_size"] // hf["num_attention_heads"]
    # one chunk: keys and values of 16 tokens at every layer, float32
    assert stats(server)["server"]["chunk_bytes"] == 2 * hf["num_hidden_layers"] * CS * kv_heads * head_dim * 4


def test_chunk16_gate_off_exact(server, stock_server):
    ids = haystack_ids(server, 2000, seed=41)
    stock = greedy(stock_server, ids)["output_ids"]
    assert greedy(server, ids, lsa={"enabled": False})["output_ids"] == stock
    assert greedy(server, ids, lsa={"page_budget": 1000})["output_ids"] == stock


def test_chunk16_sparse_decode_reads_only_resident_chunks(server, baseline):
    """The attention policy picks window 0, the indexer the later windows (tau 8)."""
    ids = haystack_ids(server, 7000, seed=42)
    out = greedy(server, ids, n=32, logprobs=True, lsa={"policy": "attention"})
    assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
    req = next(r for r in stats(server)["requests"] if r["rid"] == out["meta_info"]["id"])
    assert req["windows"] >= 3 and req["chunks_copied"] > 0, req
    assert req["peak_device_kv_bytes"] / req["full_kv_bytes"] <= 0.15, req
    # budget always filled: sink (4) + 384 budget tokens in 16-token chunks
    chunk = stats(server)["server"]["chunk_bytes"]
    assert req["peak_device_kv_bytes"] - req["selection_metadata_bytes"] >= (4 + 384 // CS) * chunk, req
    # the selection metadata (mean, min and max key at 3 target layers of SmolLM2: 3 KV heads of
    # 64 dims, float32) is counted per mirrored 16-token chunk
    mirrored, rest = divmod(req["selection_metadata_bytes"], 3 * 3 * 3 * 64 * 4)
    assert rest == 0 and 7000 // CS <= mirrored <= (7000 + 32) // CS, req
    after = wait_idle(server, flush=True)["server"]
    assert after["device_free_tokens"] == baseline["device_free_tokens"]
    assert after["host_kv_bytes"] == 0


def test_chunk16_prefix_cache_answers_like_cold(server, baseline):
    ids = haystack_ids(server, 2000, seed=43)
    cold = greedy(server, ids, n=24)
    before = stats(server)["server"]
    warm = greedy(server, ids, n=24)
    cached = warm["meta_info"]["cached_tokens"]
    assert cold["meta_info"]["cached_tokens"] == 0 and cached >= 2000 - CS
    assert warm["output_ids"] == cold["output_ids"]
    after = stats(server)["server"]
    assert after["host_chunks_shared"] - before["host_chunks_shared"] >= 2000 // CS
    end = wait_idle(server, flush=True)["server"]
    assert end["device_free_tokens"] == baseline["device_free_tokens"] and end["host_kv_bytes"] == 0
