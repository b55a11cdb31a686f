"""A CI-sized soak of the LSA server (the full one: `lsa-bench soak`).

Mixed traffic with bad input, aborts and disconnects against the session's LSA server (test
preset: short windows, a host mirror that holds one near-context prompt, released cells
poisoned with NaN). The server must survive, refuse each bad request with a 4xx naming the
problem, answer every good one, and be back at baseline after a flush; sampled greedy answers
are replayed alone and compared.
"""

from __future__ import annotations

import pytest

from lsa_sglang.bench.soak import MIX, Soak, format_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soak(lsa_server):
    start = len(lsa_server.log_text())
    rep = Soak(lsa_server.url, n_requests=120, concurrency=10, seed=1, abort_all_every=60, solo_fraction=0.4,
               shared_docs=1, mix=dict(MIX, long_cold=1, long_shared=6)).run().to_dict()
    return rep, lsa_server.log_text()[start:]


def test_soak_survives_refuses_bad_input_and_returns_to_baseline(soak):
    rep, log = soak
    report = format_report(rep)
    assert rep["requests"] >= 120, report
    assert rep["server_deaths"] == 0 and rep["failures"] == 0 and rep["leaked"] == 0, report
    assert rep["peak_host_bytes"] <= rep["host_capacity_bytes"], report
    assert rep["outcomes"].get("abort_all:ok") == 1, report
    assert sum(n for k, n in rep["outcomes"].items() if k.startswith("bad_")) >= 15, report
    assert "Traceback" not in log and "leak detected" not in log, log[-3000:]


def test_soak_greedy_answers_equal_their_replay_alone(soak):
    rep, _ = soak
    assert rep["solo_checked"] >= 5 and rep["solo_mismatches"] == 0, format_report(rep)
