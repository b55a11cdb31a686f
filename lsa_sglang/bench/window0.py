"""Window-0 selection rules judged by answers, offline: one dense prefill per prompt, every rule decoded.

Runs without a server (transformers, CPU): per prompt one dense prefill keeps the post-RoPE keys and
values of every layer and the queries of the last ``--rows`` prompt tokens; each rule then scores the
chunks, the product's own selector (`select_chunks`, the preset's sink / tail / budget) picks the
resident set, and the answer is decoded greedily from the pruned cache exactly as LSA serves window 0:
the first token from the dense prefill's logits, every later step reading only the sink chunk, the
picked chunks, the recency tail (and the tokens it generated). Rules differ only in the scores, so
their answers compare at equal device bytes.

Also reported per rule: the needle recall (the fraction of answer strings whose tokens lie in
resident chunks), with ``--reselect`` what the swaps did (`swap_report`: each swap, how many
brought a needle in or took one out, which answer strings were ever on the device) and, for
reference, an *oracle* that picks by the attention the dense decode of the
answer itself paid (the upper bound for any prediction of what the answer reads).

    lsa-bench window0 --tasks niah_multikey niah_multivalue --samples 3 --seed 9500 \\
        --json bench/results/window0-qwen2.5-0.5b.json

With ``--mean-fill`` each rule is also decoded with every dropped chunk read as one mean key and
value (`mean_fill`), to see what the attention mass the selection drops changes in the answers;
with ``--fidelity`` each rule's window-0 set is also scored teacher-forced along the dense answer
(`fidelity`), a measure that does not flip between 0 and 1 on one chunk as an answer's score does.

Prefills are cached under ``--cache`` (fp32 KV, ~200 MB per 8K prompt), so a rule added later costs
only its decodes. The served path is `lsa-bench compare`; this is the quick loop for choosing rules.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from lsa_sglang.assets import model_path_or_fetch
from lsa_sglang.bench.scoring import string_match_all
from lsa_sglang.bench.servers import REPO_ROOT
from lsa_sglang.cli import CliError
from lsa_sglang.bench.tasks import generate_samples
from lsa_sglang.config import read_preset
from lsa_sglang.indexer.attention_signal import (
    attention_scores, copied_chunks, evidence_swap, head_scores, heads_by_layer, layer_chunk_mass, quest_shares,
    quest_window0, raise_held, release_copied,
)
from lsa_sglang.indexer.selector import SelectionParams, candidate_chunks, member_mask, select_chunks

def load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    return tok, model.eval()


class QueryTap:
    """Post-RoPE queries of the last `rows` positions of every layer's input, per forward
    (Qwen2 / Llama-style attention: q_proj, then rotary with the layer's position embeddings)."""

    def __init__(self, model, rows: int):
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        self.rows, self.q = rows, {}
        self._rot = apply_rotary_pos_emb
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i: int):
        def hook(attn, args, kwargs):
            h = kwargs["hidden_states"][:, -self.rows :]
            cos, sin = (t[:, -self.rows :] for t in kwargs["position_embeddings"])
            q = attn.q_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
            q, _ = self._rot(q, q, cos, sin)
            self.q[i] = q[0].transpose(0, 1).detach().clone()  # [R, H, D]

        return hook


def prefill(model, tap: QueryTap, ids: list[int]):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    keys = [layer.keys[0].transpose(0, 1).contiguous() for layer in cache.layers]  # [T, Hk, D]
    values = [layer.values[0].transpose(0, 1).contiguous() for layer in cache.layers]
    return {"first": int(out.logits[0, -1].argmax()), "q": [tap.q[i] for i in range(len(keys))],
            "k": keys, "v": values}


