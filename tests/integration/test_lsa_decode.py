"""LSA decode on the real server: gate-off exactness, device footprint, no leaks, only
resident cells read (released cells are NaN-poisoned by the test preset), batching, and a
prompt the host mirror cannot hold."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import random
import time

import pytest
import requests

pytestmark = pytest.mark.slow

WORDS = ("river stone lamp orchard violet copper window meadow harbor pencil thunder "
         "saddle lantern marble cedar falcon velvet glacier compass ember").split()


def haystack_ids(server, n_tokens: int, seed: int) -> list[int]:
    """A prompt of exactly n_tokens tokens: seeded word soup with a fact near the start."""
    rng = random.Random(seed)
    text = "Remember: the secret code is 4817. " + " ".join(rng.choice(WORDS) for _ in range(n_tokens))
    ids = requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=60).json()["tokens"]
    tail = requests.post(server.url + "/tokenize", json={"prompt": " Question: what is the secret code? Answer:"},
                         timeout=60).json()["tokens"]
    return ids[: n_tokens - len(tail)] + tail


def greedy(server, ids, n=16, lsa=None, logprobs=False):
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    if lsa is not None:
        params["custom_params"] = {"lsa": lsa}
    return server.generate({"input_ids": ids, "sampling_params": params, "return_logprob": logprobs})


def stats(server) -> dict:
    r = requests.get(server.url + "/lsa/stats", timeout=60)
    r.raise_for_status()
    return r.json()


def assert_no_request_content(server, ids: list[int], words: list[str]) -> None:
    """/lsa/stats holds counts and identifiers only: no prompt text, no token ids."""
    r = requests.get(server.url + "/lsa/stats", timeout=60)
    r.raise_for_status()
    for word in words:
        assert word not in r.text, word
    body = r.json()
    assert set(body) == {"server", "requests"}
    assert all(isinstance(v, (int, float)) for v in body["server"].values()), body["server"]
    for req in body["requests"]:
        for key, value in req.items():
            assert isinstance(value, (int, float, bool)) or (key in ("rid", "policy") and isinstance(value, str)), key
    compact = json.dumps(body, separators=(",", ":"))
    for i in range(0, len(ids) - 4, 97):
        assert ",".join(map(str, ids[i : i + 4])) not in compact


def wait_idle(server, timeout=120, flush=False) -> dict:
    """Stats once nothing runs; with `flush`, after emptying the prefix cache (both tiers)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = stats(server)
        if s["server"]["running_requests"] == 0:
            if not flush:
                return s
            r = requests.post(server.url + "/flush_cache", timeout=60)
            if r.ok and "Cache flushed" in r.text:
                s = stats(server)
                assert s["server"]["host_cached_bytes"] == 0, s["server"]
                return s
        time.sleep(0.5)
    raise AssertionError(f"requests still running: {s}")


def idle_baseline(server) -> dict:
    """Pool occupancy of the idle server (after a warm-up request), prefix cache empty."""
    greedy(server, [1, 2, 3], n=2)
    return wait_idle(server, flush=True)["server"]


@pytest.fixture(scope="module")
def baseline(lsa_server):
    return idle_baseline(lsa_server)


def test_gate_off_exact(lsa_server, stock_server):
    ids = haystack_ids(lsa_server, 2000, seed=1)
    stock = greedy(stock_server, ids)["output_ids"]
    off = greedy(lsa_server, ids, lsa={"enabled": False})["output_ids"]
    everything = greedy(lsa_server, ids, lsa={"page_budget": 1000})["output_ids"]
    everything_by_attention = greedy(lsa_server, ids, lsa={"policy": "attention", "page_budget": 1000})["output_ids"]
    everything_reselecting = greedy(
        lsa_server, ids, lsa={"policy": "attention", "page_budget": 1000, "reselect": "quest"})["output_ids"]
    assert off == stock
    assert everything == stock
    assert everything_by_attention == stock
    assert everything_reselecting == stock


