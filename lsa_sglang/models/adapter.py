"""Per-family adapter: where the target layers' attention modules are, what feeds them,
and the backbone's own query projection (the untrained indexer's initialisation).

SGLang's Llama, Qwen2/Qwen3 and Mistral models share one shape: `model.model.layers[i]
.self_attn` called as `self_attn(positions, hidden_states, forward_batch)` with the
normalized hidden states, a fused `qkv_proj` whose first `num_heads * head_dim` rows are
the query projection, and neox-style RoPE applied inside.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


class UnsupportedModel(ValueError):
    pass


def attention_modules(model: nn.Module) -> list[nn.Module]:
    try:
        return [layer.self_attn for layer in model.model.layers]
    except AttributeError:
        raise UnsupportedModel(
            f"lsa: {type(model).__name__} has no model.layers[i].self_attn; supported: "
            + ", ".join(SUPPORTED)
        ) from None


def default_target_layers(num_layers: int) -> tuple[int, ...]:
    """Three layers at a quarter, half and three quarters of the depth."""
    return tuple(sorted({max(0, min(num_layers - 1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)}))


def backbone_query_weights(attn: nn.Module, num_heads: int, head_dim: int):
    """(W [H*Dh, d], b [H*Dh] or None) of the layer's query projection (this TP rank's heads)."""
    proj = attn.qkv_proj
    n = num_heads * head_dim
    w = proj.weight[:n].detach()
    b = proj.bias[:n].detach() if getattr(proj, "bias", None) is not None else None
    return w, b


class HiddenCapture:
    """Keeps, per request, the last hidden states that entered the target layers' attention.

    Forward pre-hooks store the raw per-forward input; `commit()` (called at the start of the
    next forward, when the batch layout of the previous one is known) files the row of each
    request's last token under its req_pool_idx.
    """

    def __init__(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self._raw: dict[int, torch.Tensor] = {}
        self._last: dict[int, torch.Tensor] = {}  # req_pool_idx -> [L, d]
        self._pending_rows: tuple[list[int], list[int]] | None = None
        self._queries: dict[int, dict[int, tuple[torch.Tensor, float]]] = {}  # idx -> layer -> (q, scale)
        self._query_owner: dict[int, str] = {}  # idx -> rid whose prefill the rows come from
        mods = attention_modules(model)
        self._handles = [
            mods[layer].register_forward_pre_hook(self._hook(pos), with_kwargs=True)
            for pos, layer in enumerate(layers)
        ]

    def _hook(self, pos: int):
        def hook(module, args, kwargs):
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            self._raw[pos] = hidden.detach()

        return hook

    def expect(self, req_pool_indices: list[int], last_rows: list[int]) -> None:
        """Before a forward: which row of its hidden states is each request's last token."""
        self.commit()
        self._pending_rows = (req_pool_indices, last_rows)

    def commit(self) -> None:
        if self._pending_rows is None or len(self._raw) != len(self.layers):
            return
        idxs, rows = self._pending_rows
        stacked = torch.stack([self._raw[p] for p in range(len(self.layers))], dim=1)  # [T, L, d]
        picked = stacked.index_select(0, torch.tensor(rows, device=stacked.device))
        for i, idx in enumerate(idxs):
            self._last[idx] = picked[i]
        self._pending_rows = None
        self._raw.clear()

    def last_hidden(self, idx: int) -> torch.Tensor | None:
        return self._last.get(idx)

    def record_queries(self, layer: int, q: torch.Tensor, req_pool_indices: list[int], rids: list[str],
                       rows: torch.Tensor, counts: list[int], wants: list[int], scale: float) -> None:
        """Prefill: each request's last `wants[i]` prompt-token queries ``[R, H, D]`` (post-RoPE)
        at `layer`; the attention backend calls this from every layer's extend (`rows`: the extend
        rows of all requests in order, `counts` of them per request, made once per forward). The
        steps of a chunked prefill are contiguous, so rows carry over from one to the next: the
        last rows of a prompt are kept however its prefill was split."""
        picked = q.index_select(0, rows.to(q.device)).detach()
        for idx, rid, want, part in zip(req_pool_indices, rids, wants, picked.split(counts)):
            if self._query_owner.get(idx) != rid:
                self._query_owner[idx] = rid
                self._queries.pop(idx, None)
            if not want:
                continue
            held = self._queries.setdefault(idx, {})
            if layer in held and part.shape[0] < want:
                part = torch.cat([held[layer][0], part])[-want:]
            held[layer] = (part, scale)

    def take_queries(self, idx: int) -> dict[int, tuple[torch.Tensor, float]] | None:
        """The last prefill's per-layer queries of a request, handed over once."""
        self._query_owner.pop(idx, None)
        return self._queries.pop(idx, None)

    def forget(self, idx: int) -> None:
        self._last.pop(idx, None)
        self._queries.pop(idx, None)
        self._query_owner.pop(idx, None)
