"""A CI-sized soak of the LSA server (the full one: `lsa-bench soak`, bench/soak.py).

Mixed traffic with bad input, aborts and disconnects against the session's LSA server (test
preset: short windows, a host mirror that holds one near-context prompt, released cells
poisoned with NaN). The server must survive, refuse each bad request with a 4xx naming the
problem, answer every good one, give sampled greedy answers equal to their replay alone, and
be back at baseline after a flush.
"""

from __future__ import annotations

import pytest

from lsa_sglang.bench.soak import MIX, Soak, format_report

pytestmark = pytest.mark.slow


def test_soak(lsa_server):
    start = len(lsa_server.log_text())
    rep = Soak(lsa_server.url, n_requests=120, concurrency=10, seed=1, abort_all_every=60, solo_fraction=0.25,
               shared_docs=1, mix=dict(MIX, long_cold=1, long_shared=6)).run().to_dict()
    log = lsa_server.log_text()[start:]
    assert rep["requests"] >= 120
    assert rep["passed"], format_report(rep)
    assert rep["solo_checked"] >= 5 and rep["outcomes"].get("abort_all:ok") == 1, format_report(rep)
    assert sum(n for k, n in rep["outcomes"].items() if k.startswith("bad_")) >= 15, format_report(rep)
    assert "Traceback" not in log and "leak detected" not in log, log[-3000:]
