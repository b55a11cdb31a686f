"""lsa-bench kits without a server: the long-document variant's rewrite, test selection and the
parity rule (a regression is a test that passes on stock and not with LSA)."""

from __future__ import annotations

import pytest

from lsa_sglang.bench import kits as K


class _Recorder(K._LongPrompts):
    """The long variant's rewrite, recording the body it would send instead of sending it."""

    def post(self, url, *args, json=None, **kwargs):
        sent = []
        real = K.requests.post
        K.requests.post = lambda u, *a, json=None, **k: sent.append((u, json))
        try:
            super().post(url, *args, json=json, **kwargs)
        finally:
            K.requests.post = real
        return sent[0]


def test_long_variant_puts_the_document_before_every_text_prompt():
    doc = K.long_document(4000)
    assert 3000 < len(doc) <= 4000 and doc.endswith(".") and "\\n" not in doc
    rec = _Recorder(doc)
    _, body = rec.post("http://x/generate", json={"text": "Q: capital of France?", "sampling_params": {}})
    assert body["text"].startswith("Read this report first.") and body["text"].endswith("Q: capital of France?")
    assert doc in body["text"]
    _, body = rec.post("http://x/generate", json={"text": ["a", "b"]})
    assert [t[-1] for t in body["text"]] == ["a", "b"] and all(doc in t for t in body["text"])
    _, body = rec.post("http://x/v1/completions", json={"prompt": "The story"})
    assert doc in body["prompt"] and body["prompt"].endswith("The story")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    _, body = rec.post("http://x/v1/chat/completions", json={"messages": msgs})
    assert body["messages"][0] == msgs[0] and doc in body["messages"][1]["content"]
    assert msgs[1]["content"] == "2+2?"  # the kit's own object is not changed
    ids = {"input_ids": [1, 2, 3]}
    assert rec.post("http://x/generate", json=ids)[1] == ids  # token ids are left alone


def test_parity_marks_only_stock_passes_that_lsa_fails():
    def r(test, outcome, variant="short"):
        return K.KitResult("kit", test, variant, outcome, 0.0)

    stock = [r("a", "pass"), r("b", "fail"), r("c", "pass"), r("a", "pass", "long")]
    lsa = [r("a", "pass"), r("b", "fail"), r("c", "error"), r("a", "fail", "long")]
    rows = K.parity(stock, lsa)
    assert [(x["variant"], x["test"]) for x in rows if x["regression"]] == [("short", "c"), ("long", "a")]
    assert "<- regression" in K.format_table(rows)


def test_selection_is_checked_before_any_server_is_asked():
    assert K.select(["api_contract", "matched_stop.test_finish_length"]) == {
        "api_contract": None, "matched_stop": {"test_finish_length"}}
    assert K.select(["abort_all.test_abort_all", "abort_all"]) == {"abort_all": None}
    with pytest.raises(ValueError, match="unknown kit 'nope'"):
        K.run_kits("http://127.0.0.1:9", ["nope"])
    with pytest.raises(ValueError, match="kit 'abort_all' has no test 'test_x'; it has test_abort_all"):
        K.run_kits("http://127.0.0.1:9", ["abort_all.test_x"])


def test_server_port_is_free_and_below_the_ephemeral_range():
    """A server binds its port only after it starts; a port from the ephemeral range can meanwhile
    go to one of its own outgoing or bind(0) sockets, so the harness never picks one there."""
    import socket
    from pathlib import Path

    from lsa_sglang.bench.servers import free_port

    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with socket.socket() as held:
        held.bind(("0.0.0.0", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        ports = {free_port() for _ in range(50)}
    assert taken < ephemeral_low and all(p < ephemeral_low for p in ports)
    assert taken not in ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
