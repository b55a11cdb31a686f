"""The real-text tasks on real data: the reference answers each doc question, the code answers
are what the standard library's source says, the chat asks about a turn that is there; and the
judging against dense attention (identical answers, shared prefix, ROUGE-L, paired intervals)."""

from __future__ import annotations

import ast
import re

import pytest

from lsa_sglang.bench import realtext
from lsa_sglang.bench.accuracy import bootstrap_ci, format_table, judge_against, summarize
from lsa_sglang.bench.scoring import rouge_l, score, shared_prefix
from lsa_sglang.bench.tasks import REAL_TEXT_TASKS, generate_sample


@pytest.fixture(scope="module")
def tok():
    from lsa_sglang.assets import fetch_model
    from lsa_sglang.bench.tokens import load_hf_tokenizer

    return load_hf_tokenizer(str(fetch_model("smollm2-135m")))


def test_every_doc_question_is_answered_by_its_section():
    topics = realtext._topics()
    for topic, question, answers in realtext.DOC_QUESTIONS:
        text = topics[topic].lower()
        assert any(a.lower() in text for a in answers), (topic, question)
        assert not any(a.lower() in question.lower() for a in answers), question  # not given away


@pytest.mark.parametrize("seed", range(4))
def test_doc_qa_prompt_holds_the_whole_section(tok, seed):
    s = generate_sample("doc_qa", 3000, seed, tok)
    section = realtext._topics()[s.meta["topic"]].strip("\n")
    assert section in s.prompt_text and s.meta["question"] in s.prompt_text
    assert s.meta["match"] == "any"


@pytest.mark.parametrize("seed", range(4))
def test_code_return_answer_is_the_functions_only_return(tok, seed):
    s = generate_sample("code_return", 3000, seed, tok)
    name = re.search(r"function `(\w+)`", s.prompt_text)[1]
    (f,) = [f for f in realtext._functions() if f["name"] == name]
    tree = ast.parse("\n".join(f["lines"]))
    rets = [n for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    assert len(rets) == 1 and ast.unparse(rets[0].value) == ast.unparse(ast.parse(s.answers[0], mode="eval").body)
    assert "\n".join(f["lines"]) in s.prompt_text
    # the name occurs only in the inserted function and the question
    assert len(re.findall(rf"\b{name}\b", s.prompt_text)) == len(re.findall(rf"\b{name}\b", "\n".join(f["lines"]))) + 1


@pytest.mark.parametrize("seed", range(4))
def test_code_caller_answer_calls_the_asked_function(tok, seed):
    s = generate_sample("code_caller", 3000, seed, tok)
    callee = re.search(r"calls `(\w+)`", s.prompt_text)[1]
    funcs = {f["name"]: f for f in realtext._functions()}
    caller = funcs[s.answers[0]]
    assert callee in caller["calls"]
    body = "\n".join(caller["lines"])
    assert body in s.prompt_text and "\n".join(funcs[callee]["lines"]) in s.prompt_text
    # no other function in the prompt calls it: every call site is in the caller
    calls_in_prompt = len(re.findall(rf"\b{callee}\(", s.prompt_text))
    assert calls_in_prompt == len(re.findall(rf"\b{callee}\(", body)) + 1  # + its own def


@pytest.mark.parametrize("seed", range(4))
def test_chat_recall_asks_about_a_turn_that_is_there(seed):
    from lsa_sglang.assets import fetch_model
    from lsa_sglang.bench.tokens import load_hf_tokenizer

    qwen = load_hf_tokenizer(str(fetch_model("qwen2.5-0.5b")))
    s = generate_sample("chat_recall", 3000, seed, qwen)
    users = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", s.prompt_text, flags=re.S)
    assert len(users) >= 4
    asked = users[s.meta["asked_turn"]]
    assert re.search(rf"\b{s.answers[0]}\b", asked), (asked, s.answers)
    assert ("first" if s.meta["asked_turn"] == 0 else "second") in users[-1]
    # the asked keyword names no other user turn
    assert not any(re.search(rf"\b{s.answers[0]} statement", u) for i, u in enumerate(users[:-1])
                   if i != s.meta["asked_turn"])


def test_real_text_prompts_fit_the_length(tok):
    for task in REAL_TEXT_TASKS:
        if task == "summary":
            pytest.importorskip("lsa_sglang.bench.corpus")
        s = generate_sample(task, 4096, 11, tok)
        assert 4096 - 8 <= s.n_tokens <= 4096 and s.n_tokens == tok.count(s.prompt_text), task


def test_scoring_rules():
    assert score("Answer: `NameError`", ["NameError"], "any") == 1.0
    assert score("Answer: `if`", ["if"], "word") == 1.0 and score("specifically", ["if"], "word") == 0.0
    assert score("return a+b", ["a + b"], "code") == 1.0 and score("a - b", ["a + b"], "code") == 0.0
    assert score("anything", [], "dense") is None
    assert shared_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and shared_prefix([], [1]) == 0
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0 and rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 9]) == pytest.approx(0.75)  # LCS 3 of 4 each way
    assert rouge_l([], []) == 1.0 and rouge_l([], [1]) == 0.0


