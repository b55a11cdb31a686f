"""Scoring as RULER does: every expected string must appear in the prediction (case-insensitive).

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
