"""Chunk scores of every policy on dumped samples, computed exactly as the server computes them.

`indexer_logits` is `memory.window.WindowCycle._score` batched over a document's samples:
the indexer's forward on the captured hidden state at the sample position, `layer_logits`
against the frozen chunk keys, sigmoid per layer, then max ("OR") or mean over layers.
"""

from __future__ import annotations

import torch

from lsa_sglang.indexer import NeuralMemoryIndexer, ensemble_layers, quest_scores

from .data import DocData


def indexer_logits(
    model: NeuralMemoryIndexer, doc: DocData, idx: torch.Tensor | None = None, leak: float = 0.0
) -> torch.Tensor:
    """Per-layer logits ``[P, L, N]`` of the document's samples (or the samples `idx`).

    `leak` > 0 replaces relu by a leaky relu, for training only: in deep layers almost every
    q . mean-key is negative, so relu passes no gradient to the query side at all. With
    ``leak == 0`` this is exactly `NeuralMemoryIndexer.layer_logits` (tested).
    """
    hidden, pos = (doc.hidden, doc.positions) if idx is None else (doc.hidden[idx], doc.positions[idx])
    q, w = model(hidden.to(model.wq_a.dtype), pos)
    if leak == 0.0:
        return model.layer_logits(q, w, doc.keys.to(q.dtype))
    s = model.spec
    B, L, H, Dh = q.shape
    N = doc.keys.shape[0]
    qg = q.float().view(B, L, s.num_kv_heads, s.group_size, Dh)
    dots = torch.einsum("blkgd,nlkd->blnkg", qg, doc.keys.float()).reshape(B, L, N, H)
    logits = (torch.nn.functional.leaky_relu(dots, leak) * w.float()[:, :, None, :]).sum(-1)
    return logits + model.layer_bias.float()[None, :, None]


@torch.no_grad()
def indexer_scores(model: NeuralMemoryIndexer, doc: DocData, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ensembled ``[P, N]``, per layer ``[P, L, N]``) scores in [0, 1]."""
    probs = torch.sigmoid(indexer_logits(model, doc).float())
    return ensemble_layers(probs, how), probs


@torch.no_grad()
def quest_doc_scores(model: NeuralMemoryIndexer, doc: DocData) -> torch.Tensor:
    """Quest bound per chunk ``[P, N]``, max over target layers, with `model`'s queries (the
    server's `quest` policy does the same with its loaded indexer)."""
    q, _ = model(doc.hidden.to(model.wq_a.dtype), doc.positions)
    P, L = q.shape[:2]
    out = torch.empty(P, doc.keys.shape[0])
    for p in range(P):
        out[p] = torch.stack([quest_scores(q[p, l], doc.kmin[:, l], doc.kmax[:, l]) for l in range(L)]).amax(0)
    return out


def recency_scores(doc: DocData) -> torch.Tensor:
    """The most recent candidates first (the `recency` policy)."""
    P, N = doc.labels.shape
    return torch.arange(N, dtype=torch.float32).expand(P, N).clone()


def random_scores(doc: DocData, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(doc.labels.shape, generator=gen)


__all__ = ["indexer_logits", "indexer_scores", "quest_doc_scores", "random_scores", "recency_scores"]