def test_footprint_at_7k_and_finite_outputs(lsa_server, baseline):
    ids = haystack_ids(lsa_server, 7000, seed=2)
    out = greedy(lsa_server, ids, n=32, logprobs=True)
    lps = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    assert all(math.isfinite(x) for x in lps)  # released cells hold NaN: none was read
    rid = out["meta_info"]["id"]
    req = next(r for r in stats(lsa_server)["requests"] if r["rid"] == rid)
    assert req["prompt_tokens"] == 7000 and req["output_tokens"] >= 31
    assert req["windows"] >= 3
    ratio = req["peak_device_kv_bytes"] / req["full_kv_bytes"]
    assert ratio <= 0.15, req
    # the selection metadata (3 keys per mirrored chunk at 3 target layers of SmolLM2: 3 KV heads
    # of 64 dims, float32) is part of the device bytes
    chunk = stats(lsa_server)["server"]["chunk_bytes"]
    per_chunk = 3 * 3 * 3 * 64 * 4
    mirrored, rest = divmod(req["selection_metadata_bytes"], per_chunk)
    assert rest == 0 and 7000 // 64 <= mirrored <= (7000 + req["output_tokens"]) // 64, req
    assert (req["device_kv_bytes"] - req["selection_metadata_bytes"]) % chunk == 0
    assert req["host_kv_bytes"] >= 0.95 * req["full_kv_bytes"]  # the full KV is on the host
    assert_no_request_content(lsa_server, ids, ["secret", "Remember", "Question"])


def test_no_leak_after_finish_abort_and_disconnect(lsa_server, baseline):
    ids = haystack_ids(lsa_server, 3000, seed=3)
    greedy(lsa_server, ids, n=12)
    # client disconnects in the middle of a streamed decode
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
    with requests.post(lsa_server.url + "/generate", json=body, stream=True, timeout=300) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 20:
                break
    # explicit abort of a running request
    body["stream"] = False
    body["rid"] = "lsa-abort-me"
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(requests.post, lsa_server.url + "/generate", json=body, timeout=300)
        time.sleep(8)
        requests.post(lsa_server.url + "/abort_request", json={"rid": "lsa-abort-me"}, timeout=30)
        fut.result()
    after = wait_idle(lsa_server, flush=True)["server"]
    assert after["device_free_tokens"] == baseline["device_free_tokens"]
    assert after["host_kv_bytes"] == 0


def test_concurrent_batch_matches_serial(lsa_server):
    prompts = [haystack_ids(lsa_server, n, seed=10 + n) for n in (900, 2100, 3000)]
    serial = [greedy(lsa_server, p, n=20)["output_ids"] for p in prompts]
    wait_idle(lsa_server, flush=True)  # all three prefill cold again, in one batch
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(lambda p: greedy(lsa_server, p, n=20)["output_ids"], prompts))
    assert together == serial


def test_prompt_larger_than_host_pool_is_refused(lsa_server):
    ids = haystack_ids(lsa_server, 8150, seed=4)
    r = requests.post(lsa_server.url + "/generate", timeout=120,
                      json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4}})
    body = r.json()
    text = str(body)
    assert "host_pool_gb allows" in text, body
    # the server stays up and serves the next request
    assert greedy(lsa_server, [1, 2, 3, 4], n=3)["meta_info"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_bad_override_is_refused(lsa_server, stream):
    """Refused like SGLang refuses a bad sampling param, before anything is generated: a 400
    naming the key (a streamed /generate gets it as its one error event, as SGLang streams errors)."""
    r = requests.post(lsa_server.url + "/generate", timeout=60, json={
        "input_ids": [1, 2, 3], "stream": stream,
        "sampling_params": {"max_new_tokens": 2, "custom_params": {"lsa": {"policy": "oracle"}}}})
    if stream:
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and "{" in line]
        assert r.status_code == 200 and len(events) == 1, r.text
        error = events[0]["error"]
        assert error["code"] == 400, r.text
    else:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
    assert "'policy': expected one of indexer, recency, random, quest" in error["message"]
    r = requests.post(lsa_server.url + "/v1/completions", timeout=60, json={
        "model": "default", "prompt": "hi", "max_tokens": 2, "stream": stream,
        "custom_params": {"lsa": {"page_budget": 0}}})
    assert r.status_code == 400 and "'page_budget'" in r.json()["message"], r.text


