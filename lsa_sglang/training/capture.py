"""One teacher-forced prefill of a transformers Llama/Qwen2-style model, read through hooks.

A forward pre-hook on every needed layer's attention module sees exactly what SGLang hands its
`self_attn`: the hidden states after the input RMSNorm and the rotary cos/sin. From them the hook
recomputes the post-RoPE keys (what the KV pool holds) and, for the sampled rows only, the
post-RoPE queries, so the [T, T] attention of a layer is never materialised: rows are processed
in blocks against the keys. Per layer it keeps only what the dump stores (indexer inputs at the
target layers, chunk key summaries, top-p picks), so memory stays bounded by one layer's keys
plus one block of attention rows. After the last needed layer the forward is cut short.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lsa_sglang.indexer import chunk_keys_from_pages, page_minmax

from .labels import top_p_picks


class _Stop(Exception):
    """Raised by the last needed hook: the rest of the forward is not needed."""


@dataclasses.dataclass
class CaptureResult:
    """Everything one document contributes (see `dump.py` for the shard layout)."""

    hidden: torch.Tensor  # [P, L, d] input of each target layer's attention at the sample positions
    keys: torch.Tensor  # [N, L, Hk, Dh] mean post-RoPE key per complete chunk
    kmin: torch.Tensor  # [N, L, Hk, Dh]
    kmax: torch.Tensor  # [N, L, Hk, Dh]
    votes: torch.Tensor  # [R, Nall] uint8: voting layers whose top-p picked the chunk, per row
    mass: torch.Tensor  # [R, Nall] float32: head- and layer-mean attention mass per chunk
    q_rows: dict[int, torch.Tensor]  # layer -> [R, H, Dh] post-RoPE queries (only when asked)
    k_all: dict[int, torch.Tensor]  # layer -> [T, Hk, Dh] post-RoPE keys (only when asked)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF/SGLang neox RoPE: ``x [T, heads, Dh]``, ``cos/sin [T, rd]`` (rd <= Dh: partial rotary)."""
    rd = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    xr, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * c + rot * s, rest], dim=-1)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    row_pos: torch.Tensor,
    scale: float,
    block: int = 256,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention of some query rows, averaged over query heads.

    ``q [R, H, Dh]`` post-RoPE queries at positions ``row_pos [R]`` (sorted ascending), ``k [T, Hk,
    Dh]`` post-RoPE keys (GQA: head h reads group ``h // (H // Hk)``) -> ``[R, T]`` float32, each
    row summing to 1 over the keys at positions <= its own; with `chunk_size`, the same summed per
    chunk, ``[R, ceil(T / chunk_size)]`` (reduced before the head mean: 64x less memory traffic).
    Blocks of `block` rows bound the memory; each block reads keys only up to its last row.
    """
    R, H, Dh = q.shape
    T, Hk, _ = k.shape
    g = H // Hk
    cs = chunk_size or 1
    n_out = -(-T // cs)
    # Keys as [Hk, Tp, Dh], zero-padded to whole chunks (the padding is masked like the future),
    # so every block reads a prefix of whole chunks and a row slice of it is free for bmm.
    kh = torch.zeros(Hk, n_out * cs, Dh)
    kh[:, :T] = k.float().permute(1, 0, 2)
    out = torch.zeros(R, n_out, dtype=torch.float32)
    for s in range(0, R, block):
        rb = row_pos[s : s + block]
        r = int(rb.numel())
        m = -(-(int(rb.max()) + 1) // cs) * cs  # keys this block can see, whole chunks
        qb = (q[s : s + block].float() * scale).reshape(r, Hk, g, Dh).permute(1, 0, 2, 3).reshape(Hk, r * g, Dh)
        lg = torch.bmm(qb, kh[:, :m].transpose(1, 2)).view(Hk, r, g, m)
        bias = torch.zeros(r, m).masked_fill_(torch.arange(m)[None, :] > rb[:, None], float("-inf"))
        lg.add_(bias[None, :, None, :])
        lg.sub_(lg.amax(-1, keepdim=True)).exp_()  # unnormalised softmax, in place
        per_chunk = lg.view(Hk, r, g, m // cs, cs).sum(-1)  # [Hk, r, g, n]
        per_chunk.div_(per_chunk.sum(-1, keepdim=True))
        out[s : s + block, : m // cs] = per_chunk.sum(dim=(0, 2)) / H
    return out


def _layers(model: nn.Module) -> list[nn.Module]:
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    try:
        return list(base.layers)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no model.layers: only Llama/Qwen2-style models can be dumped") from None


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (the head's [T, vocab] logits are never needed)."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


class DocCapture:
    """Hooks a transformers causal LM for dumps; `run()` processes one document."""

    def __init__(
        self,
        model: nn.Module,
        target_layers: tuple[int, ...],
        vote_layers: tuple[int, ...],
        chunk_size: int,
        top_p: float,
        sink_chunks: int,
        keep_layers: tuple[int, ...] = (),
        row_block: int = 256,
    ) -> None:
        self.model = model
        self.layers = _layers(model)
        n = len(self.layers)
        for name, ls in (("target", target_layers), ("vote", vote_layers), ("keep", keep_layers)):
            bad = [l for l in ls if not 0 <= l < n]
            if bad:
                raise ValueError(f"{name} layer {bad[0]} does not exist (the model has {n} layers)")
        self.target_layers = tuple(target_layers)
        self.vote_layers = tuple(vote_layers)
        self.keep_layers = tuple(keep_layers)
        self.chunk_size = chunk_size
        self.top_p = top_p
        self.sink_chunks = sink_chunks
        self.row_block = row_block
        self.needed = sorted(set(self.target_layers) | set(self.vote_layers) | set(self.keep_layers))
        attn = self.layers[0].self_attn
        cfg = model.config
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))

    def run(self, input_ids: torch.Tensor, sample_pos: torch.Tensor, rows: torch.Tensor) -> CaptureResult:
        """``input_ids [T]``, sample positions ``[P]`` (indexer inputs), attention rows ``[R]``."""
        T = int(input_ids.shape[0])
        cs = self.chunk_size
        n_all = -(-T // cs)
        n_full = T // cs
        P, R, L = len(sample_pos), len(rows), len(self.target_layers)
        st = {
            "hidden": [None] * L, "keys": [None] * L, "kmin": [None] * L, "kmax": [None] * L,
            "votes": torch.zeros(R, n_all, dtype=torch.int16), "mass": torch.zeros(R, n_all, dtype=torch.float64),
            "q_rows": {}, "k_all": {},
        }
        exclude = torch.arange(n_all) < self.sink_chunks
        last = self.needed[-1]

        def make_hook(layer: int):
            def hook(module, args, kwargs):
                h = kwargs.get("hidden_states", args[0] if args else None)[0]  # [T, d]
                cos, sin = kwargs["position_embeddings"]
                cos, sin = cos[0].float(), sin[0].float()
                k = rotate(module.k_proj(h).view(T, self.num_kv_heads, self.head_dim).float(), cos, sin)
                if layer in self.keep_layers:
                    st["k_all"][layer] = k.clone()
                if layer in self.target_layers:
                    i = self.target_layers.index(layer)
                    st["hidden"][i] = h.index_select(0, sample_pos).float().clone()
                    pages = k[: n_full * cs].view(n_full, cs, self.num_kv_heads, self.head_dim)
                    st["keys"][i] = chunk_keys_from_pages(pages)
                    st["kmin"][i], st["kmax"][i] = page_minmax(pages)
                if layer in self.vote_layers or layer in self.keep_layers:
                    q = module.q_proj(h.index_select(0, rows)).view(R, self.num_heads, self.head_dim).float()
                    q = rotate(q, cos.index_select(0, rows), sin.index_select(0, rows))
                    if layer in self.keep_layers:
                        st["q_rows"][layer] = q.clone()
                    if layer in self.vote_layers:
                        mass = attention_rows(q, k, rows, self.scale, self.row_block, chunk_size=cs)
                        st["mass"] += mass
                        st["votes"] += top_p_picks(mass, self.top_p, exclude).to(torch.int16)
                if layer == last:
                    raise _Stop

            return hook

        handles = [
            self.layers[l].self_attn.register_forward_pre_hook(make_hook(l), with_kwargs=True) for l in self.needed
        ]
        try:
            with torch.inference_mode():
                base_model(self.model)(input_ids=input_ids[None], use_cache=False)
        except _Stop:
            pass
        finally:
            for hd in handles:
                hd.remove()
        if any(x is None for x in st["hidden"]):
            raise RuntimeError("the forward did not reach every target layer's attention (unsupported model?)")
        n_vote = max(1, len(self.vote_layers))
        return CaptureResult(
            hidden=torch.stack(st["hidden"], dim=1),
            keys=torch.stack(st["keys"], dim=1),
            kmin=torch.stack(st["kmin"], dim=1),
            kmax=torch.stack(st["kmax"], dim=1),
            votes=st["votes"].clamp(max=255).to(torch.uint8),
            mass=(st["mass"] / n_vote).float(),
            q_rows=st["q_rows"],
            k_all=st["k_all"],
        )


__all__ = ["CaptureResult", "DocCapture", "attention_rows", "base_model", "rotate"]
