"""The accuracy suite: send fitted prompts to a server under one or more methods, score, summarize.

A *method* is which server answers plus the LSA per-request overrides it gets: stock SGLang, dense
attention on the LSA server (`enabled: false`), the indexer, and the baselines at the same page
budget (`recency`, `random`, `quest`: Quest's min/max bound with the backbone's query at every
layer). Prompts are sent sample-major: one prompt under every method back to back, so once
SGLang's prefix cache works with LSA the prompt is prefilled once and only the decode differs
between methods. The device KV ratio of a request comes from
`/lsa/stats` (peak device KV bytes during decode / full KV bytes), matched by the request id.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsa_sglang.bench.client import ServerClient, ServerError
from lsa_sglang.bench.scoring import rouge_l, score, shared_prefix
from lsa_sglang.bench.tasks import Sample
from lsa_sglang.config import POLICIES

# method name -> the LSA overrides it adds to its policy (A/B of one setting)
VARIANTS = {
    "indexer-nofallback": ("indexer", {"needle_fallback": False}),
    "attention-last": ("attention", {"attention_rows": 1}),
    "attention-rows": ("attention", {"attention_rows": 64}),
    "attention-spill": ("attention", {"attention_spill": 16}),
    "attention-no-spill": ("attention", {"attention_spill": 0}),
    "attention-carry": ("attention", {"attention_later": "carry"}),
    "attention-later-indexer": ("attention", {"attention_later": "indexer"}),
    "attention-swap-all": ("attention", {"swap_limit": None}),
    "attention-reselect": ("attention", {"reselect": "quest"}),
    "attention-no-reselect": ("attention", {"reselect": "off"}),
    "attention-reselect-after0": ("attention", {"reselect_after": 0}),
    "attention-reselect-after8": ("attention", {"reselect_after": 8}),
    "attention-release": ("attention", {"release_copied": 4}),
    "attention-release3": ("attention", {"release_copied": 3}),
    "attention-no-release": ("attention", {"release_copied": 0}),
    "attention-siblings": ("attention", {"copy_siblings": 8}),
    "attention-no-siblings": ("attention", {"copy_siblings": 0}),
    "attention-fixed-budget": ("attention", {"budget_fraction": None}),
    "attention-layers": ("attention", {"attention_heads": None}),
    "attention-layers-spill": ("attention", {"attention_heads": None, "attention_spill": 16}),
    # the mechanism alone: window 0 from the prefill's attention (every layer), re-selection from
    # the step's query at once; none of the rules fitted to the RULER templates
    "attention-core": ("attention", {"attention_spill": 0, "release_copied": 0, "copy_siblings": 0,
                                     "reselect_after": 0, "attention_first_layer": 0}),
}

FIRST_LAYER = re.compile(r"attention-from(\d+)")  # the `attention` policy, window 0 from layer N up


def variant(name: str) -> tuple[str, dict[str, Any]] | None:
    """The policy and overrides a method name stands for (a policy, a VARIANTS key or
    attention-from<N>), None for any other name."""
    if name in POLICIES:
        return name, {}
    if name in VARIANTS:
        return VARIANTS[name]
    first = FIRST_LAYER.fullmatch(name)
    return ("attention", {"attention_first_layer": int(first[1])}) if first else None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # stock | dense | lsa | a policy | a VARIANTS key | attention-from<N> | server (accuracy against a URL)
    server: str  # "stock" or "lsa": which server answers
    lsa: dict[str, Any] | None = None  # custom_params["lsa"]
    budget: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget}"


def build_methods(names: Sequence[str], budgets: Sequence[int | None]) -> list[Method]:
    """stock and dense once each; every policy once per budget (None: the server's own budget)."""
    out: list[Method] = []
    for name in names:
        if name == "stock":
            out.append(Method("stock", "stock"))
        elif name == "dense":
            out.append(Method("dense", "lsa", {"enabled": False}))
        elif name == "lsa":  # the server's preset exactly as served, no override
            out.append(Method("lsa", "lsa"))
        elif (found := variant(name)) is not None:
            policy, extra = found
            for b in budgets:
                over: dict[str, Any] = {"policy": policy, **extra}
                if b is not None:
                    over["page_budget"] = b
                out.append(Method(name, "lsa", over, b))
        else:
            raise ValueError(f"unknown method {name!r}; known: stock, dense, lsa, "
                             f"{', '.join(POLICIES + tuple(VARIANTS))}, attention-from<N>")
    return out


def run_one(client: ServerClient, sample: Sample, method: Method, max_new_tokens: int | None = None,
            read_stats: bool = True) -> dict[str, Any]:
    """One request: prediction, score, and (on an LSA server) its device/full KV bytes."""
    rec: dict[str, Any] = {
        "task": sample.task, "length": sample.target_tokens, "seed": sample.seed, "n_tokens": sample.n_tokens,
        "method": method.label, "policy": method.name, "budget": method.budget, "answers": sample.answers,
    }
    try:
        out = client.generate(sample.prompt_text, max_new_tokens or sample.max_new_tokens, method.lsa)
    except ServerError as e:
        rec.update(error=str(e), prediction="", score=0.0, all_found=False)
        return rec
    meta = out.get("meta_info", {})
    pred = out.get("text", "")
    match = sample.meta.get("match", "all")
    got = score(pred, sample.answers, match)
    rec.update(
        prediction=pred,
        output_ids=out.get("output_ids"),
        match=match,
        score=got,
        all_found=None if got is None else got == 1.0,
        rid=meta.get("id"),
        prompt_tokens=meta.get("prompt_tokens"),
        completion_tokens=meta.get("completion_tokens"),
        cached_tokens=meta.get("cached_tokens"),
        latency_s=meta.get("e2e_latency"),
    )
    st = client.request_stats(meta.get("id", "")) if (read_stats and method.server == "lsa") else None
    if st is not None:
        peak, full = st.get("peak_device_kv_bytes", 0), st.get("full_kv_bytes", 0)
        rec.update(peak_device_kv_bytes=peak, full_kv_bytes=full, kv_ratio=(peak / full) if full else None,
                   lsa_policy=st.get("policy"), lsa_enabled=st.get("lsa_enabled"), windows=st.get("windows"),
                   fallbacks=st.get("fallbacks"), chunks_copied=st.get("chunks_copied"), stalls=st.get("stalls"),
                   reselections=st.get("reselections"),
                   copies_released=st.get("copies_released"), sibling_reselections=st.get("sibling_reselections"),
                   lookahead_wanted=st.get("lookahead_wanted"), lookahead_hits=st.get("lookahead_hits"))
    elif method.server == "stock":
        rec.update(kv_ratio=1.0, kv_source="stock keeps the full KV on the device")
    return rec


def run_suite(client: ServerClient, samples: Sequence[Sample], methods: Sequence[Method], *,
              max_new_tokens: int | None = None, progress: bool = True, desc: str = "requests") -> list[dict[str, Any]]:
    """Every sample under every method, sample-major (same prompt back to back)."""
    from tqdm import tqdm

    read_stats = client.is_lsa()
    records = []
    with tqdm(total=len(samples) * len(methods), desc=desc, unit="req", disable=not progress) as bar:
        for sample in samples:
            for m in methods:
                bar.set_postfix_str(f"{sample.task} {sample.target_tokens} {m.label}", refresh=False)
                records.append(run_one(client, sample, m, max_new_tokens, read_stats))
                bar.update(1)
    return records


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def judge_against(records: Sequence[dict[str, Any]], reference: str = "dense") -> None:
    """Set, on every record whose prompt the `reference` method also answered: `identical` (the
    same greedy tokens), `shared_prefix` (leading tokens in common) and `reference_tokens`; a
    record of a task judged against the reference (match "dense") gets its score, the ROUGE-L F1
    of its tokens against the reference's."""
    key = lambda r: (r["task"], r["length"], r.get("seed"))  # noqa: E731
    refs = {key(r): r for r in records if r["method"] == reference and r.get("output_ids") is not None}
    for r in records:
        ref = refs.get(key(r))
        if ref is None or r.get("output_ids") is None:
            continue
        mine, theirs = r["output_ids"], ref["output_ids"]
        r.update(identical=mine == theirs, shared_prefix=shared_prefix(mine, theirs), reference_tokens=len(theirs))
        if r.get("match") == "dense":
            r.update(score=rouge_l(mine, theirs), all_found=mine == theirs)


def bootstrap_ci(by_task: dict[str, list[float]], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over tasks of each task's mean (x 100), prompts resampled within
    their task (percentile bootstrap, a fixed seed so a table is reproducible)."""
    groups = [v for v in by_task.values() if v]
    if not groups:
        return math.nan, math.nan
    rng = random.Random(seed)
    stats = sorted(sum(sum(rng.choices(v, k=len(v))) / len(v) for v in groups) / len(groups) for _ in range(n))
    return 100 * stats[int(0.025 * n)], 100 * stats[int(0.975 * n) - 1]


def summarize(records: Sequence[dict[str, Any]], method_order: Sequence[str] | None = None,
              reference: str = "dense") -> list[dict[str, Any]]:
    """One row per (method, length): score per task (mean x 100), their mean with a bootstrap 95%
    interval, KV ratio; where the `reference` method answered the same prompts (`judge_against`),
    the paired difference to it with its interval and the share of token-identical answers."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["length"])].append(r)
    key = lambda r: (r["task"], r.get("seed"))  # noqa: E731
    order = {m: i for i, m in enumerate(method_order or [])}
    rows = []
    for (method, length), recs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99), kv[0][0])):
        by_task: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            if r["score"] is not None:
                by_task[r["task"]].append(r["score"])
        tasks = {t: 100 * _mean(v) for t, v in by_task.items()}
        ratios = [r["kv_ratio"] for r in recs if r.get("kv_ratio") is not None]
        found = [float(r["all_found"]) for r in recs if r.get("all_found") is not None]
        row = {
            "method": method, "policy": recs[0]["policy"], "budget": recs[0]["budget"], "length": length,
            "tasks": tasks, "mean": _mean(list(tasks.values())), "ci": bootstrap_ci(by_task),
            "all_found": 100 * _mean(found), "kv_ratio": _mean(ratios) if ratios else None, "n": len(recs),
            "errors": sum(1 for r in recs if r.get("error")),
        }
        ref = {key(r): r["score"] for r in groups.get((reference, length), []) if r["score"] is not None}
        diffs: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            if r["score"] is not None and key(r) in ref:
                diffs[r["task"]].append(r["score"] - ref[key(r)])
        wanted = sum(r.get("lookahead_wanted") or 0 for r in recs)
        if wanted:
            row["lookahead_hit_rate"] = sum(r.get("lookahead_hits") or 0 for r in recs) / wanted
        same = [r for r in recs if "identical" in r]
        if diffs and method != reference:
            row.update(delta=100 * _mean([_mean(v) for v in diffs.values()]), delta_ci=bootstrap_ci(diffs))
        if same:
            row.update(identical=100 * _mean([float(r["identical"]) for r in same]),
                       shared_prefix=_mean([r["shared_prefix"] / max(r["reference_tokens"], 1) for r in same]))
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """Plain-text table: method, length, score per task, mean with its 95% interval, the paired
    difference to dense with its interval, token-identical answers %, all-found %, KV ratio, n."""
    head = ["method", "length", *tasks, "mean", "95% CI", "vs dense", "same%", "all%", "KV ratio", "n"]
    span = lambda lo, hi: "-" if math.isnan(lo) else f"[{lo:.1f}, {hi:.1f}]"  # noqa: E731
    lines = []
    for r in rows:
        cells = [r["method"], str(r["length"])]
        cells += [f"{r['tasks'][t]:.1f}" if t in r["tasks"] else "-" for t in tasks]
        cells += [f"{r['mean']:.1f}", span(*r["ci"]),
                  f"{r['delta']:+.1f} {span(*r['delta_ci'])}" if "delta" in r else "-",
                  f"{r['identical']:.0f}" if "identical" in r else "-",
                  "-" if math.isnan(r["all_found"]) else f"{r['all_found']:.0f}",
                  "n/a" if r["kv_ratio"] is None else f"{r['kv_ratio']:.3f}",
                  str(r["n"]) + (f" ({r['errors']} err)" if r["errors"] else "")]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(c) for c in lines)])