@pytest.mark.parametrize("policy", ["recency", "random", "quest", "attention"])
def test_policies_share_budget(lsa_server, policy):
    ids = haystack_ids(lsa_server, 3000, seed=5)
    out = greedy(lsa_server, ids, n=10, lsa={"policy": policy}, logprobs=True)
    assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
    req = next(r for r in stats(lsa_server)["requests"] if r["rid"] == out["meta_info"]["id"])
    assert req["policy"] == policy
    assert req["peak_device_kv_bytes"] < req["full_kv_bytes"] * 0.5


def test_later_windows_carry_and_swap_limit(lsa_server):
    """`attention_later: carry` ranks later windows by the admission's attention scores: over 5
    windows of 8 steps (no chunk leaves the tail in 40 tokens) the resident set never changes, so
    no chunk is fetched from the host; the indexer, asked the same, changes its picks. Quest
    changes several picks per boundary; with `swap_limit: 1` it brings in at most one chunk per
    boundary, and its peak (current set + the incoming chunks) stays lower."""
    ids = haystack_ids(lsa_server, 3000, seed=7)
    got = {}
    for name, lsa in (("carry", {"policy": "attention", "attention_later": "carry"}),
                      ("indexer", {"policy": "attention"}),
                      ("quest", {"policy": "quest"}), ("quest, limit 1", {"policy": "quest", "swap_limit": 1})):
        out = greedy(lsa_server, ids, n=40, lsa=lsa, logprobs=True)
        assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
        req = next(r for r in stats(lsa_server)["requests"] if r["rid"] == out["meta_info"]["id"])
        assert req["windows"] >= 4, req
        got[name] = req
    copied = {name: req["chunks_copied"] for name, req in got.items()}
    assert copied["carry"] == 0 and copied["indexer"] > 0, copied
    # carry reads no chunk keys at any boundary: the device keeps (and counts) none for it
    assert got["carry"]["selection_metadata_bytes"] == 0 < got["indexer"]["selection_metadata_bytes"]
    assert copied["quest"] > got["quest"]["windows"] and 1 <= copied["quest, limit 1"] <= got["quest"]["windows"], copied
    assert got["quest, limit 1"]["peak_device_kv_bytes"] < got["quest"]["peak_device_kv_bytes"]


def test_reselect_on_evidence_swaps_in_place(lsa_server, baseline):
    """`reselect: quest` swaps a chunk in after a step whose queries bounded it above the weakest
    resident one: counted, copied synchronously into a cell the evicted chunk gave back, only
    resident cells read (released cells are NaN in the test preset: a stale read makes the
    logprobs NaN), every layer's key bounds counted as metadata, no cell left behind."""
    ids = haystack_ids(lsa_server, 3000, seed=9)
    got = {}
    for mode, after, later in (("off", 0, "indexer"), ("quest", 0, "indexer"), ("quest", 24, "indexer"),
                               ("quest", 0, "carry")):
        out = greedy(lsa_server, ids, n=24, logprobs=True, lsa={"policy": "attention", "reselect": mode,
                                                               "reselect_after": after, "attention_later": later})
        assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
        got[mode, after, later] = next(r for r in stats(lsa_server)["requests"] if r["rid"] == out["meta_info"]["id"])
    on, off, gated, carry = got["quest", 0, "indexer"], got["off", 0, "indexer"], got["quest", 24, "indexer"], \
        got["quest", 0, "carry"]
    assert off["reselections"] == 0 and on["reselections"] >= 1, (on, off)
    # `reselect_after: 24`: no swap while the answer has at most 24 tokens, the bounds still kept
    assert gated["reselections"] == 0 and gated["selection_metadata_bytes"] == on["selection_metadata_bytes"]
    assert on["stalls"] >= on["reselections"] and on["chunks_copied"] >= on["reselections"]
    assert on["selection_metadata_bytes"] > off["selection_metadata_bytes"]
    # with later windows carried only the bounds stay: every layer's key min and max per mirrored
    # chunk (SmolLM2: 30 layers, 3 KV heads of 64 dims, bfloat16), the indexer's keys not at all
    bounds = carry["selection_metadata_bytes"]
    assert bounds % (2 * 30 * 3 * 64 * 2) == 0 and bounds == on["selection_metadata_bytes"] - off["selection_metadata_bytes"]
    assert carry["reselections"] >= 1
    after = wait_idle(lsa_server, flush=True)["server"]
    assert after["reselections"] >= on["reselections"]
    assert after["device_free_tokens"] == baseline["device_free_tokens"]


