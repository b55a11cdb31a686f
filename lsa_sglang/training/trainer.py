"""`lsa-sglang train`: fit the indexer's query side on a dump, as a retriever.

Backbone-free by construction: the only inputs are the dump's shards and its `init.safetensors`
(the untrained default the server would build, i.e. the backbone's q projection at the target
layers). Nothing here imports transformers or opens the model folder (a test runs it with both
gone). Steps:
1. Start: the untrained indexer plus a zero q bias (`with_q_bias`), calibrated on the training
   split (`calibrate`): the q bias centres every head's q . chunk-key dots (the untrained deep
   layers have all of them below zero, where relu keeps nothing) and the layer biases put the
   0.5 threshold at the training positive rate.
2. Epochs: per batch, the per-layer logits against each sample's document keys (a leaky relu
   early on so that dead dots still get gradient, the served relu for the last fifth), the
   ensembled logit (max over layers = the server's "OR" rule, or the mean of probabilities), and
   a weighted BCE or focal loss over the positives and a sampled set of negatives per sample:
   `neg_ratio` per positive, `hard_fraction` of them the currently highest-scoring negatives
   (hard-negative mining), the rest uniform; plus a listwise term that ranks the positives
   first within each sample (what a page budget keeps) and an L2 pull towards the initial q
   projection (`anchor`). The epoch with the best validation recall@{2,4,8} is kept.
3. Operating point: one shift of all layer biases, chosen for the best served F-beta on the
   validation split (`tune_operating_point`), so the fixed 0.5 threshold means something.
Deterministic for a seed: one generator per epoch drives the order and the negatives, so a
resumed run equals an uninterrupted one. Per epoch: train loss and the validation split's
recall, precision, F1, keep ratio and AUC.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

from lsa_sglang.indexer import NeuralMemoryIndexer, load_indexer, save_indexer

from .data import DocData, Dump, data_fingerprint, load_dump
from .metrics import MethodAccumulator, topk_select
from .train_config import TrainConfig, TrainError
from .scoring import indexer_logits, indexer_scores

VAL_KS = (2, 4, 8)
Q_SIDE = ("wq_a", "q_norm", "wq_b", "wq_b_bias")
HEAD_SIDE = ("weights_proj", "weights_proj_bias", "layer_bias")
BIASES = ("weights_proj_bias", "layer_bias", "wq_b_bias")
# What each `train_params` choice trains (biases always: they calibrate the threshold).
TRAINED = {"all": HEAD_SIDE + Q_SIDE, "head": HEAD_SIDE, "head+norm": HEAD_SIDE + ("q_norm", "wq_b_bias"),
           "head+q": HEAD_SIDE + ("q_norm", "wq_b", "wq_b_bias")}


def _say(msg: str) -> None:
    print(f"[lsa-sglang train] {msg}", file=sys.stderr, flush=True)


# -- loss ------------------------------------------------------------------------------------------
def sample_weights(z: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor, cfg: TrainConfig,
                   gen: torch.Generator) -> torch.Tensor:
    """Per-chunk loss weights ``[b, N]``: positives `pos_weight`, chosen negatives 1, rest 0.

    ``z [b, N]`` are the current ensembled logits (detached) used to mine hard negatives.
    A sample without positives still contributes `neg_ratio` negatives (teaching "nothing here").
    """
    pos = labels & cand
    neg = cand & ~labels
    n_pos = pos.sum(1)
    want = torch.minimum(torch.ceil(cfg.neg_ratio * n_pos.clamp(min=1)).long(), neg.sum(1))
    n_hard = torch.round(want.double() * cfg.hard_fraction).long()
    hard = topk_select(z.detach(), neg, n_hard)
    rest = neg & ~hard
    rand = topk_select(torch.rand(z.shape, generator=gen), rest, want - n_hard)
    w = torch.zeros(z.shape, dtype=torch.float32)
    w[pos] = cfg.pos_weight
    w[hard | rand] = 1.0
    return w


def point_loss(logit: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, prob: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise BCE or focal loss; `prob` replaces sigmoid(logit) for the mean ensemble."""
    if prob is None:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
        p = torch.sigmoid(logit)
    else:
        p = prob.clamp(1e-6, 1 - 1e-6)
        bce = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    if cfg.loss == "focal":
        pt = target * p + (1 - target) * (1 - p)
        return bce * (1 - pt).pow(cfg.focal_gamma)
    return bce


