"""`lsa-sglang eval`: a trained indexer against its untrained start and the baseline policies.

On the held-out documents of a dump (split "test": works and Britannica ranges the training
never saw) every method scores the same candidate chunks:
- trained / untrained: the indexer's ensembled score (and each target layer's own score);
- recency, random: the server's baseline policies;
- quest: the Quest upper bound with the backbone's own queries (the untrained q) over per-chunk
  key min/max, i.e. what the server's `quest` policy computes with the default indexer;
- oracle: the labels' own attention mass, a reference ceiling, not a policy.
"Equal keep" gives every method, per sample, exactly as many chunks as the trained indexer's
served selection keeps (threshold, then at most `budget` by score), so recall there compares
rankings at one device footprint. Threshold metrics only exist for the indexers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from lsa_sglang.indexer import load_indexer, read_metadata

from .data import load_dump
from .metrics import MethodAccumulator, fmt, served_select
from .scoring import indexer_scores, quest_doc_scores, random_scores, recency_scores


def _clean(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 5)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def evaluate(
    data: str | os.PathLike,
    ckpt: str | os.PathLike,
    ks: tuple[int, ...] = (2, 4, 8, 16),
    budget: int = 9,
    ensemble: str | None = None,
    split: str = "test",
    seed: int = 0,
    votes: int | None = None,
    per_layer: bool = True,
) -> dict:
    """All metrics of all methods on `split`; the result also carries a printable `table`."""
    dump = load_dump(data, splits=(split,), votes=votes)
    docs = dump.split(split)
    if not docs:
        raise ValueError(f"{data}: the dump has no '{split}' documents to evaluate on")
    spec = dump.spec
    trained = load_indexer(ckpt, expected=spec)
    meta = read_metadata(ckpt).get("training", {})
    how = ensemble or meta.get("ensemble") or "max"
    init = load_indexer(dump.init_checkpoint, expected=spec)
    thr = float(spec.threshold)
    layers = list(spec.target_layers)
    names = ["trained", "untrained", "recency", "random", "quest", "oracle"]
    if per_layer and len(layers) > 1:
        names += [f"trained L{l}" for l in layers] + [f"untrained L{l}" for l in layers]
    acc = {n: MethodAccumulator(ks, thr if n.startswith(("trained", "untrained")) else None, budget) for n in names}
    gen = torch.Generator().manual_seed(seed)
    totals = {"samples": 0, "candidates": 0, "positives": 0}
    for doc in docs:
        s_tr, pl_tr = indexer_scores(trained, doc, how)
        s_un, pl_un = indexer_scores(init, doc, how)
        keep = served_select(s_tr, doc.candidates, thr, budget).sum(1)
        scores = {"trained": s_tr, "untrained": s_un, "recency": recency_scores(doc),
                  "random": random_scores(doc, gen), "quest": quest_doc_scores(init, doc), "oracle": doc.mass}
        for i, l in enumerate(layers):
            scores[f"trained L{l}"], scores[f"untrained L{l}"] = pl_tr[:, i], pl_un[:, i]
        for n in names:
            acc[n].add(scores[n], doc.labels, doc.candidates, doc.mass, keep)
        totals["samples"] += doc.num_samples
        totals["candidates"] += int(doc.candidates.sum())
        totals["positives"] += int((doc.labels & doc.candidates).sum())
    results = {n: a.result() for n, a in acc.items()}
    ref = results["trained"]["served"]
    out = {
        "model_id": spec.model_id,
        "config_hash": spec.config_hash,
        "checkpoint": str(ckpt),
        "data": str(data),
        "split": split,
        "documents": len(docs),
        **totals,
        "positive_rate": totals["positives"] / max(1, totals["candidates"]),
        "threshold": thr,
        "budget": budget,
        "ensemble": how,
        "ks": list(ks),
        "equal_keep_ratio": ref["keep_ratio"],
        "label_params": {k: dump.params.get(k) for k in ("top_p", "votes", "vote_layers", "tau", "chunk_size",
                                                         "sink_chunks", "recent_chunks", "doc_tokens")},
        "methods": results,
    }
    if votes is not None:
        out["label_params"]["votes"] = votes
    out["table"] = format_table(out)
    return _clean(out)


def format_table(r: dict) -> str:
    """One row per method; `eq` columns at the trained indexer's served keep ratio."""
    ks = r["ks"]
    head = (f"{'method':<16} {'keep@eq':>7} {'R@eq':>6} {'mass@eq':>7} "
            + " ".join(f"{'R@' + str(k):>6}" for k in ks)
            + f" {'R@' + str(r['budget']) + 'b':>6} {'P@thr':>6} {'R@thr':>6} {'F1@thr':>6} {'keep@thr':>8} {'AUC':>6}")
    lines = [
        f"{r['model_id']}: {r['documents']} held-out docs, {r['samples']} samples, {r['candidates']} candidate "
        f"chunks, {r['positive_rate']:.1%} positive; threshold {r['threshold']}, budget {r['budget']}, "
        f"ensemble {r['ensemble']}; eq = per sample as many chunks as the trained indexer serves "
        f"(mean keep ratio {r['equal_keep_ratio']:.3f})",
        head,
        "-" * len(head),
    ]
    for name, m in r["methods"].items():
        eq = m.get("equal_keep") or {}
        th = m.get("threshold") or {}
        bud = m.get("budget") or {}
        lines.append(
            f"{name:<16} {fmt(eq.get('keep_ratio')):>7} {fmt(eq.get('recall')):>6} {fmt(eq.get('mass_recall')):>7} "
            + " ".join(f"{fmt(m.get(f'recall@{k}')):>6}" for k in ks)
            + f" {fmt(bud.get('recall')):>6} {fmt(th.get('precision')):>6} {fmt(th.get('recall')):>6} "
            f"{fmt(th.get('f1')):>6} {fmt(th.get('keep_ratio')):>8} {fmt(m.get('auc')):>6}"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, p)


__all__ = ["evaluate", "format_table", "write_json"]
