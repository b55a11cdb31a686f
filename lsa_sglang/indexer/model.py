"""Neural Memory Indexer, inference side: scores every KV chunk of a request from hidden states.

Per target layer the query side is
``hidden[d] -> wq_a (d->r) -> RMSNorm(r) -> wq_b (r->H*Dh, +bias) -> neox RoPE -> q[H, Dh]`` and
``hidden[d] -> weights_proj (d->H, +bias) * Dh^-0.5 * H^-0.5 -> w[H]``; a chunk scores
``sigmoid(sum_h w_h relu(q_h . k_{chunk, h // (H // Hk)}) + bias_layer)``. The key side is frozen:
chunk keys come from the backbone's KV pool (see `chunk_keys_from_pages`), so only this module is
trained. Pure torch, no SGLang import: the memory layer and the trainer share it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lsa_sglang.config import ENSEMBLES


class SpecError(ValueError):
    """An `IndexerSpec` field is invalid; `field` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class IndexerSpec:
    """Shape and provenance of one indexer; stored in checkpoints and checked against the backbone.

    `num_kv_heads` is the number of key groups (the backbone's KV heads; 1 for DeepSeek's shared key):
    query head ``h`` reads key group ``h // (num_heads // num_kv_heads)``. `prenormed` means the input
    hidden state is already RMS-normalised by the backbone, so the inner RMSNorm only applies its
    weight (this is what makes the untrained default reproduce the backbone's q exactly).
    """

    model_id: str
    config_hash: str
    target_layers: tuple[int, ...]
    hidden_size: int
    rank: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rotary_dim: int
    chunk_size: int
    tau: int
    threshold: float
    rms_eps: float = 1e-6
    prenormed: bool = False
    q_bias: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> "SpecError":
            return SpecError(f"IndexerSpec.{name} {msg}, got {_show(getattr(self, name))}", name)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_finite(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("model_id", "config_hash"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        tl = self.target_layers
        if not isinstance(tl, (list, tuple)) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in tl
        ):
            raise bad("target_layers", "must be a list of layer indices >= 0")
        object.__setattr__(self, "target_layers", tuple(int(x) for x in tl))
        pos = ("hidden_size", "rank", "num_heads", "head_dim", "num_kv_heads", "chunk_size", "tau")
        for name in pos:
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        if not self.target_layers:
            raise SpecError("IndexerSpec.target_layers must name at least one layer", "target_layers")
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"IndexerSpec.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
                "num_heads",
            )
        if not is_int(self.rotary_dim) or self.rotary_dim < 0 or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise bad("rotary_dim", f"must be even and in [0, head_dim={self.head_dim}]")
        if not is_finite(self.rope_theta) or not self.rope_theta > 0:
            raise bad("rope_theta", "must be a finite number > 0")
        if not is_finite(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise bad("threshold", "must be in (0, 1)")
        if not is_finite(self.rms_eps) or not self.rms_eps > 0:
            raise bad("rms_eps", "must be a finite number > 0")
        for name in ("prenormed", "q_bias"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")

    @property
    def num_layers(self) -> int:
        return len(self.target_layers)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_layers"] = list(self.target_layers)
        return d


def group_map(num_heads: int, num_kv_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Key group of every query head, ``[H]`` int64 (GQA layout: consecutive heads share a group)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)


def rope_neox(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Neox-style RoPE (rotate halves) on the first `rotary_dim` dims of ``x [B, ..., Dh]``.

    Angles are built like SGLang's/HF's cos-sin cache (fp32 ``pos * inv_freq``) so that indexer
    queries line up with the post-RoPE keys the backbone wrote into its KV pool.
    """
    if rotary_dim == 0:
        return x
    dev = x.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=dev) / rotary_dim))
    ang = positions.to(device=dev, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [B, rd/2]
    shape = (ang.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[1],)
    cos = ang.cos().view(shape)
    sin = ang.sin().view(shape)
    half = rotary_dim // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:rotary_dim]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([rot, xf[..., rotary_dim:]], dim=-1).to(x.dtype)


class NeuralMemoryIndexer(nn.Module):
    """Query side of the LSA indexer for all target layers at once (parameters stacked over layers).

    Parameters (also the checkpoint tensor names), L = number of target layers:
    ``wq_a [L, r, d]``, ``q_norm [L, r]``, ``wq_b [L, H*Dh, r]``, ``wq_b_bias [L, H*Dh]`` (only when
    ``spec.q_bias``), ``weights_proj [L, H, d]``, ``weights_proj_bias [L, H]``, ``layer_bias [L]``.
    `weights_proj` carries a bias because the untrained default needs a head weight that does not
    depend on the hidden state (a bias-free linear map of a zero-mean input cannot be positive).
    """

    def __init__(self, spec: IndexerSpec, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.spec = spec
        L, d, r, H, Dh = spec.num_layers, spec.hidden_size, spec.rank, spec.num_heads, spec.head_dim
        kw = {"dtype": dtype, "device": device}
        self.wq_a = nn.Parameter(torch.empty(L, r, d, **kw))
        self.q_norm = nn.Parameter(torch.ones(L, r, **kw))
        self.wq_b = nn.Parameter(torch.empty(L, H * Dh, r, **kw))
        self.wq_b_bias = nn.Parameter(torch.zeros(L, H * Dh, **kw)) if spec.q_bias else None
        self.weights_proj = nn.Parameter(torch.empty(L, H, d, **kw))
        self.weights_proj_bias = nn.Parameter(torch.zeros(L, H, **kw))
        self.layer_bias = nn.Parameter(torch.zeros(L, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init for training from scratch (fan-in scaled normals, zero biases)."""
        d, r = self.spec.hidden_size, self.spec.rank
        with torch.no_grad():
            nn.init.normal_(self.wq_a, std=d**-0.5)
            nn.init.normal_(self.wq_b, std=r**-0.5)
            nn.init.normal_(self.weights_proj, std=d**-0.5)
            self.q_norm.fill_(1.0)
            self.weights_proj_bias.zero_()
            self.layer_bias.zero_()
            if self.wq_b_bias is not None:
                self.wq_b_bias.zero_()

    @classmethod
    def from_backbone(
        cls,
        spec: IndexerSpec,
        q_weight_per_layer: Sequence[torch.Tensor],
        q_bias_per_layer: Sequence[torch.Tensor | None] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "NeuralMemoryIndexer":
        """Untrained default: the indexer's q is exactly the backbone's own post-RoPE query.

        ``q_weight_per_layer[i]`` is target layer i's q projection ``[H*Dh, d]`` (slice it out of a
        fused qkv_proj). Sets r = d, wq_a = I, a weight-only norm (``prenormed=True``: the input is
        the backbone's already-normalised hidden state), wq_b = Wq (+ bias) and uniform positive head
        weights ``w_h = Dh^-0.5 H^-0.5``, layer bias 0.

        With w >= 0 and bias 0 every logit is >= 0, so every score is >= 0.5: the default does not
        really threshold, it *ranks* chunks by sum_h relu(q_h . k), and the selector's page budget
        decides how many stay resident. A trained checkpoint learns negative weights/bias so that
        the threshold becomes meaningful.
        """
        L, d, H, Dh = spec.num_layers, spec.hidden_size, spec.num_heads, spec.head_dim
        if spec.rank != d:
            raise ValueError(f"from_backbone needs rank == hidden_size ({d}), got rank {spec.rank}")
        if len(q_weight_per_layer) != L:
            raise ValueError(f"expected {L} q weights (one per target layer), got {len(q_weight_per_layer)}")
        has_bias = q_bias_per_layer is not None and any(b is not None for b in q_bias_per_layer)
        if q_bias_per_layer is not None and len(q_bias_per_layer) != L:
            raise ValueError(f"expected {L} q biases (one per target layer), got {len(q_bias_per_layer)}")
        model = cls(dataclasses.replace(spec, prenormed=True, q_bias=has_bias), dtype=dtype)
        with torch.no_grad():
            model.wq_a.copy_(torch.eye(d, dtype=dtype).expand(L, d, d))
            model.q_norm.fill_(1.0)
            for i, wq in enumerate(q_weight_per_layer):
                if tuple(wq.shape) != (H * Dh, d):
                    raise ValueError(f"q weight of target layer {spec.target_layers[i]}: expected shape "
                                     f"{[H * Dh, d]}, got {list(wq.shape)}")
                model.wq_b[i].copy_(wq.to(dtype))
                if has_bias:
                    b = q_bias_per_layer[i]  # type: ignore[index]
                    if b is None:
                        model.wq_b_bias[i].zero_()  # type: ignore[index]
                    elif tuple(b.shape) != (H * Dh,):
                        raise ValueError(f"q bias of target layer {spec.target_layers[i]}: expected shape "
                                         f"{[H * Dh]}, got {list(b.shape)}")
                    else:
                        model.wq_b_bias[i].copy_(b.to(dtype))  # type: ignore[index]
            model.weights_proj.zero_()
            model.weights_proj_bias.fill_(1.0)
            model.layer_bias.zero_()
        return model

    # -- query side ------------------------------------------------------------------------
    def _w_scale(self) -> float:
        return self.spec.head_dim**-0.5 * self.spec.num_heads**-0.5

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [B, L, d]`` (input of each target layer's attention, after its input RMSNorm),
        ``positions [B]`` absolute token positions -> ``q [B, L, H, Dh]`` post-RoPE, ``w [B, L, H]``."""
        s = self.spec
        B, L, d = hidden.shape
        if L != s.num_layers or d != s.hidden_size:
            raise ValueError(f"hidden must be [B, {s.num_layers}, {s.hidden_size}], got {list(hidden.shape)}")
        if positions.shape != (B,):
            raise ValueError(f"positions must be [B={B}], got {list(positions.shape)}")
        x = hidden.to(self.wq_a.dtype)
        a = torch.einsum("bld,lrd->blr", x, self.wq_a)
        if not s.prenormed:
            af = a.float()
            a = (af * torch.rsqrt(af.pow(2).mean(-1, keepdim=True) + s.rms_eps)).to(a.dtype)
        a = a * self.q_norm
        q = torch.einsum("blr,lor->blo", a, self.wq_b)
        if self.wq_b_bias is not None:
            q = q + self.wq_b_bias
        q = rope_neox(q.view(B, L, s.num_heads, s.head_dim), positions, s.rotary_dim, s.rope_theta)
        w = (torch.einsum("bld,lhd->blh", x, self.weights_proj) + self.weights_proj_bias) * self._w_scale()
        return q, w

    # -- scoring -----------------------------------------------------------------------------
    def layer_logits(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid chunk logits ``[B, L, N]`` from ``q [B, L, H, Dh]``, ``w [B, L, H]`` and frozen
        chunk keys ``keys [N, L, Hk, Dh]`` (one request's chunks, every target layer). fp32 math."""
        s = self.spec
        B, L, H, Dh = q.shape
        N = keys.shape[0]
        if tuple(keys.shape[1:]) != (L, s.num_kv_heads, Dh):
            raise ValueError(f"keys must be [N, {L}, {s.num_kv_heads}, {Dh}], got {list(keys.shape)}")
        qg = q.float().view(B, L, s.num_kv_heads, s.group_size, Dh)
        dots = torch.einsum("blkgd,nlkd->blnkg", qg, keys.float()).reshape(B, L, N, H)
        logits = (torch.relu(dots) * w.float()[:, :, None, :]).sum(-1)
        return logits + self.layer_bias.float()[None, :, None]

    def scores(
        self, hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, ensemble: str = "max"
    ) -> torch.Tensor:
        """Chunk scores ``[B, N]`` in [0, 1]: per-layer sigmoid, then max ("OR") or mean over layers."""
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
        q, w = self.forward(hidden, positions)
        return ensemble_layers(torch.sigmoid(self.layer_logits(q, w, keys)), ensemble)


def ensemble_layers(per_layer: torch.Tensor, how: str) -> torch.Tensor:
    """Per-layer chunk probabilities ``[..., L, N]`` -> ``[..., N]``: max over the target layers
    ("OR", a chunk any layer wants) or their mean (the config's `ensemble`). The server, the
    trainer and the evaluator all combine layers here."""
    if how == "max":
        return per_layer.amax(dim=-2)
    if how == "mean":
        return per_layer.mean(dim=-2)
    raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {how!r}")


# -- frozen key side -------------------------------------------------------------------------------
def _check_pages(k: torch.Tensor) -> None:
    if k.dim() != 4:
        raise ValueError(f"expected chunk pages [N, chunk_size, Hk, Dh], got {list(k.shape)}")


def chunk_keys_from_pages(k: torch.Tensor) -> torch.Tensor:
    """Chunk key = mean post-RoPE key per KV head, ``[N, chunk_size, Hk, Dh] -> [N, Hk, Dh]`` fp32.

    Post-RoPE because that is what the backbone's KV pool holds (no extra pass over the cache);
    the indexer's queries carry RoPE at the current position, so q . mean(k) is the mean logit.
    """
    _check_pages(k)
    return k.float().mean(dim=1)


def page_minmax(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk elementwise key min and max ``([N, Hk, Dh], [N, Hk, Dh])`` for the Quest bound."""
    _check_pages(k)
    return k.amin(dim=1), k.amax(dim=1)


def quest_scores(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, head_to_group: torch.Tensor | None = None
) -> torch.Tensor:
    """Quest upper bound per chunk ``[N]``: max over heads of ``sum_d max(q_d kmax_d, q_d kmin_d)``.

    For every key k inside the chunk, q_h . k <= bound (each term is bounded by the larger corner),
    so ranking by it never misses a chunk holding a large logit. ``q [H, Dh]``, ``kmin/kmax
    [N, Hk, Dh]``; `head_to_group` defaults to the GQA map ``h // (H // Hk)``.
    """
    H = q.shape[0]
    if head_to_group is None:
        head_to_group = group_map(H, kmin.shape[1], device=kmin.device)
    qf = q.float()[None]  # [1, H, Dh]
    head_to_group = head_to_group.to(device=kmin.device, dtype=torch.int64)
    lo = kmin.float().index_select(1, head_to_group)  # [N, H, Dh]
    hi = kmax.float().index_select(1, head_to_group)
    return torch.maximum(qf * hi, qf * lo).sum(-1).amax(dim=-1)


__all__ = [
    "ENSEMBLES",
    "IndexerSpec",
    "NeuralMemoryIndexer",
    "chunk_keys_from_pages",
    "ensemble_layers",
    "group_map",
    "page_minmax",
    "quest_scores",
    "rope_neox",
]
