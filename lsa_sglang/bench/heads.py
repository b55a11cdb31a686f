"""Find a model's retrieval heads: the heads that read the prompt token the answer copies next.

Runs without a server (transformers, CPU), on the synthetic retrieval prompts of `lsa-bench
compare`: per prompt one dense prefill (cached as `lsa-bench window0` caches it), then a greedy
dense decode of the answer. At every step whose next token is a token of one of the prompt's
answer strings (a value the answer copies), each head of each layer scores a hit when the prompt
token it reads most (its largest attention logit) is an answer token equal to that next token. A
head's retrieval score is its hits over those steps: near 1 for the few heads that copy from
the prompt, near 0 for those that attend by position or locally. The top ones are the model's
`attention_heads` (docs/configuration.md): window 0 then scores chunks by their attention only.

    lsa-bench heads --samples 2 --seed 14500 --top 8 --json bench/results/heads-qwen2.5-0.5b.json

Use seeds no accuracy study judges on: the heads are chosen on these prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from lsa_sglang.assets import model_path_or_fetch
from lsa_sglang.bench import window0
from lsa_sglang.bench.tasks import generate_samples


def answer_positions(tok, text: str, answers: list[str]) -> list[int]:
    """Prompt token positions of every occurrence of every answer string."""
    offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    spans = []
    for a in answers:
        at = text.find(a)
        while at >= 0:
            spans.append((at, at + len(a)))
            at = text.find(a, at + 1)
    return [i for i, (s, e) in enumerate(offsets) if any(s < b and e > a for a, b in spans)]


def copy_hits(steps, answer: list[int], ids: list[int], positions: list[int], keys) -> tuple[torch.Tensor, int]:
    """Per ``[layer, head]`` how many of the copying steps it read the copied token at most, and
    how many steps copied. ``steps``: each decode step's queries per layer ``[H, D]`` (step j
    reads ``answer[j]`` and predicts ``answer[j + 1]``); ``keys`` per layer ``[T, Hk, D]`` of
    the prompt; ``positions``: the answer strings' prompt positions (`answer_positions`)."""
    pos = torch.tensor(positions, dtype=torch.long)
    tokens = torch.tensor(ids, dtype=torch.long)[pos] if positions else torch.zeros(0, dtype=torch.long)
    hits, events = None, 0
    for j, qs in enumerate(steps):
        copied = pos[tokens == answer[j + 1]] if j + 1 < len(answer) else pos[:0]
        if copied.numel() == 0:
            continue
        events += 1
        source = torch.zeros(keys[0].shape[0], dtype=torch.bool)
        source[copied] = True
        step = []
        for q, k in zip(qs, keys):
            heads, kv_heads, dim = q.shape[0], k.shape[1], q.shape[-1]
            logits = torch.einsum("kgd,tkd->kgt", q.float().view(kv_heads, heads // kv_heads, dim), k.float())
            step.append(source[logits.reshape(heads, -1).argmax(-1)])
        hit = torch.stack(step).float()
        hits = hit if hits is None else hits + hit
    if hits is None:
        hits = torch.zeros(len(keys), steps[0][0].shape[0] if steps else 0)
    return hits, events


def top_heads(scores: torch.Tensor, k: int) -> list[list[int]]:
    """The `k` best ``[layer, head]`` pairs of a ``[layers, heads]`` score table, sorted."""
    heads = scores.shape[1]
    best = torch.topk(scores.flatten(), min(k, scores.numel())).indices.tolist()
    return sorted([i // heads, i % heads] for i in best)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue", "vt",
                                                   "niah_single_prose", "niah_multikey_prose", "niah_manyvalues"])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=14500)
    ap.add_argument("--top", type=int, default=8, help="heads to list as attention_heads")
    ap.add_argument("--rows", type=int, default=128, help="the prefill cache's key (`lsa-bench window0 --rows`)")
    ap.add_argument("--cache", default="/tmp/lsa-window0-cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error("--top must be at least 1")

    path = str(model_path_or_fetch(args.model))
    tok, model = window0.load(path)
    tap = window0.QueryTap(model, args.rows)
    gen_eos = model.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    cache_dir = Path(args.cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    hits, events, prompts = None, 0, []
    for s in generate_samples(args.tasks, [args.length], args.samples, path, seed=args.seed):
        ids = tok(s.prompt_text, add_special_tokens=False)["input_ids"]
        f = cache_dir / (hashlib.sha1(f"{path}:{args.rows}:{s.prompt_text}".encode()).hexdigest()[:16] + ".pt")
        t0 = time.perf_counter()
        if f.exists():
            state = torch.load(f)
        else:
            state = window0.prefill(model, tap, ids)
            torch.save(state, f)
        answer, steps = window0.decode(model, tap, state, None, s.max_new_tokens, eos)
        h, n = copy_hits(steps, answer, ids, answer_positions(tok, s.prompt_text, s.answers), state["k"])
        hits = h if hits is None else hits + h
        events += n
        prompts.append({"task": s.task, "seed": s.seed, "copy_steps": n, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(prompts[-1]), flush=True)
    if not events:
        raise SystemExit("no answer copied a token of its prompt: no retrieval head can be told apart")
    scores = hits / events
    chosen = top_heads(scores, args.top)
    print(f"{events} copying steps over {len(prompts)} prompts; best heads (layer, head, score):")
    for layer, head in sorted(chosen, key=lambda x: -float(scores[x[0], x[1]])):
        print(f"  {layer:3d} {head:3d}  {float(scores[layer, head]):.3f}")
    print("attention_heads: " + json.dumps(chosen))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "kind": "heads", "model": args.model, "args": vars(args), "copy_steps": events,
            "attention_heads": chosen, "scores": [[round(float(x), 4) for x in row] for row in scores],
            "prompts": prompts}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