def straddle_ids(server, n_tokens: int, seed: int, chunk: int = 64, cut: int = 3) -> list[int]:
    """A prompt of n_tokens tokens stating a code whose first `cut` tokens end chunk 20 and whose
    rest opens chunk 21 (a fact cut by a chunk boundary; a negative `cut`: the whole code inside
    chunk 20, that many tokens before its end), ending with the code's key."""
    rng = random.Random(seed)

    def tok(text):
        return requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=60).json()["tokens"]

    words = tok(" ".join(rng.choice(WORDS) for _ in range(n_tokens)))
    lead, code = tok(" The secret code is"), tok(" 7382-0459-1637.")
    at = 21 * chunk - (cut if cut > 0 else len(code) - cut) - len(lead)
    return (words[:at] + lead + code + words[at:])[: n_tokens - len(lead)] + lead


def test_release_copied_counts_a_copy_and_reads_only_resident_cells(lsa_server, baseline):
    """`release_copied`: at 2 pages window 0 holds chunk 20, which states the code the prompt ends
    asking for, and the answer copies it. With the rule the server sees the copy (the answer's
    last 3 tokens a run inside the resident chunk) and, when the answer moves on, counts the end
    of the copy (`copies_released`: the chunk's hold starts again, so it can leave); without the
    rule nothing is counted. Both answers copy the code, only resident cells are read (released
    cells are NaN in the test preset), and no cell is left behind."""
    ids = straddle_ids(lsa_server, 3000, seed=11, cut=-8)
    got = {}
    for n in (0, 3):
        lsa = {"policy": "attention", "page_budget": 2, "attention_later": "carry", "reselect": "quest",
               "release_copied": n}
        out = greedy(lsa_server, ids, n=16, lsa=lsa, logprobs=True)
        assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
        got[n] = out["text"], next(r for r in stats(lsa_server)["requests"] if r["rid"] == out["meta_info"]["id"])
    (off_text, off), (on_text, on) = got[0], got[3]
    assert "1637" in off_text and "1637" in on_text, (off_text, on_text)  # (the 135M model drops a digit)
    assert off["copies_released"] == 0 and on["copies_released"] >= 1, (off, on)
    assert on["stalls"] >= on["reselections"]
    after = wait_idle(lsa_server, flush=True)["server"]
    assert after["copies_released"] >= on["copies_released"]
    assert after["device_free_tokens"] == baseline["device_free_tokens"]


def list_ids(server, n_tokens: int, seed: int, codes: dict[int, str], chunk: int = 64) -> tuple[list[int], list[int]]:
    """A prompt of n_tokens tokens stating each of `codes` (chunk -> code) after the same lead-in
    (" The secret code is") 8 tokens into that chunk, ending with the lead-in; and the lead-in's
    tokens."""
    rng = random.Random(seed)

    def tok(text):
        return requests.post(server.url + "/tokenize", json={"prompt": text}, timeout=60).json()["tokens"]

    ids, lead = tok(" ".join(rng.choice(WORDS) for _ in range(n_tokens))), tok(" The secret code is")
    for c in sorted(codes):  # in order: each lands where it is meant to
        at = c * chunk + 8
        ids[at:at] = lead + tok(f" {codes[c]}.")
    return ids[: n_tokens - len(lead)] + lead, lead