def _cache(state, keep: torch.Tensor | None, fill: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A DynamicCache of the prompt positions `keep` (None: all), then `fill`'s keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for l, (k, v) in enumerate(zip(state["k"], state["v"])):
        if keep is not None:
            k, v = k.index_select(0, keep), v.index_select(0, keep)
        if fill is not None:
            k, v = torch.cat([k, fill[l][0]]), torch.cat([v, fill[l][1]])
        cache.update(k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous(), l)
    return cache


def answer_logprobs(model, state, keep: torch.Tensor | None, answer: list[int]) -> torch.Tensor:
    """Next-token log-probabilities ``[len(answer) - 1, vocab]`` along `answer` (its first token is
    the prefill's), teacher-forced in one forward from the prompt positions `keep` (None: all)."""
    pos = state["k"][0].shape[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([answer[:-1]]), past_key_values=_cache(state, keep), use_cache=True,
                       position_ids=torch.arange(pos, pos + len(answer) - 1)[None]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def fidelity(dense: torch.Tensor, sparse: torch.Tensor, answer: list[int]) -> dict[str, float]:
    """How closely a selection follows the dense answer, teacher-forced (`answer_logprobs` of both):
    the share of the answer's tokens that stay the greedy choice, and the mean KL(dense || sparse)
    of the next-token distributions. Continuous where the answer's score is 0 or 1."""
    if sparse.shape[0] == 0:
        return {"agree": 1.0, "kl": 0.0}
    agree = (sparse.argmax(-1) == torch.tensor(answer[1:])).float().mean()
    kl = (dense.exp() * (dense - sparse)).sum(-1).clamp_min(0).mean()
    return {"agree": round(float(agree), 4), "kl": round(float(kl), 5)}


def decode(model, tap: QueryTap | None, state, keep: torch.Tensor | None, n_new: int, eos: set[int],
           fill: list[tuple[torch.Tensor, torch.Tensor]] | None = None, fill_bias: float = 0.0):
    """Greedy decode from the prefill state reading only prompt positions `keep` (None: all).
    `fill`: per layer extra ``(keys, values)`` read after the kept ones, each key's logit raised by
    `fill_bias` (`mean_fill`). Returns the tokens and, if `tap`, each step's queries per layer
    ([H, D] per layer)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = _cache(state, keep, fill)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if fill is not None:  # one decode row at a time: the bias is the whole mask
        n_keep, n_fill = (state["k"][0].shape[0] if keep is None else keep.numel()), fill[0][0].shape[0]

        def biased(module, q, k, v, mask, **kw):
            bias = torch.zeros(k.shape[2], dtype=q.dtype)
            bias[n_keep : n_keep + n_fill] = fill_bias
            return sdpa(module, q, k, v, bias[None, None, None, :], **kw)

        ALL_ATTENTION_FUNCTIONS["sdpa"] = biased
    pos, tok = state["k"][0].shape[0], state["first"]
    out, queries = [tok], []
    try:
        with torch.no_grad():
            while len(out) < n_new and tok not in eos:
                logits = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]),
                               past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
                if tap is not None:
                    queries.append([tap.q[i][0] for i in range(len(state["k"]))])
                tok, pos = int(logits.argmax()), pos + 1
                out.append(tok)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
    return out, queries


def mean_fill(state, dropped: list[int], cs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer one key and one value per dropped chunk, the means of its tokens' (post-RoPE)
    keys and values: read with the logit raised by ln(cs), a chunk of like keys weighs as much
    as its tokens would, so the softmax keeps roughly the dense prompt's normaliser."""
    n = len(dropped)
    idx = (torch.tensor(dropped)[:, None] * cs + torch.arange(cs)).reshape(-1)
    out = []
    for k, v in zip(state["k"], state["v"]):
        out.append((k.index_select(0, idx).view(n, cs, *k.shape[1:]).mean(1),
                    v.index_select(0, idx).view(n, cs, *v.shape[1:]).mean(1)))
    return out


def exact_shares(qs, state, cs: int, lo: int, hi: int) -> torch.Tensor:
    """One decode step's true read of the candidate chunks ``[hi - lo]``: per layer the chunk mass
    of the step's query over the prompt (heads summed), renormalised over the candidates, max over
    layers (the upper bound for any signal a server can keep for chunks it does not hold)."""
    best = torch.zeros(hi - lo)
    for q, k in zip(qs, state["k"]):
        best = torch.maximum(best, _share(layer_chunk_mass(q, k, q.shape[-1] ** -0.5, hi, cs)[lo:hi]))
    return best


def decode_reselect(model, tap: QueryTap, state, picked: set[int], keep_of, first_scores: torch.Tensor,
                    signal: str, cs: int, lo: int, hi: int, n_new: int, eos: set[int], ids: list[int]):
    """Greedy decode from the window-0 set with re-selection on evidence after every step, as the
    server's `reselect` does (`quest_shares` over every layer's bfloat16 key bounds, then
    `evidence_swap`, one chunk per step; `exact`: the step's true attention instead of the bounds).
    Returns the tokens and the swaps as ``(answer tokens so far, incoming, outgoing)`` chunks."""

    def bound(f):
        return torch.stack([f(k[: hi * cs].view(hi, cs, *k.shape[1:]), 1) for k in state["k"]], 1)[lo:]

    kmin, kmax = bound(torch.amin).to(torch.bfloat16), bound(torch.amax).to(torch.bfloat16)
    held = first_scores[lo:hi].clone().float()  # largest share each chunk drew so far
    picked = set(picked)
    signal, _, gate = signal.partition("@")  # quest@G: no swap in the answer's first G steps
    signal, _, release = signal.partition("^")  # quest^N: a chunk the answer's last N tokens copy lets go
    allowed = None
    if signal.startswith("quest") and signal != "quest":  # questK: only window 0's top K may come in
        allowed = torch.zeros(hi - lo, dtype=torch.bool)
        allowed[torch.argsort(held, descending=True, stable=True)[: int(signal[5:])]] = True

    def build(gen):  # the picked chunks' cache, then the answer's own keys and values so far
        keep = keep_of(picked)
        return _cache(state, keep, gen), keep.numel()

    cache, n_keep = build(None)
    pos, tok = state["k"][0].shape[0], state["first"]
    out, swaps, copying = [tok], [], []
    with torch.no_grad():
        while len(out) < n_new and tok not in eos:
            logits = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]), past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[0, -1]
            tok, pos = int(logits.argmax()), pos + 1
            out.append(tok)
            qs = [tap.q[i][0] for i in range(len(state["k"]))]
            share = (exact_shares(qs, state, cs, lo, hi) if signal == "exact"
                     else quest_shares(qs, kmin, kmax, [q.shape[-1] ** -0.5 for q in qs]))
            raise_held(held, share)
            if release:
                now = copied_chunks(ids + out, int(release), picked, cs)
                release_copied(held, share, now, copying, lo, hi)
                copying = now
            swap = evidence_swap(share, held, member_mask(picked, lo, hi), allowed)
            if swap is not None and len(out) > int(gate or 0):
                picked = (picked - {lo + swap[1]}) | {lo + swap[0]}
                swaps.append((len(out), lo + swap[0], lo + swap[1]))
                gen = [(layer.keys[0, :, n_keep:].transpose(0, 1), layer.values[0, :, n_keep:].transpose(0, 1))
                       for layer in cache.layers]
                cache, n_keep = build(gen)
    return out, swaps


