"""Scoring as RULER does: every expected string must appear in the prediction (case-insensitive).
Real-text tasks (`realtext.py`) say in `Sample.meta["match"]` which rule judges them: any accepted
answer, any answer ignoring whitespace (code), any as a whole word, or agreement with dense
attention's answer.

RULER's `string_match_all` gives a sample the fraction of its expected strings found in the
prediction (so a multi-value answer with 3 of 4 values scores 0.75) and reports the mean x 100.
We keep that as `score` and also record `all_found` (every string present), the stricter reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters removed, surrounding whitespace stripped."""
    return _CONTROL.sub("", text).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` contained in `prediction`, case-insensitive; 1.0 for no answers."""
    if not answers:
        return 1.0
    pred = clean_prediction(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def all_found(prediction: str, answers: Sequence[str]) -> bool:
    return string_match_all(prediction, answers) == 1.0


def mean_percent(scores: Iterable[float]) -> float:
    """Task score as RULER reports it: mean x 100 (nan for no samples)."""
    values = list(scores)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def any_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any accepted answer is in `prediction` (case-insensitive), else 0.0."""
    pred = clean_prediction(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


def code_match(prediction: str, answers: Sequence[str]) -> float:
    """`any_match` with all whitespace removed on both sides (code answers may be re-spaced)."""
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    return any_match(squash(prediction), [squash(a) for a in answers])


def word_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any accepted answer is in `prediction` as a whole word (case-insensitive): a
    keyword such as "if" must not count inside "specific"."""
    pred = clean_prediction(prediction).lower()
    return float(any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", pred) for a in answers))


# Sample.meta["match"] -> the scorer; "dense" is scored against dense attention's answer later
MATCHERS = {"all": string_match_all, "any": any_match, "code": code_match, "word": word_match}


def score(prediction: str, answers: Sequence[str], match: str = "all") -> float | None:
    """The sample's score under its matching rule; None for "dense" (judged against a reference)."""
    if match == "dense":
        return None
    return MATCHERS[match](prediction, answers)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two answers share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rouge_l(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence); 1.0 when both are empty."""
    if not prediction or not reference:
        return float(not prediction and not reference)
    prev = [0] * (len(reference) + 1)
    for x in prediction:
        cur = [0]
        for j, y in enumerate(reference):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return 2 * p * r / (p + r)
