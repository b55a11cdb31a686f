"""Window 0 from what the dense prefill already knows: the backbone's own attention.

At admission every chunk of the prompt is still on the device, and the prefill computed the
queries of the last prompt tokens at every layer. Their exact attention, pooled per chunk, is
what the model reads first. A few heads at a few layers retrieve, while most attend locally, so
the layers are not summed: each layer's chunk mass (summed over its heads) is renormalised over
the candidate chunks (sink and recency tail excluded, they are resident anyway) and a chunk
scores the largest share any layer gives it. With several
query rows (the last `attention_rows` prompt tokens, each under its causal mask) their masses add
up first, so a question whose words point at several facts keeps all of them. No metadata is
kept: the queries are dropped after use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

_BLOCK_ELEMENTS = 1 << 25  # logits per block of query rows (128 MiB in fp32)


def layer_chunk_mass(q: torch.Tensor, k: torch.Tensor, scale: float, n_chunks: int, chunk_size: int,
                     per_head: bool = False, spill: int = 0) -> torch.Tensor:
    """Attention mass per chunk of one layer: ``q [H, D]`` or ``[R, H, D]`` (post-RoPE, the last R
    tokens of the keys' sequence, row r at position ``T - R + r``) over ``k [T, Hk, D]``, softmax
    over the tokens each row sees, summed over rows and (unless `per_head`) heads, tokens pooled
    per complete chunk. Returns ``[n_chunks]`` or ``[H, n_chunks]`` float32 (GQA: head h reads KV
    head h // (H // Hk)). `spill`: a chunk also counts the mass of the last `spill` tokens of the
    chunk before it (a fact whose words the rows attend at a chunk's end goes on in the next)."""
    if q.dim() == 2:
        q = q[None]
    rows, heads, dim = q.shape
    t, kv_heads = k.shape[0], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    if n_chunks * chunk_size > t:
        raise ValueError(f"{n_chunks} chunks of {chunk_size} need {n_chunks * chunk_size} keys, got {t}")
    if rows > t:
        raise ValueError(f"{rows} query rows need at least as many keys, got {t}")
    qg = q.float().view(rows, kv_heads, heads // kv_heads, dim)
    kf = k.float()
    pos = torch.arange(t, device=k.device)
    per_token = torch.zeros(heads, t, dtype=torch.float32, device=k.device)
    step = max(1, _BLOCK_ELEMENTS // (heads * t))  # rows per block: bounded logits at long contexts
    for r0 in range(0, rows, step):
        logits = torch.einsum("rkgd,tkd->kgrt", qg[r0 : r0 + step], kf) * scale
        if rows > 1:  # row r sees keys up to its own position T - R + r
            last = torch.arange(t - rows + r0, t - rows + r0 + logits.shape[2], device=k.device)
            logits = logits.masked_fill(pos[None, :] > last[:, None], float("-inf"))
        per_token += torch.softmax(logits, dim=-1).sum(dim=2).reshape(heads, t)
    tokens = per_token[:, : n_chunks * chunk_size].reshape(heads, n_chunks, chunk_size)
    mass = tokens.sum(dim=2)
    if spill > 0 and n_chunks > 1:
        mass[:, 1:] += tokens[:, :-1, chunk_size - spill :].sum(dim=2)
    return mass if per_head else mass.sum(dim=0)


def attention_scores(
    queries: Sequence[torch.Tensor],
    keys: Iterable[torch.Tensor],
    scales: Sequence[float],
    n_chunks: int,
    chunk_size: int,
    candidates: tuple[int, int],
    spill: int = 0,
) -> torch.Tensor:
    """Chunk scores ``[n_chunks]`` on the CPU: per layer the chunk mass renormalised over the
    candidate range ``[lo, hi)``, then the max over layers; chunks outside
    the range score 0. `keys` may be a generator: one layer's keys are gathered at a time."""
    lo, hi = candidates
    scores = torch.zeros(n_chunks, dtype=torch.float32)
    if hi <= lo:
        return scores
    best = None
    for q, k, scale in zip(queries, keys, scales):
        mass = layer_chunk_mass(q, k, scale, n_chunks, chunk_size, spill=spill)[lo:hi]
        share = mass / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)
        best = share if best is None else torch.maximum(best, share)
    if best is not None:
        scores[lo:hi] = best.cpu()
    return scores


def heads_by_layer(pairs: Iterable[Sequence[int]]) -> dict[int, list[int]]:
    """`attention_heads` ``[layer, head]`` pairs grouped per layer, layers in order."""
    out: dict[int, list[int]] = {}
    for layer, head in sorted(pairs):
        out.setdefault(layer, []).append(head)
    return out


def head_scores(queries: Sequence[torch.Tensor], keys: Iterable[torch.Tensor], scales: Sequence[float],
                heads: Sequence[Sequence[int]], n_chunks: int, chunk_size: int, candidates: tuple[int, int],
                spill: int = 0) -> torch.Tensor:
    """Chunk scores ``[n_chunks]`` from a model's retrieval heads (`attention_heads`): per layer
    the chunk mass of the listed ``heads`` (``heads[i]`` for the i-th layer of ``queries`` /
    ``keys``, rows summed as `layer_chunk_mass` sums them), added up over every listed head of
    every layer and renormalised over the candidate range ``[lo, hi)``: a few heads that copy
    from the prompt decide, the many that attend by position or locally do not count. Chunks
    outside the range score 0."""
    lo, hi = candidates
    scores = torch.zeros(n_chunks, dtype=torch.float32)
    if hi <= lo:
        return scores
    total = None
    for q, k, scale, listed in zip(queries, keys, scales, heads):
        mass = layer_chunk_mass(q, k, scale, n_chunks, chunk_size, per_head=True, spill=spill)[list(listed), lo:hi].sum(0)
        total = mass if total is None else total + mass
    if total is not None:
        scores[lo:hi] = (total / total.sum().clamp_min(torch.finfo(total.dtype).tiny)).cpu()
    return scores


def quest_shares(queries: Sequence[torch.Tensor], kmin: torch.Tensor, kmax: torch.Tensor,
                 scales: Sequence[float]) -> torch.Tensor:
    """What one decode step reads of chunks the device may not hold, from their key bounds: per
    layer each head's softmax over the chunks' Quest bounds (``sum_d max(q_d kmin_d, q_d kmax_d)``,
    no key in the chunk scores higher), summed over heads and renormalised, then the max over
    layers, the same scale as `attention_scores`. ``queries``: per layer ``[H, D]``; ``kmin/kmax
    [C, L, Hk, D]`` per chunk and layer (any float dtype). Returns ``[C]`` float32."""
    if kmin.shape[0] == 0:
        return torch.zeros(0)
    best = None
    for l, (q, scale) in enumerate(zip(queries, scales)):
        lo, hi = kmin[:, l].float(), kmax[:, l].float()  # [C, Hk, D]
        heads, kv_heads = q.shape[0], lo.shape[1]
        qg = q.float().view(kv_heads, heads // kv_heads, -1)[None]  # [1, Hk, G, D]
        bound = torch.maximum(qg * lo[:, :, None], qg * hi[:, :, None]).sum(-1)  # [C, Hk, G]
        mass = torch.softmax(bound * scale, dim=0).sum(dim=(1, 2))
        share = mass / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)
        best = share if best is None else torch.maximum(best, share)
    return best.cpu()


def quest_window0(queries: Sequence[torch.Tensor], keys: Iterable[torch.Tensor], scales: Sequence[float],
                  n_chunks: int, chunk_size: int, candidates: tuple[int, int]) -> torch.Tensor:
    """Window 0 by Quest: the last prompt token's query at every layer (``queries`` per layer
    ``[H, D]``) bounds each candidate chunk from its keys' elementwise min and max (``keys`` per
    layer ``[T, Hk, D]``, the prompt's keys still on the device at admission), combined as
    `quest_shares` does (per layer each head's softmax over the bounds, heads summed and
    renormalised over the candidates ``[lo, hi)``, max over layers). Chunks outside the range
    score 0. Returns ``[n_chunks]`` float32 on the CPU; nothing is kept."""
    lo, hi = candidates
    scores = torch.zeros(n_chunks, dtype=torch.float32)
    if hi <= lo:
        return scores
    mins, maxs = [], []
    for k in keys:
        pages = k[lo * chunk_size : hi * chunk_size].reshape(hi - lo, chunk_size, *k.shape[1:])
        mins.append(pages.amin(dim=1))
        maxs.append(pages.amax(dim=1))
    scores[lo:hi] = quest_shares(queries, torch.stack(mins, 1), torch.stack(maxs, 1), scales)
    return scores


def raise_held(held: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """In place: each chunk's largest share so far (``held``) raised to what the last step read
    of it (``share``)."""
    return torch.maximum(held, share, out=held)


def evidence_swap(share: torch.Tensor, held: torch.Tensor, resident: torch.Tensor,
                  allowed: torch.Tensor | None = None) -> tuple[int, int] | None:
    """Re-selection on evidence over candidate chunks: ``share`` what the last step read of each
    (`quest_shares`), ``held`` the largest share each ever drew (its window-0 score, then every
    step's), ``resident`` a bool mask, ``allowed`` (bool mask, None: all) the chunks that may come
    in. Returns ``(incoming, outgoing)`` indices when the step's best allowed non-resident chunk
    drew more than the weakest resident chunk ever did, else None."""
    outside = ~resident if allowed is None else ~resident & allowed
    if not bool(outside.any()) or not bool(resident.any()):
        return None
    incoming = int(torch.where(outside, share.float(), torch.tensor(-1.0)).argmax())
    outgoing = int(torch.where(resident, held.float(), torch.tensor(float("inf"))).argmin())
    return (incoming, outgoing) if share[incoming] > held[outgoing] else None


def copied_chunks(tokens: Sequence[int], n: int, chunks: Iterable[int], cs: int) -> list[int]:
    """Those of ``chunks`` where a run equal to the last ``n`` of ``tokens`` (the request's tokens
    so far, prompt then answer) ends, before the run itself: the answer is copying the chunk
    (a run that starts in the chunk before counts for the chunk holding its end, so a fact cut by
    a boundary is followed into the next chunk). Sorted; empty when ``n`` < 1 or nothing
    matches."""
    if n < 1 or len(tokens) <= n:
        return []
    return [c for c in sorted(chunks) if _run_in_chunk(tokens, n, c, cs) is not None]


def _run_in_chunk(tokens: Sequence[int], n: int, c: int, cs: int) -> int | None:
    """Start of the first run equal to the last ``n`` of ``tokens`` that ends in chunk ``c``
    before the run itself, None when there is none."""
    tail = list(tokens[-n:])
    limit = len(tokens) - n  # an occurrence must end before the copy starts
    end = (c + 1) * cs
    start = max(c * cs - n + 1, 0)
    span = list(tokens[start : min(end, limit)])
    return next((start + i for i in range(len(span) - n + 1) if span[i : i + n] == tail), None)


def copy_start(tokens: Sequence[int], n: int, chunk: int, cs: int, answer_len: int) -> int | None:
    """Where the copy the answer is making of ``chunk`` began (`copied_chunks`): the first run
    equal to the last ``n`` of ``tokens`` that ends in the chunk, extended back while the
    answer's earlier tokens (at most ``answer_len`` in all) equal the ones before it. None when
    the chunk holds no such run."""
    if n < 1 or len(tokens) <= n or answer_len < n:
        return None
    begin = _run_in_chunk(tokens, n, chunk, cs)
    if begin is None:
        return None
    back = n
    while back < answer_len and begin > 0 and tokens[begin - 1] == tokens[len(tokens) - back - 1]:
        begin, back = begin - 1, back + 1
    return begin


def list_siblings(prompt: Sequence[int], start: int, lead: int, cs: int, most: int) -> list[int]:
    """Chunks of the other items of a list whose item at ``start`` the answer is copying: every
    other place in ``prompt`` where the ``lead`` tokens before ``start`` recur (the text each
    item follows, e.g. "numbers for <key> is:") is followed by another item; returns the chunks
    of the ``lead`` tokens after each recurrence, items after ``start`` first in document order,
    then those before it, without the chunks of the item at ``start``. Empty when ``start`` has
    fewer than ``lead`` tokens before it, nothing recurs, or more than ``most`` items do (text
    that common, filler, names no list)."""
    if lead < 1 or start < lead or start > len(prompt):
        return []
    ctx = list(prompt[start - lead : start])
    first = ctx[0]
    own = set(range(start // cs, (min(start + lead, len(prompt)) - 1) // cs + 1))
    items = []
    for p in range(len(prompt) - lead):
        if prompt[p] == first and p != start - lead and list(prompt[p : p + lead]) == ctx:
            items.append(p + lead)
            if len(items) > most:
                return []
    items.sort(key=lambda s: (s < start, s))
    out: list[int] = []
    for s in items:
        for c in range(s // cs, (min(s + lead, len(prompt)) - 1) // cs + 1):
            if c not in own and c not in out:
                out.append(c)
    return out


def release_copied(held: torch.Tensor, share: torch.Tensor, copying: Iterable[int], before: Iterable[int],
                   lo: int, hi: int) -> int:
    """In place, over candidate chunks (absolute indices in ``[lo, hi)``; ``held``/``share``
    indexed from ``lo``): a chunk the answer is copying (``copying``, `copied_chunks`) holds its
    page until the copy ends (held 1, no share beats it), and one it was copying at the last step
    (``before``) but no more starts its hold again from what this step read of it, not its
    largest share ever: once the answer reads elsewhere, a chunk not on the device that a step
    reads more takes its page (`evidence_swap`), so a list goes on to values not read yet.
    Returns how many copies ended."""
    now = {c for c in copying if lo <= c < hi}
    ended = [c for c in before if lo <= c < hi and c not in now]
    for c in ended:
        held[c - lo] = share[c - lo]
    for c in now:
        held[c - lo] = 1.0
    return len(ended)