def _rec(task, seed, method, ids, match, sc=None):
    return {"task": task, "length": 1000, "seed": seed, "method": method, "policy": method, "budget": None,
            "output_ids": ids, "match": match, "score": sc, "all_found": None if sc is None else sc == 1.0}


def test_judging_against_dense_and_paired_intervals():
    recs = []
    for seed in range(6):
        ref = [seed, 1, 2, 3]
        recs.append(_rec("summary", seed, "dense", ref, "dense"))
        recs.append(_rec("summary", seed, "lsa", ref if seed < 3 else [seed, 1, 9, 9], "dense"))
        recs.append(_rec("doc_qa", seed, "dense", [7], "any", 1.0))
        recs.append(_rec("doc_qa", seed, "lsa", [7] if seed else [8], "any", 1.0 if seed else 0.0))
    recs.append(_rec("summary", 99, "lsa", [1], "dense"))  # no dense answer: not judged
    judge_against(recs)
    lsa = [r for r in recs if r["method"] == "lsa" and r["task"] == "summary" and r["seed"] < 6]
    assert [r["identical"] for r in lsa] == [True] * 3 + [False] * 3
    assert [r["score"] for r in lsa] == [1.0] * 3 + [0.5] * 3 and [r["shared_prefix"] for r in lsa][3:] == [2] * 3
    assert recs[-1]["score"] is None and "identical" not in recs[-1]
    dense_row, lsa_row = summarize(recs, ["dense", "lsa"])
    assert dense_row["mean"] == 100.0 and dense_row["identical"] == 100.0 and "delta" not in dense_row
    assert lsa_row["tasks"] == {"summary": 75.0, "doc_qa": pytest.approx(500 / 6)}
    assert lsa_row["delta"] == pytest.approx(lsa_row["mean"] - 100.0)
    lo, hi = lsa_row["delta_ci"]
    assert lo <= lsa_row["delta"] <= hi < 0
    assert lsa_row["identical"] == pytest.approx(100 * 8 / 12)
    table = format_table([dense_row, lsa_row], ["summary", "doc_qa"])
    assert "vs dense" in table and f"{lsa_row['delta']:+.1f}" in table


def test_bootstrap_interval_is_reproducible_and_narrows_with_more_prompts():
    few = {"a": [1.0, 0.0, 1.0, 0.0]}
    many = {"a": [1.0, 0.0] * 50}
    assert bootstrap_ci(few) == bootstrap_ci(few)
    (lo1, hi1), (lo2, hi2) = bootstrap_ci(few), bootstrap_ci(many)
    assert lo1 < 50 < hi1 and lo2 < 50 < hi2 and hi2 - lo2 < hi1 - lo1
    assert bootstrap_ci({"a": [1.0] * 5}) == (100.0, 100.0)


def test_a_haystack_goes_on_with_the_next_item_when_it_grows():
    """Lines of items in a seeded order: asked for more lines later, the stream continues where it
    stopped (no item repeats before every item came), and shorter asks are its prefixes."""
    import random as _random

    items = [f"item{i}" for i in range(6)]
    take = realtext._stream(_random.Random(1), items, lambda it: [f"{it} line {j}" for j in range(3)])
    short = take(5)
    long = take(27)
    assert long[:5] == short and take(5) == short
    firsts = [line.split()[0] for line in long[::4]]  # each item: 3 lines and a blank
    assert sorted(firsts[:6]) == items and firsts[6] == firsts[0]  # all six, then the order again
    assert take(2, pad=1) == long[:2] + [long[2].split()[0]]
