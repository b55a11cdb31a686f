"""What a task is before it is fitted to a length (`Draft`, `TaskSpec`), and the text helpers
both task families share (`tasks.py`: RULER's formats; `realtext.py`: real text)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Draft:
    """A task instance before fitting: `render(units, pad_words)` -> instruction + context + question
    (or a conversation: role/content dicts)."""

    render: Callable[[int, int], str | list[dict[str, str]]]
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any]
    paddable: bool = False  # units are coarse: fill the remainder with noise words
    max_units: int | None = None  # the task cannot grow beyond this many units


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    build: Callable[[random.Random, int], Draft]  # (rng, target tokens) -> draft
    max_new_tokens: int
    needs_prose: bool = False


def join_words(words: Sequence[str]) -> str:
    """Words joined by spaces; a word carrying a paragraph break ("\\n\\n...") gets no space before."""
    out: list[str] = []
    for w in words:
        if out and not w.startswith("\n"):
            out.append(" ")
        out.append(w)
    return "".join(out)


def prose(rng: random.Random) -> Callable[[int], list[str]]:
    """n -> n prose words from a seeded starting point (wrapping around the corpus)."""
    from lsa_sglang.bench.corpus import prose_words

    corpus = prose_words()
    start = rng.randrange(len(corpus))

    def take(n: int) -> list[str]:
        out = [corpus[(start + i) % len(corpus)] for i in range(n)]
        if out and out[0].startswith("\n"):
            out[0] = out[0].lstrip()
        return out

    return take