def swap_report(swaps: list[tuple[int, int, int]], resident: set[int], needles: list[list[int]]) -> dict:
    """What re-selection did for the needles: ``swaps`` as `decode_reselect` returns them,
    ``resident`` window 0's resident set, ``needles`` per answer string its chunks (`needle_chunks`).
    Counts the swaps that brought a needle's chunk in, took one out, and brought in one the
    answer had already had on the device (resident at window 0 or swapped in before); lists the answer
    strings whose every chunk was on the device at some step (window 0 or a swap)."""
    of = {c for cs in needles for c in cs}
    seen, back = set(resident), 0
    for _, incoming, _ in swaps:
        back += incoming in seen
        seen.add(incoming)
    return {"swaps": len(swaps), "needle_in": sum(i in of for _, i, _ in swaps),
            "needle_out": sum(o in of for _, _, o in swaps), "returned": back,
            "needles_ever_resident": [i for i, cs in enumerate(needles) if cs and all(c in seen for c in cs)],
            "log": [list(s) for s in swaps]}


def needle_chunks(tok, text: str, answers: list[str], cs: int) -> list[list[int]]:
    """Per answer string, the chunks holding its tokens (its first occurrence in the prompt)."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    out = []
    for a in answers:
        at = text.find(a)
        if at < 0:
            out.append([])
            continue
        toks = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < at + len(a) and e > at]
        out.append(sorted({i // cs for i in toks}))
    return out


# --- rules: chunk scores [n] from the prompt rows' attention ------------------------------------

def row_masses(state, rows: int) -> torch.Tensor:
    """Exact causal attention of each of the last `rows` prompt rows on every prompt token, heads
    summed: ``[layers, rows, T]`` (row r at position T - rows + r); `pool` makes it per chunk."""
    out = []
    for q, k in zip(state["q"], state["k"]):
        q = q[-rows:]
        t, hk = k.shape[0], k.shape[1]
        r, h, d = q.shape
        logits = torch.einsum("rkgd,tkd->rkgt", q.view(r, hk, h // hk, d), k) * d ** -0.5
        last = torch.arange(t - r, t)
        logits = logits.masked_fill(torch.arange(t)[None, None, None, :] > last[:, None, None, None], float("-inf"))
        out.append(torch.softmax(logits, dim=-1).reshape(r, h, t).sum(1))
    return torch.stack(out)


def pool(tokens: torch.Tensor, cs: int, lo: int, hi: int) -> torch.Tensor:
    """Token masses ``[..., T]`` summed per chunk of `cs` over candidate chunks ``[lo, hi)``."""
    return tokens[..., lo * cs : hi * cs].reshape(*tokens.shape[:-1], hi - lo, cs).sum(-1)


def _share(m: torch.Tensor) -> torch.Tensor:
    return m / m.sum(-1, keepdim=True).clamp_min(1e-30)


def rule(rows: int, pool: str, first_layer: int = 0) -> Callable:
    """Scores from `row_masses` pooled per chunk ``[L, R, C]``. `pool`: how rows combine before the
    max over layers: sum (masses added, then renormalised: the served `attention_rows`), mean
    (each row's shares renormalised, then averaged) or max."""
    def score(m: torch.Tensor) -> torch.Tensor:
        m = m[first_layer:, -rows:]
        if pool == "sum":
            s = _share(m.sum(1))
        elif pool == "mean":
            s = _share(m).mean(1)
        else:
            s = _share(m).amax(1)
        return s.amax(0)
    return score


def contrast(rows: int, first_layer: int = 3) -> Callable:
    """What the last `rows` rows read beyond what the earlier tapped rows read: per layer the
    rows' summed chunk share minus the share of the rows before the last 64 (plain prompt text,
    so chunks every row attends by position cancel), kept above 0, max over layers."""
    def score(m: torch.Tensor) -> torch.Tensor:
        m = m[first_layer:]
        return (_share(m[:, -rows:].sum(1)) - _share(m[:, :-64].sum(1))).clamp_min(0).amax(0)
    return score


def turns(scores: list[torch.Tensor]) -> torch.Tensor:
    """The budget shared by turns: each score vector's best chunk, then each one's second, ... (a
    chunk scores its best rank under any; ties go to the first vector's score)."""
    ranks = []
    for v in scores:
        order = torch.argsort(v, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        ranks.append(rank)
    best = torch.stack(ranks).amin(0).double()
    return 1.0 / (1.0 + best) + 1e-9 * scores[0].double()


def interleave(*rules: Callable) -> Callable:
    """Rules taking turns (`turns`) over the same masses."""
    return lambda m: turns([r(m) for r in rules])


RULES: dict[str, Callable] = {
    "last": rule(1, "sum"),
    "rows4-sum": rule(4, "sum"),
    "rows8-sum": rule(8, "sum"),
    "rows16-sum": rule(16, "sum"),
    "rows32-sum": rule(32, "sum"),
    "rows64-sum": rule(64, "sum"),
    "rows4-mean": rule(4, "mean"),
    "rows16-mean": rule(16, "mean"),
    "rows64-mean": rule(64, "mean"),
    "rows16-max": rule(16, "max"),
    "rows64-max": rule(64, "max"),
    "rows64-max-l2": rule(64, "max", first_layer=2),
    # two signals, each chunk its larger score: the last token's picks and the key rows' picks
    "last|rows16": lambda m: torch.maximum(rule(1, "sum")(m), rule(16, "sum")(m)),
    "last|rows16-max": lambda m: torch.maximum(rule(1, "sum")(m), rule(16, "max")(m)),
    # two signals taking turns
    "last+rows16": interleave(rule(16, "sum"), rule(1, "sum")),
    "contrast16": contrast(16),
}


def rule_scores(name: str, base: Callable[[str], torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Scores ``[n]`` of a rule name: one rule (`base` scores it), ``A|B|...`` (each chunk its
    largest score under any) or ``A+B+...`` (the budget shared by turns, `turns`) over
    the candidate chunks ``[lo, hi)``; a name in `RULES` is that rule even if it holds + or |."""
    if name in RULES or not re.search(r"[+|]", name):
        return base(name)
    if "+" in name:
        parts = [rule_scores(p, base, lo, hi) for p in name.split("+")]
        out = torch.zeros_like(parts[0])
        out[lo:hi] = turns([v[lo:hi] for v in parts])
        return out
    return torch.stack([base(p) for p in name.split("|")]).amax(0)


def served_options(name: str, cfg) -> dict[str, int]:
    """The served rule's fields from its name: ``served``, ``served-spill16``, ``served-from3``,
    ``served-skip128``, ``served-spill16-from3``, ...; a field the name does not give is the
    preset's. ``skipN``: the chunks of the first N prompt tokens after the sink score 0 (they draw
    the question's attention by position)."""
    opts = {"spill": cfg.attention_spill, "from": cfg.attention_first_layer, "skip": 0,
            "heads": int(cfg.attention_heads is not None)}
    for part in name.split("-")[1:]:
        key = next((k for k in opts if part.startswith(k) and part[len(k):].isdigit()), None)
        if key is None:
            raise ValueError(f"rule {name!r}: expected served, served-spillN, served-fromN, served-skipN, "
                             "served-heads0|1 or several joined (served-spillN-fromM)")
        opts[key] = int(part[len(key):])
    if opts["heads"] and cfg.attention_heads is None:
        raise ValueError(f"rule {name!r}: the preset lists no attention_heads")
    return opts


def oracle_scores(state, steps, cs: int, lo: int, hi: int) -> torch.Tensor:
    """Largest per-layer share any decode step of the dense answer gave a chunk."""
    t = state["k"][0].shape[0]
    best = torch.zeros(hi - lo)
    for qs in steps:
        for q, k in zip(qs, state["k"]):
            m = layer_chunk_mass(q, k[:t], q.shape[-1] ** -0.5, hi, cs)[lo:hi]
            best = torch.maximum(best, _share(m))
    return best


def equal_bytes(cfg, cs: int, exact: bool = True) -> SelectionParams:
    """The preset's selection at chunk size `cs` with the same device tokens: sink, budget and
    tail kept in tokens (one chunk per page). Not `exact`: a budget `cs` does not divide (one
    grown by `budget_fraction`) rounds down."""
    per = cfg.chunk_size * cfg.chunks_per_page
    if (exact and (cfg.page_budget * per) % cs) or (cfg.sink_chunks * cfg.chunk_size) % cs:
        raise CliError(f"chunk size {cs} does not divide the preset's budget or sink")
    return SelectionParams.from_config(cfg.replace(
        chunk_size=cs, chunks_per_page=1, page_budget=cfg.page_budget * per // cs,
        sink_chunks=cfg.sink_chunks * cfg.chunk_size // cs, min_pages=0))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--preset", default=str(REPO_ROOT / "server_configs" / "cpu-qwen2.5-0.5b.yaml"))
    ap.add_argument("--tasks", nargs="+", default=["niah_multikey", "niah_multivalue"])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=9500)
    ap.add_argument("--budget", type=int, default=None, help="pages (default: the preset's)")
    ap.add_argument("--chunks", type=int, nargs="+", default=None,
                    help="chunk sizes to judge every rule at, equal device tokens (default: the preset's); "
                         "a rule at another size than the preset's is reported as rule@size")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="page_budget/recent_tokens pairs to judge every rule at, the preset's chunk size "
                         "(e.g. 9/256 12/128; instead of --chunks); a shape other than the preset's is reported as "
                         "rule[pages/recent]")
    ap.add_argument("--rules", nargs="+", default=["served", *RULES, "oracle"],
                    help="served (the server's code path, the preset's fields), served-spillN (with "
                         "attention_spill N), served-fromN (attention_first_layer N), served-skipN (no pick "
                         "among the first N tokens after the sink), served-heads0 (every layer from attention_first_layer, "
                         "not the preset's attention_heads), served-heads1 (those heads), served-spillN-fromM, "
                         "quest (the `quest` policy's window 0), oracle, rules joined by | (each chunk its "
                         "largest score) or + (the budget shared by turns), or: " + " ".join(RULES))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--reselect", nargs="*", default=[],
                    help="also decode each rule with re-selection on evidence after every step: exact, quest, "
                         "questK (only the rule's top K chunks may come in), any of them ^N (release_copied N) and @G "
                         "(no swap in the "
                         "answer's first G tokens); reported as rule+quest, rule+quest14@16, rule+quest^3@16, ...")
    ap.add_argument("--reselect-only", action="store_true",
                    help="with --reselect: skip each rule's decode without re-selection")
    ap.add_argument("--mean-fill", action="store_true",
                    help="also decode each rule with every dropped candidate chunk read as one mean key and "
                         "value (logit + ln chunk size; reported as rule+mean): what the dropped mass adds")
    ap.add_argument("--fidelity", action="store_true",
                    help="also report, per rule without re-selection, how closely it follows the dense answer "
                         "teacher-forced (`fidelity`: tokens kept as the greedy choice, mean KL): a measure that "
                         "separates rules on few prompts, where scores of 0 or 1 flip on one chunk")
    ap.add_argument("--cache", default="/tmp/lsa-window0-cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = read_preset(args.preset)[0]
    for name in args.rules:  # a misspelt rule fails now, not after the first prefill
        for part in ([name] if name in RULES else re.split(r"[+|]", name)):
            if part.startswith("served"):
                try:
                    served_options(part, cfg)
                except ValueError as e:
                    ap.error(str(e))
            elif part not in RULES and part not in ("oracle", "quest"):
                ap.error(f"unknown rule {part!r}; known: served, quest, oracle, " + ", ".join(RULES))
            elif part.startswith("contrast") and args.rows <= 64:
                ap.error(f"rule {part!r} compares the last rows with those before the last 64: needs --rows above 64")
    if args.budget is not None:
        cfg = cfg.replace(page_budget=args.budget, budget_fraction=None)

    def variants_of(prompt_cfg, exact=True):
        """(chunk size, selection, label suffix) of each judged shape; `prompt_cfg`: the preset
        with the budget one prompt gets (`budget_fraction`); a --shapes budget is taken as given."""
        if not args.shapes:
            return [(cs, equal_bytes(prompt_cfg, cs, exact), "" if cs == cfg.chunk_size else f"@{cs}")
                    for cs in args.chunks or [cfg.chunk_size]]
        variants = []
        for shape in args.shapes:
            pages, recent = (int(x) for x in shape.split("/"))
            mine = pages == cfg.page_budget and recent == cfg.recent_tokens
            variants.append((cfg.chunk_size, SelectionParams.from_config(
                cfg.replace(page_budget=pages, recent_tokens=recent)), "" if mine else f"[{shape}]"))
        return variants

    variants_of(cfg)  # a chunk size that does not divide the budget fails before the model loads
    path = str(model_path_or_fetch(args.model))
    tok, model = load(path)
    tap = QueryTap(model, args.rows)
    gen_eos = model.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    samples = generate_samples(args.tasks, [args.length], args.samples, path, seed=args.seed)
    cache_dir = Path(args.cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        ids = tok(s.prompt_text, add_special_tokens=False)["input_ids"]
        key = hashlib.sha1(f"{path}:{args.rows}:{s.prompt_text}".encode()).hexdigest()[:16]
        f = cache_dir / f"{key}.pt"
        t0 = time.perf_counter()
        if f.exists():
            state = torch.load(f)
        else:
            state = prefill(model, tap, ids)
            torch.save(state, f)
        t_pre = time.perf_counter() - t0
        tokens = row_masses(state, args.rows)
        dense, steps = decode(model, tap, state, None, s.max_new_tokens, eos)
        rec = {"task": s.task, "seed": s.seed, "n_tokens": len(ids), "answers": s.answers, "needle_chunks": {},
               "prefill_s": round(t_pre, 1), "rules": {}}
        dense_lp = answer_logprobs(model, state, None, dense) if args.fidelity else None
        text = tok.decode(dense, skip_special_tokens=True)
        rec["rules"]["dense"] = {"prediction": text, "score": string_match_all(text, s.answers)}
        for cs, params, suffix in variants_of(cfg.for_prompt(len(ids)), exact=False):  # the budget served
            n = len(ids) // cs
            cand = candidate_chunks(n, params)
            lo, hi = int(cand[0]), int(cand[-1]) + 1
            masses = pool(tokens, cs, lo, hi)
            needles = rec["needle_chunks"][cs] = needle_chunks(tok, s.prompt_text, s.answers, cs)
            def base(name: str) -> torch.Tensor:
                if name.startswith("served"):  # the product's own code path, as the server runs it
                    opts = served_options(name, cfg)
                    if opts["heads"]:  # the preset's retrieval heads alone
                        by_layer = heads_by_layer(cfg.attention_heads)
                        read = list(by_layer)
                        qs = [state["q"][l][-cfg.attention_rows :] for l in read]
                        scores = head_scores(qs, [state["k"][l] for l in read], [q.shape[-1] ** -0.5 for q in qs],
                                             [by_layer[l] for l in read], n, cs, (lo, hi), spill=opts["spill"]).double()
                    else:
                        qs, ks = state["q"][opts["from"]:], state["k"][opts["from"]:]
                        scores = attention_scores([q[-cfg.attention_rows :] for q in qs], ks,
                                                  [q.shape[-1] ** -0.5 for q in qs], n, cs, (lo, hi),
                                                  spill=opts["spill"]).double()
                    scores[lo : lo + -(-opts["skip"] // cs)] = 0
                    return scores
                if name == "quest":  # the served `quest` policy's window 0
                    return quest_window0([q[-1] for q in state["q"]], state["k"],
                                         [q.shape[-1] ** -0.5 for q in state["q"]], n, cs, (lo, hi)).double()
                scores = torch.zeros(n, dtype=torch.float64)
                scores[lo:hi] = (oracle_scores(state, steps, cs, lo, hi) if name == "oracle"
                                 else RULES[name](masses)).double()
                return scores

            for name in args.rules:
                scores = rule_scores(name, base, lo, hi)
                sel = select_chunks(n, params, scores=scores)
                res = set(sel.resident.tolist())

                def keep_of(chunks):
                    return torch.tensor([p for p in range(len(ids)) if p // cs in chunks or p >= n * cs])

                keep = keep_of(res)
                label = name + suffix
                runs = [] if args.reselect_only and args.reselect else [(label, None)]
                runs += [(f"{label}+{sig}", sig) for sig in args.reselect]
                runs += [(f"{label}+mean", "mean")] if args.mean_fill else []
                for run_label, sig in runs:
                    swaps = None
                    if sig is None:
                        out, _ = decode(model, None, state, keep, s.max_new_tokens, eos)
                        if args.fidelity:
                            rec["rules"][run_label] = fidelity(dense_lp, answer_logprobs(model, state, keep, dense), dense)
                    elif sig == "mean":
                        fill = mean_fill(state, [c for c in range(lo, hi) if c not in res], cs)
                        out, _ = decode(model, None, state, keep, s.max_new_tokens, eos, fill, math.log(cs))
                    else:
                        forced = res - set(sel.picked.tolist())
                        out, swaps = decode_reselect(
                            model, tap, state, set(sel.picked.tolist()), lambda p: keep_of(p | forced), scores,
                            sig, cs, lo, hi, s.max_new_tokens, eos, ids)
                    text = tok.decode(out, skip_special_tokens=True)
                    recall = sum(bool(c) and all(x in res for x in c) for c in needles) / max(1, len(needles))
                    rec["rules"][run_label] = {**rec["rules"].get(run_label, {}), "prediction": text,
                                               "score": string_match_all(text, s.answers), "needle_recall": recall,
                                               "picked": sel.picked.tolist(), "kv_ratio": len(keep) / len(ids)}
                    if swaps is not None:
                        rec["rules"][run_label]["reselection"] = swap_report(swaps, res, needles)
        records.append(rec)
        print(json.dumps({"task": s.task, "seed": s.seed, "prefill_s": rec["prefill_s"],
                          **{k: (v["score"], v.get("needle_recall"),
                                 len(v["reselection"]["needles_ever_resident"]) if "reselection" in v else None,
                                 v.get("agree")) for k, v in rec["rules"].items()}}), flush=True)
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    close: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        for name, v in r["rules"].items():
            table[name][r["task"]].append(100 * v["score"])
            if "agree" in v:
                close[name].append((v["agree"], v["kl"]))
    summary = {name: {"tasks": {t: sum(v) / len(v) for t, v in per.items()},
                      "mean": sum(sum(v) / len(v) for v in per.values()) / len(per)} for name, per in table.items()}
    for name, pairs in close.items():  # over prompts, not tasks
        summary[name]["agree"] = sum(a for a, _ in pairs) / len(pairs)
        summary[name]["kl"] = sum(k for _, k in pairs) / len(pairs)
    for name, v in summary.items():
        extra = f"  agree={v['agree']:.3f} kl={v['kl']:.4f}" if "agree" in v else ""
        print(f"{name:>12} {v['mean']:6.1f}  " + "  ".join(f"{t}={x:.0f}" for t, x in v["tasks"].items()) + extra)
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "window0", "args": vars(args), "summary": summary,
                                               "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