def leak_at(cfg: TrainConfig, epoch: int) -> float:
    """Leaky-relu slope of an epoch: `leak` at first, down to 0 (the served relu) for the last
    fifth of the epochs, so the kept checkpoint is trained on exactly what the server computes."""
    return cfg.leak * max(0.0, 1.0 - epoch / max(1.0, 0.8 * cfg.epochs))


def listwise_loss(z: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Per sample ``-log(softmax mass of the positives among the candidates)``: what the
    selector does with the scores is rank them within one request, which BCE over pooled chunks
    does not ask for. Samples without positives or candidates give 0."""
    zc = z.masked_fill(~cand, float("-inf"))
    pos = labels & cand
    has = pos.any(1) & cand.any(1)
    lse_all = torch.logsumexp(zc, dim=1)
    lse_pos = torch.logsumexp(zc.masked_fill(~pos, float("-inf")), dim=1)
    return torch.where(has, lse_all - lse_pos, torch.zeros_like(lse_all))


def batch_loss(model: NeuralMemoryIndexer, doc: DocData, idx: torch.Tensor, cfg: TrainConfig,
               gen: torch.Generator, leak: float = 0.0) -> tuple[torch.Tensor, float]:
    """(sum of weighted losses, sum of weights) for samples `idx` of one document."""
    logits = indexer_logits(model, doc, idx, leak=leak).float()  # [b, L, N]
    labels, cand = doc.labels[idx], doc.candidates[idx]
    target = labels.float()
    if cfg.ensemble == "max":
        z = logits.amax(dim=1)
        main = point_loss(z, target, cfg)
    else:
        probs = torch.sigmoid(logits).mean(dim=1)
        z = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
        main = point_loss(z, target, cfg, prob=probs)
    w = sample_weights(z, labels, cand, cfg, gen)
    total = (main * w).sum()
    if cfg.rank_weight > 0:
        total = total + cfg.rank_weight * listwise_loss(z, labels, cand).sum() * float(w.sum()) / max(1, len(idx))
    if cfg.aux_weight > 0:
        aux = point_loss(logits, target[:, None, :].expand_as(logits), cfg)
        total = total + cfg.aux_weight * (aux * w[:, None, :]).sum() / logits.shape[1]
    return total, float(w.sum())


# -- validation ------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model: NeuralMemoryIndexer, docs: list[DocData], cfg: TrainConfig, threshold: float) -> dict:
    ks = VAL_KS + (cfg.budget,)
    acc = MethodAccumulator(ks, threshold, cfg.budget)
    for doc in docs:
        s, _ = indexer_scores(model, doc, cfg.ensemble)
        acc.add(s, doc.labels, doc.candidates, doc.mass, None)
    r = acc.result()
    return {"recall@top": sum(r[f"recall@{k}"] for k in VAL_KS) / len(VAL_KS),
            "recall@budget": r[f"recall@{cfg.budget}"], "served_recall": r["served"]["recall"],
            "served_precision": r["served"]["precision"], "served_f1": r["served"]["f1"],
            "keep_ratio": r["served"]["keep_ratio"], "f1@thr": r["threshold"]["f1"], "auc": r["auc"]}


def _score_of(v: dict) -> float:
    """Model selection: mean recall at the validation cut-offs (the top of each request's
    ranking is what a page budget keeps)."""
    x = v.get("recall@top", float("nan"))
    return -1.0 if x != x else float(x)


# -- the loop --------------------------------------------------------------------------------------
def _param_groups(model: NeuralMemoryIndexer, cfg: TrainConfig) -> list[dict]:
    """Three learning rates: biases move far (calibration, un-killing relu), the query-dependent
    head weights moderately, the d x d query maps little."""
    named = dict(model.named_parameters())
    chosen = TRAINED[cfg.train_params]
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    pick = lambda names: [named[n] for n in names if n in named and n in chosen]  # noqa: E731
    return [
        {"params": pick(BIASES), "lr": cfg.bias_lr},
        {"params": pick(("weights_proj",)), "lr": cfg.lr},
        {"params": pick(("wq_a", "q_norm", "wq_b")), "lr": cfg.q_lr},
    ]


def with_q_bias(model: NeuralMemoryIndexer) -> NeuralMemoryIndexer:
    """The same indexer with a (zero) trainable q bias. Backbones without one (Llama) have every
    q . mean-key of a deep layer below zero, where relu passes nothing; a learned offset along the
    keys' shared direction lifts the informative ones above it. The server loads the bias from
    the checkpoint (its spec says q_bias), so serving is unchanged."""
    if model.spec.q_bias:
        return model
    out = NeuralMemoryIndexer(dataclasses.replace(model.spec, q_bias=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            getattr(out, n).copy_(p)
    return out


class Adam:
    """Adam without weight decay. Not torch.optim: importing it pulls in torch._dynamo, 3-16 s
    per process on these shared 2-core machines, longer than a whole training run."""

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.groups = groups
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [[torch.zeros_like(p) for p in g["params"]] for g in groups]
        self.v = [[torch.zeros_like(p) for p in g["params"]] for g in groups]

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for g, ms, vs in zip(self.groups, self.m, self.v):
            for p, m, v in zip(g["params"], ms, vs):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-g["lr"])

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [[x.clone() for x in ms] for ms in self.m], "v": [[x.clone() for x in vs] for vs in self.v]}

    def load_state_dict(self, st: dict) -> None:
        self.t = int(st["t"])
        for dst, src in ((self.m, st["m"]), (self.v, st["v"])):
            for a, b in zip(dst, src):
                for x, y in zip(a, b):
                    x.copy_(y)


@torch.no_grad()
def calibrate(model: NeuralMemoryIndexer, docs: list[DocData], quantile: float = 0.5) -> NeuralMemoryIndexer:
    """Data-driven start (in place): a q bias that centres every head's dots, then layer biases
    that put the threshold at the training positive rate.

    Chunk keys share one dominant direction (cosine ~0.8 with their mean), so a bias delta in
    the query adds an almost constant ``delta . R_-t k`` to every dot of a head. The backbone's
    deep-layer dots sit far below zero (median around -60 for SmolLM2), where relu discards them;
    delta is the least-squares solution of ``delta . R_-t k_c = -quantile(dots)`` over the
    training candidates, which moves the head's `quantile` to zero and lets relu rank the upper
    part. Then ``layer_bias = -quantile(logits, 1 - positive rate)`` per layer.
    """
    from lsa_sglang.indexer.model import rope_neox

    s = model.spec
    L, H, Hk, Dh, g = s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.group_size
    us, dots = [], []
    for doc in docs:
        q, _ = model(doc.hidden, doc.positions)  # [P, L, H, Dh]
        P, N = doc.labels.shape
        k = doc.keys[None].expand(P, N, L, Hk, Dh)
        u = rope_neox(k, -doc.positions, s.rotary_dim, s.rope_theta)  # keys seen from position 0
        c = doc.candidates
        us.append(u[c])  # [M, L, Hk, Dh]
        d = torch.einsum("plkgd,nlkd->pnlkg", q.view(P, L, Hk, g, Dh), doc.keys).reshape(P, N, L, H)
        dots.append(d[c])  # [M, L, H]
    if not us:
        return model
    U, D = torch.cat(us).double(), torch.cat(dots).double()
    delta = torch.zeros(L, H, Dh, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            tau = torch.quantile(D[:, l, h], quantile)
            A = U[:, l, h // g]
            delta[l, h] = torch.linalg.lstsq(A, torch.full((A.shape[0], 1), -float(tau), dtype=torch.float64)).solution[:, 0]
    model.wq_b_bias.add_(delta.reshape(L, H * Dh).to(model.wq_b_bias.dtype))
    labels = torch.cat([doc.labels[doc.candidates] for doc in docs])
    rate = float(labels.float().mean())
    logits = torch.cat([_layer_logits_of(model, doc)[doc.candidates] for doc in docs])  # [M, L]
    for l in range(L):
        model.layer_bias[l] -= float(torch.quantile(logits[:, l].double(), 1.0 - rate))
    return model


def _layer_logits_of(model: NeuralMemoryIndexer, doc: DocData) -> torch.Tensor:
    return indexer_logits(model, doc).permute(0, 2, 1)  # [P, N, L]


def f_beta(precision: float, recall: float, beta: float) -> float:
    if not (precision == precision and recall == recall) or precision + recall == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


@torch.no_grad()
def tune_operating_point(model: NeuralMemoryIndexer, docs: list[DocData], cfg: TrainConfig, threshold: float) -> float:
    """Move every layer bias by the shift (grid over [-4, 4]) whose served selection (threshold,
    then at most `budget`) has the best F-beta on `docs`; returns the shift.

    The server thresholds at a fixed 0.5, and BCE with mined hard negatives lands near the base
    rate (6.5% of candidates), so a threshold keeps one or two chunks where the budget allows
    nine. beta = 2 values recall over precision: a needed chunk left on the host costs accuracy,
    an unneeded resident one only device memory, and the page budget caps that anyway.
    """
    base = model.layer_bias.detach().clone()
    best = (-1.0, 0.0)
    for delta in torch.linspace(-4.0, 4.0, 33).tolist():
        model.layer_bias.copy_(base + delta)
        v = validate(model, docs, cfg, threshold)
        score = f_beta(v["served_precision"], v["served_recall"], cfg.operating_beta)
        if score > best[0] + 1e-9:
            best = (score, delta)
    model.layer_bias.copy_(base + best[1])
    return best[1]


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(data: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig = TrainConfig(),
          state: str | os.PathLike | None = None, log: bool = True) -> dict:
    """Train on the dump at `data`, write the best epoch's checkpoint to `out`; returns a summary.

    `state` (default: ``<data>/train-state-<out name>.pt``) holds the last finished epoch; a
    later call with the same data and config resumes after it.
    """
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    dump: Dump = load_dump(data, splits=("train", "val"), votes=cfg.votes)
    train_docs, val_docs = dump.split("train"), dump.split("val")
    if not train_docs or sum(d.num_samples for d in train_docs) == 0:
        raise TrainError(f"{data}: the dump has no training samples (split 'train')")
    init = load_indexer(dump.init_checkpoint, expected=dump.spec)
    model = load_indexer(dump.init_checkpoint, expected=dump.spec)
    if cfg.q_bias or cfg.calibrate:
        model = with_q_bias(model)
    if cfg.calibrate:
        calibrate(model, train_docs, cfg.calibrate_quantile)
    threshold = float(dump.spec.threshold)
    groups = _param_groups(model, cfg)
    opt = Adam(groups)
    anchors = {n: p.detach().clone() for n, p in init.named_parameters() if n in Q_SIDE}

    fp = data_fingerprint(dump)
    out = Path(out)
    state_path = Path(state) if state else Path(data) / f"train-state-{out.stem}.pt"
    history: list[dict] = []
    best: dict = {"epoch": 0, "score": _score_of(validate(model, val_docs, cfg, threshold)) if val_docs else -1.0,
                  "model": {k: v.clone() for k, v in model.state_dict().items()}}
    start = 1
    if state_path.exists():
        try:
            st = torch.load(state_path, weights_only=False)
        except Exception as e:
            raise TrainError(f"{state_path}: unreadable training state ({type(e).__name__}); delete it to start over") from None
        if st.get("fingerprint") != fp or st.get("config") != dataclasses.asdict(cfg):
            raise TrainError(f"{state_path}: training state of another dump or config; delete it to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        history, best, start = st["history"], st["best"], st["epoch"] + 1
        if log:
            _say(f"resuming after epoch {st['epoch']} from {state_path}")

    samples = [(di, si) for di, d in enumerate(train_docs) for si in range(d.num_samples)]
    n_pos = sum(int((d.labels & d.candidates).sum()) for d in train_docs)
    n_cand = sum(int(d.candidates.sum()) for d in train_docs)
    if log and start == 1:
        _say(f"{len(train_docs)} train docs / {len(samples)} samples ({n_pos / max(1, n_cand):.1%} of "
             f"{n_cand} candidates positive), {len(val_docs)} val docs; loss {cfg.loss}, ensemble {cfg.ensemble}, "
             f"params {cfg.train_params}; start (calibrated) val recall@2,4,8 {best['score']:.3f}")
    for epoch in range(start, cfg.epochs + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(samples), generator=gen).tolist()
        model.train()
        leak = leak_at(cfg, epoch)
        tot, wsum, te = 0.0, 0.0, time.monotonic()
        for b in range(0, len(order), cfg.batch_size):
            batch = [samples[i] for i in order[b : b + cfg.batch_size]]
            by_doc: dict[int, list[int]] = {}
            for di, si in batch:
                by_doc.setdefault(di, []).append(si)
            opt.zero_grad()
            loss_sum = torch.zeros(())
            weight = 0.0
            for di in sorted(by_doc):
                l, w = batch_loss(model, train_docs[di], torch.tensor(sorted(by_doc[di])), cfg, gen, leak)
                loss_sum = loss_sum + l
                weight += w
            loss = loss_sum / max(weight, 1.0)
            if cfg.anchor > 0:
                pull = sum(((getattr(model, n) - a) ** 2).mean() for n, a in anchors.items()
                           if n in TRAINED[cfg.train_params])
                loss = loss + cfg.anchor * pull
            loss.backward()
            opt.step()
            tot += float(loss_sum.detach())
            wsum += weight
        model.eval()
        val = validate(model, val_docs, cfg, threshold) if val_docs else {}
        rec = {"epoch": epoch, "loss": tot / max(wsum, 1.0), "seconds": round(time.monotonic() - te, 2), **val}
        history.append(rec)
        if val_docs and _score_of(val) > best["score"]:
            best = {"epoch": epoch, "score": _score_of(val), "model": {k: v.clone() for k, v in model.state_dict().items()}}
        elif not val_docs:
            best = {"epoch": epoch, "score": -rec["loss"], "model": {k: v.clone() for k, v in model.state_dict().items()}}
        if log:
            v = (f" | val recall@2,4,8 {val['recall@top']:.3f} @{cfg.budget} {val['recall@budget']:.3f} served R {val['served_recall']:.3f} "
                 f"P {val['served_precision']:.3f} F1 {val['served_f1']:.3f} keep {val['keep_ratio']:.3f} "
                 f"auc {val['auc']:.3f}") if val_docs else ""
            _say(f"epoch {epoch}/{cfg.epochs} loss {rec['loss']:.4f}{v}")
        _atomic_save({"epoch": epoch, "model": model.state_dict(), "optim": opt.state_dict(), "history": history,
                      "best": best, "fingerprint": fp, "config": dataclasses.asdict(cfg)}, state_path)

    model.load_state_dict(best["model"])
    shift = 0.0
    if cfg.operating_beta > 0:
        shift = tune_operating_point(model, val_docs or train_docs, cfg, threshold)
        if log:
            _say(f"operating point: layer biases {shift:+.2f} (best served F{cfg.operating_beta:g} on "
                 f"{'val' if val_docs else 'train'})")
    meta = {
        "kind": "trained",
        "model_id": dump.spec.model_id,
        "config_hash": dump.spec.config_hash,
        "target_layers": list(dump.spec.target_layers),
        "chunk_size": dump.spec.chunk_size,
        "tau": dump.spec.tau,
        "threshold": threshold,
        "ensemble": cfg.ensemble,
        "best_epoch": best["epoch"],
        "bias_shift": shift,
        "config": dataclasses.asdict(cfg),
        "data": {"fingerprint": fp, "docs": dump.params.get("docs"), "counts": dump.params.get("counts"),
                 "doc_tokens": dump.params.get("doc_tokens"), "top_p": dump.params.get("top_p"),
                 "votes": cfg.votes or dump.params.get("votes"), "vote_layers": dump.params.get("vote_layers"),
                 "sink_chunks": dump.params.get("sink_chunks"), "recent_chunks": dump.params.get("recent_chunks"),
                 "train_samples": len(samples), "val_docs": len(val_docs)},
        "history": [{k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in h.items()}
                    for h in history],
    }
    save_indexer(model, out, training=meta)
    if log:
        _say(f"wrote {out} (best epoch {best['epoch']}, {time.monotonic() - t0:.0f} s)")
    return {"out": str(out), "best_epoch": best["epoch"], "history": history, "seconds": time.monotonic() - t0}


__all__ = ["TrainConfig", "TrainError", "batch_loss", "point_loss", "sample_weights", "train", "validate"]