def test_copy_siblings_brings_in_the_other_items_of_a_list_the_answer_copies(lsa_server, baseline):
    """`copy_siblings`: four codes follow the same lead-in, in chunks 8, 16, 24 and 32, and the
    prompt ends with it. At 3 pages window 0 does not hold them all; once the answer copies one
    (`release_copied` sees the copy), the lead-in before it recurs before the other three and
    the rule swaps those not on the device in for pages that hold no code (counted in
    `sibling_reselections`, copied synchronously; evidence swaps are gated off for the whole
    answer, so every swap is this rule's), through window boundaries every 8 steps; without the
    rule none is counted. Only resident cells are read (released cells are NaN in the test
    preset) and no cell is left behind."""
    codes = {8: "7382-0459-1637", 16: "5190-2284-7716", 24: "6603-9157-2048", 32: "2875-4410-9362"}
    ids, lead = list_ids(lsa_server, 3000, seed=12, codes=codes)
    assert len(lead) == 4
    got = {}
    for n in (0, 4):
        lsa = {"policy": "attention", "page_budget": 3, "attention_later": "carry", "reselect": "quest",
               "reselect_after": 64, "release_copied": 3, "copy_siblings": n}
        out = greedy(lsa_server, ids, n=24, lsa=lsa, logprobs=True)
        assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
        got[n] = out["text"], next(r for r in stats(lsa_server)["requests"] if r["rid"] == out["meta_info"]["id"])
    (_, off), (on_text, on) = got[0], got[4]
    assert any(code[:4] in on_text for code in codes.values()), on_text  # the answer copies a code
    assert off["sibling_reselections"] == off["reselections"] == 0, off
    assert on["sibling_reselections"] >= 1 and on["reselections"] == on["sibling_reselections"], on
    assert on["stalls"] >= 1 and on["chunks_copied"] >= on["sibling_reselections"]
    after = wait_idle(lsa_server, flush=True)["server"]
    assert after["sibling_reselections"] >= on["sibling_reselections"]
    assert after["device_free_tokens"] == baseline["device_free_tokens"]


def test_attention_first_layer_picks_window0_from_later_layers_only(lsa_server):
    """`attention_first_layer`: window 0 ranks chunks by the attention of that layer and the later
    ones. At 2 pages, the last layer alone picks another window 0 than the max over every layer
    (the answer's logprobs change), while naming layer 0 is the default exactly; a layer the model
    lacks (SmolLM2-135M has 30) is refused with one message naming the field, and the server
    goes on serving."""
    ids = haystack_ids(lsa_server, 3000, seed=12)
    base = {"policy": "attention", "page_budget": 2, "attention_later": "carry"}
    got = {}
    for first in (None, 0, 29):
        lsa = base if first is None else {**base, "attention_first_layer": first}
        out = greedy(lsa_server, ids, n=12, lsa=lsa, logprobs=True)
        got[first] = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert all(math.isfinite(lp) for lp in got[first])
    assert got[0] == got[None]
    assert got[29] != got[None]
    r = requests.post(lsa_server.url + "/generate", timeout=120, json={
        "input_ids": ids[:200], "sampling_params": {"max_new_tokens": 4, "custom_params": {
            "lsa": {**base, "attention_first_layer": 30}}}})
    assert "'attention_first_layer': expected a layer index in [0, 29]" in r.text, r.text
    assert greedy(lsa_server, [1, 2, 3, 4], n=3)["meta_info"]["completion_tokens"] == 3


def test_attention_heads_pick_window0_from_those_heads_only(lsa_server):
    """`attention_heads`: window 0 ranks chunks by the summed attention of the listed heads alone.
    At 2 pages one head of the last layer picks another window 0 than every layer does (the
    answer's logprobs change), `null` is the layer rule exactly; a head the model lacks
    (SmolLM2-135M: 30 layers of 9 heads) is refused with one message naming the field, and the
    server goes on serving."""
    ids = haystack_ids(lsa_server, 3000, seed=13)
    base = {"policy": "attention", "page_budget": 2, "attention_later": "carry"}
    got = {}
    for name, heads in (("default", "unset"), ("null", None), ("one", [[29, 0]])):
        lsa = base if heads == "unset" else {**base, "attention_heads": heads}
        out = greedy(lsa_server, ids, n=12, lsa=lsa, logprobs=True)
        got[name] = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        assert all(math.isfinite(lp) for lp in got[name])
    assert got["null"] == got["default"]
    assert got["one"] != got["default"]
    for bad, named in (([[30, 0]], "[30, 0]"), ([[3, 9]], "[3, 9]")):
        r = requests.post(lsa_server.url + "/generate", timeout=120, json={
            "input_ids": ids[:200], "sampling_params": {"max_new_tokens": 4, "custom_params": {
                "lsa": {**base, "attention_heads": bad}}}})
        assert "'attention_heads': expected [layer, head] pairs for this model (30 layers of 9 heads), got " + named in r.text, r.text
    assert greedy(lsa_server, [1, 2, 3, 4], n=3)["meta_info"]["completion_tokens"] == 3


