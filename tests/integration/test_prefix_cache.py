"""The radix prefix cache with LSA on: a cached prompt answers like a cold one, chat turns
reuse the previous turns, the host tier serves a prefix the device tier evicted, and a mixed
workload leaves every pool where it started. A server of its own with an 8K-token KV pool,
so a few 3K-token prompts force device eviction."""

from __future__ import annotations

import concurrent.futures as cf
import sys
import time

import pytest
import requests

from conftest import PRESET, start_server, stop_server
from test_lsa_decode import greedy, haystack_ids, idle_baseline, stats, wait_idle

pytestmark = pytest.mark.slow

POOL_TOKENS = 8192


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = start_server(
        [sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model_path,
         "--lsa-config", str(PRESET), "--dtype", "float32", "--context-length", "8192",
         "--max-total-tokens", str(POOL_TOKENS), "--max-running-requests", "4", "--device", "cpu"],
        tmp_path_factory.mktemp("prefix") / "server.log",
    )
    yield s
    stop_server(s.proc)


@pytest.fixture(scope="module")
def baseline(server):
    return idle_baseline(server)


def cached(out) -> int:
    return out["meta_info"]["cached_tokens"]


def test_cached_prompt_answers_like_cold(server, baseline):
    ids = haystack_ids(server, 2000, seed=31)
    before = stats(server)["server"]
    cold = greedy(server, ids, n=24)
    warm = greedy(server, ids, n=24)
    assert cached(cold) == 0 and cached(warm) >= 2000 - 64
    assert warm["output_ids"] == cold["output_ids"]
    after = stats(server)["server"]
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == cached(warm)
    # the second request found all of its 31 complete prompt chunks in the host mirror
    assert after["host_chunks_shared"] - before["host_chunks_shared"] >= 2000 // 64
    assert after["device_cells_saved"] > before["device_cells_saved"]
    req = next(r for r in stats(server)["requests"] if r["rid"] == warm["meta_info"]["id"])
    assert req["prefix_hit_tokens"] == cached(warm) and req["peak_device_kv_bytes"] < 0.5 * req["full_kv_bytes"]


def test_attention_rows_are_prefilled_for_a_cached_prompt_too(server):
    """Window 0 under `attention_rows` reads the queries of the prompt's last rows, which only a
    prefill computes: the cache serves the prompt up to those rows, and the answer is the cold one."""
    ids = haystack_ids(server, 2000, seed=39)
    lsa = {"policy": "attention", "attention_rows": 64}
    cold = greedy(server, ids, n=24, lsa=lsa)
    warm = greedy(server, ids, n=24, lsa=lsa)
    assert cached(cold) == 0 and len(ids) - 64 - 64 <= cached(warm) <= len(ids) - 64
    assert warm["output_ids"] == cold["output_ids"]
    assert cached(greedy(server, ids, n=2)) >= len(ids) - 64  # the indexer policy still takes it all


def test_quest_window0_reads_the_last_row_of_a_cached_prompt_too(server):
    """The `quest` policy's window 0 bounds the chunks with the prompt's last query row at every
    layer: a prompt served from the cache still prefills that row, keeps its selection (device
    bytes well under the full KV) and answers as cold."""
    ids = haystack_ids(server, 2000, seed=41)
    lsa = {"policy": "quest", "page_budget": 2}
    cold = greedy(server, ids, n=24, lsa=lsa)
    warm = greedy(server, ids, n=24, lsa=lsa)
    assert cached(cold) == 0 and cached(warm) >= len(ids) - 64
    assert warm["output_ids"] == cold["output_ids"]
    req = next(r for r in stats(server)["requests"] if r["rid"] == warm["meta_info"]["id"])
    assert req["policy"] == "quest" and req["peak_device_kv_bytes"] < 0.5 * req["full_kv_bytes"]


def test_chat_turns_reuse_previous_turns(server):
    doc = haystack_ids(server, 1500, seed=32)
    q = lambda text: requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=60).json()["tokens"]  # noqa: E731
    # turn 1 answered densely: its answer's KV equals what a cold prefill computes, so turn 2
    # served from the cache must equal turn 2 served cold
    t1 = greedy(server, doc, n=16, lsa={"enabled": False})
    turn2 = doc + t1["output_ids"] + q(" Now say it again, louder:")
    warm = greedy(server, turn2, n=16)
    assert cached(warm) >= len(doc) + 16 - 64
    wait_idle(server, flush=True)
    assert greedy(server, turn2, n=16)["output_ids"] == warm["output_ids"]
    # LSA-decoded turns: each turn reuses every earlier turn, prompt and answer
    history = list(doc)
    for i in range(3):
        history += q(f" Question {i}: what is the secret code?")
        out = greedy(server, history, n=12)
        if i:
            assert cached(out) >= len(history) - len(q(f" Question {i}: what is the secret code?")) - 64
        history += out["output_ids"]


def test_host_tier_serves_a_prefix_the_device_evicted(server):
    wait_idle(server, flush=True)
    dense = haystack_ids(server, 2000, seed=38)
    greedy(server, dense, n=4, lsa={"enabled": False})  # cached on the device only
    ids = haystack_ids(server, 2000, seed=33)
    first = greedy(server, ids, n=16)  # cached on the device and in the host mirror, newer
    loaded0 = stats(server)["server"]["prefix_host_loaded_tokens"]
    # two dense 3K prompts (no host mirror) need room in the 8K-token pool: the tree evicts the
    # host-backed LSA prompt first although the dense one is older
    for seed in (34, 35):
        greedy(server, haystack_ids(server, 3000, seed=seed), n=4, lsa={"enabled": False})
    assert cached(greedy(server, dense, n=2, lsa={"enabled": False})) >= 2000 - 64
    assert stats(server)["server"]["prefix_host_loaded_tokens"] == loaded0
    again = greedy(server, ids, n=16)
    loaded = stats(server)["server"]["prefix_host_loaded_tokens"] - loaded0
    assert loaded >= 2000 - 64 - 64 and cached(again) >= loaded
    assert again["output_ids"] == first["output_ids"]


def test_mixed_workload_leaves_every_pool_as_it_started(server, baseline):
    shared = haystack_ids(server, 2500, seed=37)
    greedy(server, shared, n=4)  # cache the shared prefix
    tails = [haystack_ids(server, 300, seed=40 + i)[:-40] for i in range(2)]
    body = {"input_ids": shared + tails[0], "rid": "prefix-abort-me",
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
    with cf.ThreadPoolExecutor(4) as ex:
        jobs = [ex.submit(greedy, server, shared + t, 16) for t in tails]  # shared prefix, concurrent
        jobs.append(ex.submit(greedy, server, haystack_ids(server, 1200, seed=44), 16))  # distinct
        aborted = ex.submit(requests.post, server.url + "/generate", json=body, timeout=300)
        time.sleep(6)
        requests.post(server.url + "/abort_request", json={"rid": "prefix-abort-me"}, timeout=30)
        outs = [j.result() for j in jobs]
        aborted.result()
    assert all(cached(o) >= 2500 - 64 for o in outs[:2])
    for seed in (45, 46, 47):  # evict under device pressure
        greedy(server, haystack_ids(server, 3000, seed=seed), n=4)
    assert greedy(server, shared + tails[1], n=16)["output_ids"] == outs[1]["output_ids"]
    after = wait_idle(server, flush=True)["server"]
    assert after["device_free_tokens"] == baseline["device_free_tokens"] == POOL_TOKENS
    assert after["host_kv_bytes"] == 0 and after["host_reserved_bytes"] == 0
    assert after["running_requests"] == 0
