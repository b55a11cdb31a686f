"""`lsa-sglang dump`: run the backbone once over long documents and write the training data.

Layout of a dump directory (all written atomically: temp file + rename):
- ``manifest.json``: format, model identity (model id, config hash, architecture), the dump
  parameters, the indexer spec, and one entry per finished document (file, split, sizes,
  sha256). Rewritten after every document, so an interrupted dump resumes where it stopped.
- ``init.safetensors``: the untrained default indexer (the backbone's own q projection at the
  target layers, `NeuralMemoryIndexer.from_backbone`). The trainer starts from it and never
  opens the backbone itself.
- ``shard-NNNNN.safetensors``: one document: ``hidden [P, L, d]`` (input of each target layer's
  attention after its RMSNorm, at the P sample positions), ``positions [P]``, ``n_complete [P]``
  (chunks complete at each position), ``keys/kmin/kmax [N, L, Hk, Dh]`` (mean/min/max post-RoPE
  key of each complete chunk), ``labels [P, N]`` (golden union over the window, see labels.py),
  ``votes [P, tau, N]`` (per row of the window: how many voting layers picked the chunk, so the
  vote threshold can be changed without a re-dump) and ``mass [P, N]`` (attention mass per chunk,
  mean over the window's rows and the voting layers).
Memory: one document at a time; per layer one set of keys and a block of attention rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .docs import Document, documents
from .labels import default_votes, window_positives

DUMP_FORMAT = "lsa-indexer-dump"
DUMP_VERSION = 1
MANIFEST = "manifest.json"
INIT_CKPT = "init.safetensors"


class DumpError(ValueError):
    """A dump cannot be written, resumed or read; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class DumpParams:
    """Everything that decides the content of a dump; a resumed dump must use the same."""

    docs: str
    counts: dict | None  # per split; None: every document of a JSONL file
    doc_tokens: int = 4096
    positions: int = 32
    focus_fraction: float = 0.5
    min_position: int = 1024
    chunk_size: int = 64
    tau: int = 64
    top_p: float = 0.6
    votes: int = 0  # 0: labels.default_votes(len(vote_layers))
    vote_layers: tuple = ()
    target_layers: tuple = ()
    sink_chunks: int = 1
    recent_chunks: int = 4
    threshold: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vote_layers"], d["target_layers"] = list(self.vote_layers), list(self.target_layers)
        return d


