"""Memory LSA frees admits more requests: on the same small KV pool an LSA server runs at
least 3x as many long requests at once as stock SGLang, every answer equals the request's
answer alone, nothing is retracted, and the pools return to where they started.

Both servers get their own 8192-token pool; eight 3000-token prompts are sent at once. Stock
holds a whole prompt per request (two fit); LSA holds its resident budget (sink + 6 pages +
recency tail, ~10 chunks) after the first decode step, so the freed pages reopen admission.
The concurrency is SGLang's own count, read from the scheduler's per-step decode log line.
A second server retracts on purpose (SGLang's test switch): a retracted request keeps its overrides.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import sys

import pytest
import yaml

from conftest import PRESET, start_server, stop_server
from test_lsa_decode import greedy, haystack_ids, stats, wait_idle

pytestmark = pytest.mark.slow

POOL = 8192
PROMPT = 3000
NEW = 24
N = 8
FLAGS = ["--dtype", "float32", "--context-length", "8192", "--max-total-tokens", str(POOL),
         "--max-running-requests", str(N), "--device", "cpu", "--decode-log-interval", "1", "--sleep-on-idle"]


def running_max(log_text: str) -> int:
    """Most requests SGLang decoded in one step, from its 'Decode batch' log lines."""
    counts = [int(m) for m in re.findall(r"Decode batch[^\n]*?#running-req: (\d+)", log_text)]
    assert counts, "no decode log line: --decode-log-interval 1 not honoured?"
    return max(counts)


def run_all(server, prompts: list[list[int]]) -> list[list[int]]:
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return [r["output_ids"] for r in ex.map(lambda ids: greedy(server, ids, n=NEW), prompts)]


@pytest.fixture(scope="module")
def lsa(model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capacity-lsa")
    preset = yaml.safe_load(PRESET.read_text())
    preset.update(tau=64, host_pool_gb=1.5)  # one window: the answer is decoded under window 0
    (tmp / "preset.yaml").write_text(yaml.safe_dump(preset))
    s = start_server([sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model_path,
                      "--lsa-config", str(tmp / "preset.yaml"), *FLAGS], tmp / "server.log")
    yield s
    stop_server(s.proc)


def test_lsa_runs_3x_stock_concurrency_with_solo_answers(lsa, model_path, tmp_path_factory):
    greedy(lsa, [1, 2, 3], n=2)
    base = wait_idle(lsa, flush=True)["server"]
    prompts = [haystack_ids(lsa, PROMPT, seed=500 + i) for i in range(N)]
    mark = len(lsa.log_text())

    together = run_all(lsa, prompts)
    lsa_running = running_max(lsa.log_text()[mark:])
    solo = [greedy(lsa, ids, n=NEW)["output_ids"] for ids in prompts]  # one at a time (prefix cached)

    stock = start_server([sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
                          "--attention-backend", "torch_native", "--page-size", "64", *FLAGS],
                         tmp_path_factory.mktemp("capacity-stock") / "server.log")
    try:
        run_all(stock, prompts[:3])  # three are enough to show how many stock runs at once
        stock_running = running_max(stock.log_text())
        assert "Retract" not in stock.log_text()
    finally:
        stop_server(stock.proc)

    assert stock_running == 2, stock_running  # 2 x (3000 + 24) tokens fit 8192, 3 do not
    assert lsa_running >= 3 * stock_running, (lsa_running, stock_running)
    assert together == solo
    log = lsa.log_text()
    assert "Retract" not in log and "KV cache pool is full" not in log
    end = wait_idle(lsa, flush=True)["server"]
    assert end["retracted_requests"] == 0 and end["host_waits"] == 0
    for key in ("device_free_tokens", "host_kv_bytes", "host_reserved_bytes", "running_requests"):
        assert end[key] == base[key], (key, end[key], base[key])
    assert stats(lsa)["server"]["alloc_denied"] == base["alloc_denied"]


def test_a_retracted_request_keeps_its_overrides_and_nothing_leaks(model_path, tmp_path):
    """SGLang's own retraction switch (SGLANG_TEST_RETRACT: retract every 5th decode step) on
    two requests that asked for dense decoding: each one re-admitted after a retraction still
    decodes densely (its overrides live until it finishes, not until its first release), answers
    as it does alone, and the pools return to where they started."""
    flags = ["--dtype", "float32", "--context-length", "4096", "--max-total-tokens", "16384",
             "--max-running-requests", "4", "--device", "cpu"]
    server = start_server([sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model_path,
                           "--lsa-config", str(PRESET), *flags], tmp_path / "server.log",
                          env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "5"})
    try:
        greedy(server, [1, 2, 3], n=2)
        base = wait_idle(server, flush=True)["server"]
        prompts = [haystack_ids(server, 700, seed=700 + i) for i in range(2)]
        dense = {"enabled": False}
        with cf.ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(lambda ids: greedy(server, ids, n=24, lsa=dense), prompts))
        st = wait_idle(server)
        assert st["server"]["retracted_requests"] > base["retracted_requests"]
        admissions = {o["meta_info"]["id"]: [r for r in st["requests"] if r["rid"] == o["meta_info"]["id"]]
                      for o in outs}
        assert max(len(a) for a in admissions.values()) > 1, admissions  # someone was retracted and came back
        assert all(not r["lsa_enabled"] for a in admissions.values() for r in a), admissions
        solo = [greedy(server, ids, n=24, lsa=dense)["output_ids"] for ids in prompts]
        assert [o["output_ids"] for o in outs] == solo
        end = wait_idle(server, flush=True)["server"]
        for key in ("device_free_tokens", "host_kv_bytes", "host_reserved_bytes", "running_requests"):
            assert end[key] == base[key], (key, end[key], base[key])
    finally:
        stop_server(server.proc)