def test_budget_fraction_grows_the_budget_with_the_prompt(lsa_server):
    """`budget_fraction` per request: a 3000-token prompt at 0.25 gets floor(750 / 64) = 11 pages
    where the test preset gives 6, and holds exactly 5 chunks more on the device (recency picks
    fill the budget; 4 tokens, no window boundary); a 1500-token prompt at 0.25 (5 pages) keeps
    the preset's 6 as its floor; a request naming `page_budget` alone gets that budget."""
    chunk = stats(lsa_server)["server"]["chunk_bytes"]
    long, short = haystack_ids(lsa_server, 3000, seed=13), haystack_ids(lsa_server, 1500, seed=13)
    got = {}
    for name, ids, lsa in (("preset", long, {}), ("fraction", long, {"budget_fraction": 0.25}),
                           ("short", short, {"budget_fraction": 0.25}), ("pages", long, {"page_budget": 4}),
                           ("pages and fraction", long, {"page_budget": 4, "budget_fraction": 0.25})):
        out = greedy(lsa_server, ids, n=4, lsa={"policy": "recency", **lsa}, logprobs=True)
        assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
        got[name] = next(r for r in stats(lsa_server)["requests"] if r["rid"] == out["meta_info"]["id"])
    budgets = {name: r["budget_tokens"] for name, r in got.items()}
    assert budgets == {"preset": 384, "fraction": 704, "short": 384, "pages": 256, "pages and fraction": 704}, budgets
    assert got["fraction"]["peak_device_kv_bytes"] - got["preset"]["peak_device_kv_bytes"] == 5 * chunk
    assert got["preset"]["peak_device_kv_bytes"] - got["pages"]["peak_device_kv_bytes"] == 2 * chunk


def test_host_mirror_admission_queues(lsa_server, baseline):
    """Three 3K-token prompts need 141 host chunks; the test pool holds 127: one waits in the
    queue until a mirror frees, and every answer equals the one served alone."""
    prompts = [haystack_ids(lsa_server, 3000, seed=20 + i) for i in range(3)]
    serial = [greedy(lsa_server, p, n=12)["output_ids"] for p in prompts]
    before = wait_idle(lsa_server, flush=True)["server"]
    with cf.ThreadPoolExecutor(3) as ex:
        together = list(ex.map(lambda p: greedy(lsa_server, p, n=12)["output_ids"], prompts))
    assert together == serial
    after = wait_idle(lsa_server, flush=True)["server"]
    assert after["host_waits"] >= before["host_waits"] + 1  # the third one waited for a mirror
    host_full_before = before["host_full"]
    assert after["host_full"] == host_full_before  # nobody was left without a mirror
    assert after["host_kv_bytes"] == 0 and after["host_reserved_bytes"] == 0
    assert after["device_free_tokens"] == baseline["device_free_tokens"]


def test_prometheus_metrics(lsa_server):
    greedy(lsa_server, haystack_ids(lsa_server, 1500, seed=6), n=20)
    text = requests.get(lsa_server.url + "/metrics", timeout=30).text
    windows = [line for line in text.splitlines() if line.startswith("sglang:lsa_windows")]
    assert windows and float(windows[0].split()[-1]) >= 1
    assert "sglang:lsa_stall_seconds" in text and "sglang:lsa_device_kv_bytes" in text
