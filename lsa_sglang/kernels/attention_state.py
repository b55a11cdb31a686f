"""Operations on attention states ``(out, lse)`` shared by the decode paths.

A state is a normalised output and the natural-log log-sum-exp of its softmax
denominator. All functions are plain torch ops on device tensors (no host syncs),
so they can run inside a captured CUDA graph.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

LN2 = math.log(2.0)


def log2_to_ln_(lse: torch.Tensor) -> torch.Tensor:
    """FlashInfer reports base-2 log-sum-exp; convert it in place to natural log."""
    return lse.mul_(LN2)


def add_sinks_(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> None:
    """Fold per-head sink logits into a sink-free state, in place.

    The sink joins the denominator but has no value: ``out`` shrinks by
    ``exp(lse) / (exp(lse) + exp(sink))`` and ``lse`` becomes ``logaddexp(lse, sink)``.
    """
    total = torch.logaddexp(lse, sinks.float().unsqueeze(0))
    scale = torch.exp(lse - total)
    out.copy_((out.float() * scale.unsqueeze(-1)).to(out.dtype))
    lse.copy_(total)


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint token sets, from their two states."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    out = (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype)
    return out, lse
