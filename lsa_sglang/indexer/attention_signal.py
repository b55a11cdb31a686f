"""Window 0 from what the dense prefill already knows: the backbone's own attention.

At admission every chunk of the prompt is still on the device, and the prefill computed the
query of the last prompt token at every layer. Its exact attention, pooled per chunk, is what
the model reads first. A few heads at a few layers retrieve, while most attend locally, so the
layers are not summed: each layer's chunk mass (summed over its heads) is renormalised over the
candidate chunks (sink and recency tail excluded, they are resident anyway) and a chunk scores
the largest share any layer gives it. No metadata is kept: the queries are dropped after use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_chunk_mass(q: torch.Tensor, k: torch.Tensor, scale: float, n_chunks: int, chunk_size: int) -> torch.Tensor:
    """Attention mass per chunk of one layer: ``q [H, D]`` (post-RoPE) over ``k [T, Hk, D]``,
    softmax over all T tokens per head, summed over heads, tokens pooled per complete chunk.
    Returns ``[n_chunks]`` float32 (GQA: head h reads KV head h // (H // Hk))."""
    heads, dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    if n_chunks * chunk_size > k.shape[0]:
        raise ValueError(f"{n_chunks} chunks of {chunk_size} need {n_chunks * chunk_size} keys, got {k.shape[0]}")
    qg = q.float().view(kv_heads, heads // kv_heads, dim)
    logits = torch.einsum("kgd,tkd->kgt", qg, k.float()) * scale
    per_token = torch.softmax(logits, dim=-1).sum(dim=(0, 1))  # [T]
    return per_token[: n_chunks * chunk_size].view(n_chunks, chunk_size).sum(dim=1)


def attention_scores(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    scales: Sequence[float],
    n_chunks: int,
    chunk_size: int,
    candidates: tuple[int, int],
) -> torch.Tensor:
    """Chunk scores ``[n_chunks]`` on the CPU: per layer the chunk mass renormalised over the
    candidate range ``[lo, hi)``, then the max over layers; chunks outside the range score 0."""
    lo, hi = candidates
    scores = torch.zeros(n_chunks, dtype=torch.float32)
    if hi <= lo:
        return scores
    best = None
    for q, k, scale in zip(queries, keys, scales):
        mass = layer_chunk_mass(q, k, scale, n_chunks, chunk_size)[lo:hi]
        share = mass / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)
        best = share if best is None else torch.maximum(best, share)
    if best is not None:
        scores[lo:hi] = best.cpu()
    return scores