# -- small helpers ---------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[lsa-sglang dump] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while b := fh.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def sample_positions(
    n_tokens: int, focus_tokens: list[int], params: DumpParams, rng: torch.Generator
) -> torch.Tensor:
    """Sorted decode positions t (windows ``[t, t+tau)`` inside the document): up to
    ``focus_fraction`` of them just before a focus token (its window covers the answer), the rest
    uniform over ``[lo, T - tau]``; no duplicates. Empty when the document is too short."""
    tau, cs = params.tau, params.chunk_size
    lo = max(params.min_position, (params.sink_chunks + params.recent_chunks + 1) * cs + 1)
    hi = n_tokens - tau  # inclusive
    if hi < lo:
        return torch.zeros(0, dtype=torch.int64)
    chosen: list[int] = []
    n_focus = int(round(params.positions * params.focus_fraction)) if focus_tokens else 0
    for a in focus_tokens:
        if len(chosen) >= n_focus:
            break
        t = a - 1 - int(torch.randint(0, tau // 2, (1,), generator=rng))
        if lo <= t <= hi and t not in chosen:
            chosen.append(t)
    pool = torch.randperm(hi - lo + 1, generator=rng) + lo
    for t in pool.tolist():
        if len(chosen) >= params.positions:
            break
        if t not in chosen:
            chosen.append(t)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def _focus_tokens(doc: Document, offsets: list[tuple[int, int]], n_tokens: int) -> list[int]:
    """First token of each focus span (tokens whose character span starts inside it)."""
    out = []
    for a, b in doc.focus:
        for i, (s, e) in enumerate(offsets[:n_tokens]):
            if e > a and s < b:
                out.append(i)
                break
    return out


# -- the dump --------------------------------------------------------------------------------------
def resolve_layers(num_layers: int, target_layers: tuple | None, vote_layers: str | tuple | None) -> tuple[tuple, tuple]:
    """Default target layers are the server's (`models.adapter.default_target_layers`); default
    voting layers are 2 .. last target layer: layers 0-1 attend by position, and stopping the
    forward at the last target layer saves a fifth of the dump's time."""
    from lsa_sglang.models.adapter import default_target_layers

    tl = tuple(target_layers) if target_layers else default_target_layers(num_layers)
    if vote_layers in (None, "", "default"):
        vl = tuple(range(min(2, tl[-1]), tl[-1] + 1))
    elif vote_layers == "all":
        vl = tuple(range(num_layers))
    else:
        vl = tuple(vote_layers)  # type: ignore[arg-type]
    for l in tl + vl:
        if not 0 <= l < num_layers:
            raise DumpError(f"layer {l} does not exist: the model has {num_layers} layers")
    return tl, vl


def _init_indexer(model, spec):
    """The server's untrained default, built from this model's q projections (see backend.py)."""
    from lsa_sglang.indexer import NeuralMemoryIndexer

    layers = [model.model.layers[l].self_attn for l in spec.target_layers]
    ws = [a.q_proj.weight.detach().float() for a in layers]
    bs = [a.q_proj.bias.detach().float() if a.q_proj.bias is not None else None for a in layers]
    return NeuralMemoryIndexer.from_backbone(spec, ws, None if bs[0] is None else bs)


def load_manifest(out: Path) -> dict | None:
    p = out / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DumpError(f"{p}: not a readable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != DUMP_FORMAT:
        raise DumpError(f"{p}: not an lsa-indexer dump manifest (field 'format' is not '{DUMP_FORMAT}')")
    if m.get("format_version") != DUMP_VERSION:
        raise DumpError(f"{p}: field 'format_version' is {m.get('format_version')!r}, expected {DUMP_VERSION}")
    return m


def run_dump(
    model_path: str,
    out: str | os.PathLike,
    docs: str = "mixed",
    counts: dict | None = None,
    doc_tokens: int = 4096,
    positions: int = 32,
    focus_fraction: float = 0.5,
    min_position: int | None = None,
    chunk_size: int = 64,
    tau: int = 64,
    top_p: float = 0.6,
    votes: int = 0,
    vote_layers: str | tuple | None = None,
    target_layers: tuple | None = None,
    sink_chunks: int = 1,
    recent_chunks: int = 4,
    threshold: float = 0.5,
    seed: int = 0,
    home: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Dump (or resume dumping) into `out`; returns the final manifest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lsa_sglang.assets import model_path_or_fetch
    from lsa_sglang.indexer import read_metadata, save_indexer, spec_from_hf_config
    from lsa_sglang.indexer.checkpoint import architecture_fields, config_hash

    t_start = time.monotonic()
    if threads:
        torch.set_num_threads(threads)
    path = model_path_or_fetch(model_path, home)
    hf_cfg = json.loads((Path(path) / "config.json").read_text())
    n_layers = int(architecture_fields(hf_cfg)["num_hidden_layers"])
    tl, vl = resolve_layers(n_layers, target_layers, vote_layers)
    from .docs import BUILTIN_SOURCES

    if counts is None and docs in BUILTIN_SOURCES and not Path(docs).is_file():
        counts = {"train": 12, "val": 2, "test": 4}
    params = DumpParams(
        docs=docs, counts=counts, doc_tokens=doc_tokens, positions=positions, focus_fraction=focus_fraction,
        min_position=doc_tokens // 4 if min_position is None else min_position, chunk_size=chunk_size, tau=tau,
        top_p=top_p, votes=votes or default_votes(len(vl)), vote_layers=vl, target_layers=tl,
        sink_chunks=sink_chunks, recent_chunks=recent_chunks, threshold=threshold, seed=seed,
    )
    model_id = Path(path).resolve().name
    chash = config_hash(hf_cfg)
    # q_bias is settled by the backbone's weights when init.safetensors is written.
    spec = dataclasses.replace(spec_from_hf_config(hf_cfg, model_id, tl, chunk_size, tau, threshold), prenormed=True)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    if manifest is not None:
        if manifest.get("params") != json.loads(json.dumps(params.to_dict())) or manifest.get("config_hash") != chash \
                or manifest.get("model_id") != model_id:
            old = manifest.get("params", {})
            diff = sorted(k for k in set(old) | set(params.to_dict())
                          if old.get(k) != json.loads(json.dumps(params.to_dict())).get(k))
            what = f"parameter '{diff[0]}'" if diff else "model"
            raise DumpError(f"{out} holds a dump with a different {what}; use another --out or delete it")
    else:
        manifest = new_manifest(model_id, str(path), hf_cfg, params, spec.to_dict())
    done = {s["doc_id"]: s for s in manifest["shards"]
            if (out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"]}
    manifest["shards"] = [s for s in manifest["shards"] if s["doc_id"] in done]
    skipped = {s["doc_id"] for s in manifest.get("skipped", [])}

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    doc_list = list(documents(
        docs, counts, seed=seed, chars=int(doc_tokens * 4.2), home=home,
        count_tokens=lambda s: len(tok(s).input_ids), max_tokens=doc_tokens,
    ))
    todo = [d for d in doc_list if d.doc_id not in done and d.doc_id not in skipped]
    if len({d.doc_id for d in doc_list}) != len(doc_list):
        raise DumpError(f"document ids from {docs!r} are not unique")
    if todo or not (out / INIT_CKPT).is_file():
        from .capture import DocCapture

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        if not (out / INIT_CKPT).is_file():
            tmp = out / f".{INIT_CKPT}.tmp"
            save_indexer(_init_indexer(model, spec), tmp, training={"kind": "untrained-init", "source": "backbone q_proj"})
            os.replace(tmp, out / INIT_CKPT)
        cap = DocCapture(model, tl, vl, chunk_size, top_p, sink_chunks)
    manifest["spec"] = read_metadata(out / INIT_CKPT)["spec"]
    write_json_atomic(out / MANIFEST, manifest)
    if todo:
        _say(f"{model_id}: {len(todo)} documents to go ({len(done)} already done), {doc_tokens} tokens each, "
             f"target layers {list(tl)}, voting layers {vl[0]}..{vl[-1]} (>= {params.votes} votes)")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"dump {model_id}", unit="doc", file=sys.stderr, dynamic_ncols=True)
    index_of = {d.doc_id: i for i, d in enumerate(doc_list)}
    for doc in todo:
        t0 = time.monotonic()
        entry = _dump_one(doc, index_of[doc.doc_id], tok, cap, params, out)
        if entry is None:
            manifest.setdefault("skipped", []).append({"doc_id": doc.doc_id, "reason": "too short"})
        else:
            entry["seconds"] = round(time.monotonic() - t0, 2)
            manifest["shards"].append(entry)
        manifest["seconds"] = round(manifest.get("seconds", 0.0) + time.monotonic() - t0, 2)
        write_json_atomic(out / MANIFEST, manifest)
        if bar is not None:
            bar.update(1)
            if entry is not None:
                bar.set_postfix(pos=f"{entry['positives'] / max(1, entry['candidates']):.1%}", s=entry["seconds"])
    if bar is not None:
        bar.close()
    order = {d.doc_id: i for i, d in enumerate(doc_list)}
    manifest["shards"].sort(key=lambda s: order.get(s["doc_id"], 1 << 30))
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST, manifest)
    if not manifest["shards"]:
        raise DumpError(f"no usable document: each needs more than {params.min_position + tau} tokens")
    _say(f"{model_id}: {len(manifest['shards'])} documents in {out} "
         f"({time.monotonic() - t_start:.0f} s this run)")
    return manifest


def _dump_one(doc: Document, index: int, tok, cap, params: DumpParams, out: Path) -> dict | None:
    """Capture one document and write its shard; None if it is too short to sample from."""
    enc = tok(doc.text, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"][: params.doc_tokens], dtype=torch.int64)
    T = int(ids.numel())
    rng = torch.Generator().manual_seed(params.seed * 1_000_003 + index)
    focus = _focus_tokens(doc, list(enc["offset_mapping"]), T)
    pos = sample_positions(T, focus, params, rng)
    if pos.numel() == 0:
        return None
    tau, cs = params.tau, params.chunk_size
    win = pos[:, None] + torch.arange(tau)[None, :]  # [P, tau]
    rows, inverse = torch.unique(win.reshape(-1), sorted=True, return_inverse=True)
    res = cap.run(ids, pos, rows)
    N = T // cs
    votes = res.votes[inverse.reshape(-1)].reshape(len(pos), tau, -1)[:, :, :N].contiguous()
    n_complete = pos // cs
    labels = window_positives(votes >= params.votes, n_complete)
    mass = res.mass[inverse.reshape(-1)].reshape(len(pos), tau, -1)[:, :, :N].mean(1)
    tensors = {
        "hidden": res.hidden, "positions": pos, "n_complete": n_complete, "keys": res.keys, "kmin": res.kmin,
        "kmax": res.kmax, "labels": labels, "votes": votes, "mass": mass,
    }
    entry = write_shard(out, index, doc.doc_id, doc.split, tensors, params.sink_chunks, params.recent_chunks)
    entry.update(source=doc.source, tokens=T,
                 focus_samples=sum(any(t <= a < t + tau for a in focus) for t in pos.tolist()))
    return entry


def write_shard(out: Path, index: int, doc_id: str, split: str, tensors: dict, sink_chunks: int,
                recent_chunks: int) -> dict:
    """Write one document's shard atomically; returns its manifest entry (also used by tests to
    build dumps by hand, so there is one writer of the format)."""
    from safetensors.torch import save_file

    from .labels import candidate_mask

    t = {k: v.contiguous() for k, v in tensors.items()}
    t["labels"] = t["labels"].to(torch.uint8)
    t["votes"] = t["votes"].to(torch.uint8)
    N = int(t["keys"].shape[0])
    cand = candidate_mask(t["n_complete"], N, sink_chunks, recent_chunks)
    name = f"shard-{index:05d}.safetensors"
    tmp = out / f".{name}.tmp"
    meta = {"format": DUMP_FORMAT + "-shard", "format_version": str(DUMP_VERSION), "doc_id": doc_id, "split": split}
    save_file(t, str(tmp), metadata=meta)
    os.replace(tmp, out / name)
    return {
        "file": name, "doc_id": doc_id, "split": split, "samples": int(t["positions"].numel()), "chunks": N,
        "candidates": int(cand.sum()), "positives": int((t["labels"].bool() & cand).sum()),
        "bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name),
    }


def new_manifest(model_id: str, model_path: str, hf_config: dict, params: DumpParams, spec: dict) -> dict:
    """An empty manifest (documents are appended as their shards are written)."""
    from lsa_sglang.indexer.checkpoint import architecture_fields, config_hash

    return {
        "format": DUMP_FORMAT, "format_version": DUMP_VERSION, "model_id": model_id, "model_path": model_path,
        "config_hash": config_hash(hf_config), "architecture": architecture_fields(hf_config),
        "params": params.to_dict(), "spec": spec, "init_checkpoint": INIT_CKPT,
        "shards": [], "skipped": [], "complete": False, "seconds": 0.0,
    }


__all__ = ["DUMP_FORMAT", "DUMP_VERSION", "DumpError", "DumpParams", "INIT_CKPT", "MANIFEST", "load_manifest",
           "new_manifest", "resolve_layers", "run_dump", "sample_positions", "sha256_file", "write_json_atomic",
           "write_shard"]