def plot_accuracy_vs_kv(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Mean accuracy against device KV ratio, one line per policy across budgets, one panel per length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    markers = {"stock": "*", "dense": "D", "indexer": "o", "recency": "s", "random": "^", "quest": "v"}
    for ax, length in zip(axes[0], lengths):
        here = [r for r in rows if r["length"] == length and r["kv_ratio"] is not None]
        for policy in dict.fromkeys(r["policy"] for r in here):
            pts = sorted((r["kv_ratio"], r["mean"], r["budget"]) for r in here if r["policy"] == policy)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            size = {"stock": 15, "dense": 8}.get(policy, 6)  # stock drawn large and on top of dense
            ax.plot(xs, ys, marker=markers.get(policy, "o"), linestyle="-" if len(pts) > 1 else "none",
                    markersize=size, label=policy, zorder=5 if policy == "stock" else 3,
                    markerfacecolor="none" if policy == "stock" else None, markeredgewidth=1.5)
            for x, y, b in pts:
                if b is not None:
                    ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("device KV / full KV (peak during decode)")
        ax.set_ylabel("mean accuracy (RULER string match, %)")
        ax.set_title(f"{length} tokens")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # wrapped to the figure's width (~12 characters an inch at 10 pt), a long task list at its commas
    fig.suptitle(textwrap.fill(re.sub(r",(?=\S)", ", ", title), width=int(12 * fig.get_figwidth())), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
