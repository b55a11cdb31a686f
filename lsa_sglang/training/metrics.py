"""Offline selection metrics: how much of what the backbone will attend to a policy keeps.

Everything is measured on the candidate chunks only (not sink, not recency tail: those are
resident whatever the policy does). All counts are micro-averaged over samples, i.e. pooled
(a sample with more positives weighs more), and a sample without candidates adds nothing.
Selections follow the server: "served" keeps the chunks above the threshold, at most `budget`
of them by score (the selector with one chunk per page), ties to the more recent chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

COUNT_KEYS = ("tp", "fp", "fn", "kept", "cands", "mass_kept", "mass_cands", "samples")


def rank_order(scores: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Per row, chunk ids sorted by score descending, candidates first, ties to the higher id
    (more recent, as the selector's recency tie-break). ``[P, N]`` -> ``[P, N]`` int64."""
    P, N = scores.shape
    s = scores.double().masked_fill(~cand, float("-inf"))
    flipped = torch.flip(s, dims=[1])  # index N-1-j: a stable sort then prefers higher ids
    order = torch.sort(flipped, dim=1, descending=True, stable=True).indices
    return N - 1 - order


def topk_select(scores: torch.Tensor, cand: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the best `k` candidates per row (``k`` an int or ``[P]``; fewer if fewer exist)."""
    P, N = scores.shape
    order = rank_order(scores, cand)
    kk = torch.as_tensor(k, dtype=torch.int64).expand(P).reshape(P, 1)
    kk = torch.minimum(kk, cand.sum(1, keepdim=True))
    take = torch.arange(N)[None, :] < kk
    return torch.zeros(P, N, dtype=torch.bool).scatter(1, order, take)


def threshold_select(scores: torch.Tensor, cand: torch.Tensor, threshold: float) -> torch.Tensor:
    return (scores > threshold) & cand


def served_select(scores: torch.Tensor, cand: torch.Tensor, threshold: float, budget: int) -> torch.Tensor:
    """What the server keeps: above threshold, at most `budget` of them, best first."""
    n_above = threshold_select(scores, cand, threshold).sum(1)
    return topk_select(scores, cand, torch.clamp(n_above, max=budget))


def selection_counts(sel: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor, mass: torch.Tensor | None = None) -> dict:
    """Pooled counts of one selection ``[P, N]`` against the positives (labels within candidates)."""
    pos = labels & cand
    sel = sel & cand
    out = {
        "tp": int((sel & pos).sum()), "fp": int((sel & ~pos).sum()), "fn": int((~sel & pos).sum()),
        "kept": int(sel.sum()), "cands": int(cand.sum()), "samples": int((cand.sum(1) > 0).sum()),
        "mass_kept": 0.0, "mass_cands": 0.0,
    }
    if mass is not None:
        out["mass_kept"] = float((mass * sel).sum())
        out["mass_cands"] = float((mass * cand).sum())
    return out


def add_counts(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {k: a[k] + b[k] for k in COUNT_KEYS}


def summarise(c: dict) -> dict:
    """precision, recall, F1, keep ratio (kept / candidates) and mass recall from pooled counts."""
    def div(x: float, y: float) -> float:
        return float(x) / y if y else float("nan")

    p = div(c["tp"], c["tp"] + c["fp"])
    r = div(c["tp"], c["tp"] + c["fn"])
    f1 = 2 * p * r / (p + r) if p == p and r == r and (p + r) > 0 else (0.0 if c["tp"] == 0 and c["tp"] + c["fn"] > 0 else float("nan"))
    return {"precision": p, "recall": r, "f1": f1, "keep_ratio": div(c["kept"], c["cands"]),
            "mass_recall": div(c["mass_kept"], c["mass_cands"])}


def recall_at_k(scores: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[int, int]:
    """(hits, positives) of the top-k candidates."""
    sel = topk_select(scores, cand, k)
    pos = labels & cand
    return int((sel & pos).sum()), int(pos.sum())


def auc(scores: Iterable[torch.Tensor], labels: Iterable[torch.Tensor]) -> float:
    """Pooled ROC AUC over candidates (probability a positive outranks a negative, ties half)."""
    s = torch.cat([x.reshape(-1).double() for x in scores])
    y = torch.cat([x.reshape(-1).bool() for x in labels])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inv = torch.unique(s, return_inverse=True)
    pos_hist = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv[y], torch.ones(n_pos, dtype=torch.float64))
    neg_hist = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv[~y], torch.ones(n_neg, dtype=torch.float64))
    neg_below = torch.cumsum(neg_hist, 0) - neg_hist
    return float(((neg_below + 0.5 * neg_hist) * pos_hist).sum() / (n_pos * n_neg))


class MethodAccumulator:
    """Collects every metric of one scoring method over many documents."""

    def __init__(self, ks: tuple[int, ...], threshold: float | None, budget: int) -> None:
        self.ks = ks
        self.threshold = threshold
        self.budget = budget
        self.hits = {k: 0 for k in ks}
        self.positives = 0
        self.counts: dict[str, dict | None] = {"threshold": None, "served": None, "equal_keep": None, "budget": None}
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor, mass: torch.Tensor,
            keep: torch.Tensor | None) -> None:
        """`keep [P]`: chunks per sample at the reference keep ratio (None: skip equal-keep)."""
        for k in self.ks:
            h, n = recall_at_k(scores, labels, cand, k)
            self.hits[k] += h
        self.positives += int((labels & cand).sum())
        if self.threshold is not None:
            sel = threshold_select(scores, cand, self.threshold)
            self.counts["threshold"] = add_counts(self.counts["threshold"], selection_counts(sel, labels, cand, mass))
            sel = served_select(scores, cand, self.threshold, self.budget)
            self.counts["served"] = add_counts(self.counts["served"], selection_counts(sel, labels, cand, mass))
        sel = topk_select(scores, cand, self.budget)
        self.counts["budget"] = add_counts(self.counts["budget"], selection_counts(sel, labels, cand, mass))
        if keep is not None:
            sel = topk_select(scores, cand, keep)
            self.counts["equal_keep"] = add_counts(self.counts["equal_keep"], selection_counts(sel, labels, cand, mass))
        self._scores.append(scores[cand])
        self._labels.append(labels[cand])

    def result(self) -> dict:
        out: dict = {f"recall@{k}": (self.hits[k] / self.positives if self.positives else float("nan")) for k in self.ks}
        for name, c in self.counts.items():
            if c is not None:
                out[name] = {**summarise(c), **{k: c[k] for k in ("tp", "fp", "fn", "kept", "cands")}}
        out["auc"] = auc(self._scores, self._labels)
        out["positives"] = self.positives
        return out


def fmt(x: float) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


__all__ = [
    "MethodAccumulator",
    "add_counts",
    "auc",
    "rank_order",
    "recall_at_k",
    "selection_counts",
    "served_select",
    "summarise",
    "threshold_select",
    "topk_select",
]
