"""Reading a dump back: manifest and shards validated, one clear error per problem.

The trainer and the evaluator only ever see this module's `DocData` (no transformers, no
backbone weights): a dump is self-contained. Every check names the file and what is wrong, so a
truncated copy, a shard from another dump or a dump of another model fails before training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from lsa_sglang.indexer import IndexerSpec

from .dump import DUMP_FORMAT, DUMP_VERSION, INIT_CKPT, DumpError, load_manifest, sha256_file
from .labels import candidate_mask, window_positives


@dataclasses.dataclass
class DocData:
    """One document's samples (see dump.py for the meaning of each tensor)."""

    doc_id: str
    split: str
    hidden: torch.Tensor  # [P, L, d] float32
    positions: torch.Tensor  # [P] int64
    n_complete: torch.Tensor  # [P] int64
    keys: torch.Tensor  # [N, L, Hk, Dh]
    kmin: torch.Tensor
    kmax: torch.Tensor
    labels: torch.Tensor  # [P, N] bool
    mass: torch.Tensor  # [P, N] float32
    candidates: torch.Tensor  # [P, N] bool

    @property
    def num_samples(self) -> int:
        return int(self.positions.numel())


@dataclasses.dataclass
class Dump:
    path: Path
    manifest: dict
    spec: IndexerSpec
    docs: list[DocData]

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    def split(self, name: str) -> list[DocData]:
        return [d for d in self.docs if d.split == name]

    @property
    def init_checkpoint(self) -> Path:
        return self.path / self.manifest.get("init_checkpoint", INIT_CKPT)


def _spec(path: Path, manifest: dict) -> IndexerSpec:
    raw = manifest.get("spec")
    if not isinstance(raw, dict):
        raise DumpError(f"{path / 'manifest.json'}: field 'spec' is missing")
    try:
        return IndexerSpec(**raw)
    except (TypeError, ValueError) as e:
        raise DumpError(f"{path / 'manifest.json'}: field 'spec' is invalid ({e})") from None


def _shape(file: Path, name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise DumpError(f"{file}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")


def load_doc(path: Path, entry: dict, spec: IndexerSpec, params: dict, votes: int | None = None,
             sink_chunks: int | None = None, recent_chunks: int | None = None, verify: bool = True) -> DocData:
    """One shard, checked against its manifest entry and the dump's spec."""
    from safetensors import safe_open

    file = path / str(entry.get("file", ""))
    if not file.is_file():
        raise DumpError(f"{file}: shard listed in the manifest is missing")
    if file.stat().st_size != entry.get("bytes"):
        raise DumpError(f"{file}: has {file.stat().st_size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced)")
    if verify and entry.get("sha256") and sha256_file(file) != entry["sha256"]:
        raise DumpError(f"{file}: sha256 differs from the manifest (corrupt shard)")
    want = ("hidden", "positions", "n_complete", "keys", "kmin", "kmax", "labels", "votes", "mass")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            present = set(f.keys())
            missing = [n for n in want if n not in present]
            if missing:
                raise DumpError(f"{file}: tensor '{missing[0]}' is missing")
            t = {n: f.get_tensor(n) for n in want}
    except DumpError:
        raise
    except Exception as e:
        raise DumpError(f"{file}: not a readable shard ({type(e).__name__}: {e})") from None
    if meta.get("format") != DUMP_FORMAT + "-shard" or meta.get("format_version") != str(DUMP_VERSION):
        raise DumpError(f"{file}: not a version-{DUMP_VERSION} {DUMP_FORMAT} shard")
    if meta.get("doc_id") != entry.get("doc_id"):
        raise DumpError(f"{file}: holds document {meta.get('doc_id')!r}, the manifest says {entry.get('doc_id')!r}")
    P = int(t["positions"].numel())
    L, d, Hk, Dh = spec.num_layers, spec.hidden_size, spec.num_kv_heads, spec.head_dim
    N = int(t["keys"].shape[0]) if t["keys"].dim() == 4 else -1
    tau = int(params["tau"])
    _shape(file, "hidden", t["hidden"], (P, L, d))
    _shape(file, "positions", t["positions"], (P,))
    _shape(file, "n_complete", t["n_complete"], (P,))
    for n in ("keys", "kmin", "kmax"):
        _shape(file, n, t[n], (N, L, Hk, Dh))
    _shape(file, "labels", t["labels"], (P, N))
    _shape(file, "votes", t["votes"], (P, tau, N))
    _shape(file, "mass", t["mass"], (P, N))
    for n in ("hidden", "keys", "kmin", "kmax", "mass"):
        if not torch.isfinite(t[n]).all():
            raise DumpError(f"{file}: tensor '{n}' holds NaN or inf")
    if not bool(((t["labels"] == 0) | (t["labels"] == 1)).all()):
        raise DumpError(f"{file}: tensor 'labels' must hold only 0 and 1")
    if not bool((t["n_complete"] == t["positions"] // int(params["chunk_size"])).all()):
        raise DumpError(f"{file}: tensors 'n_complete' and 'positions' disagree")
    labels = t["labels"].bool() if votes is None else window_positives(t["votes"] >= votes, t["n_complete"])
    sink = int(params["sink_chunks"] if sink_chunks is None else sink_chunks)
    recent = int(params["recent_chunks"] if recent_chunks is None else recent_chunks)
    return DocData(
        doc_id=str(entry["doc_id"]), split=str(entry.get("split", "train")), hidden=t["hidden"].float(),
        positions=t["positions"].long(), n_complete=t["n_complete"].long(), keys=t["keys"].float(),
        kmin=t["kmin"].float(), kmax=t["kmax"].float(), labels=labels, mass=t["mass"].float(),
        candidates=candidate_mask(t["n_complete"].long(), N, sink, recent),
    )


def load_dump(path: str | Path, splits: tuple[str, ...] | None = None, votes: int | None = None,
              sink_chunks: int | None = None, recent_chunks: int | None = None, verify: bool = True) -> Dump:
    """The dump at `path`, documents of `splits` only (None: all). `votes`, `sink_chunks` and
    `recent_chunks` override the dump's label vote threshold and candidate set."""
    p = Path(path)
    if not p.is_dir():
        raise DumpError(f"{p}: dump directory not found")
    manifest = load_manifest(p)
    if manifest is None:
        raise DumpError(f"{p}: no manifest.json (not a dump directory, or the dump never finished a document)")
    for field in ("params", "shards", "model_id", "config_hash"):
        if field not in manifest:
            raise DumpError(f"{p / 'manifest.json'}: field '{field}' is missing")
    spec = _spec(p, manifest)
    if spec.model_id != manifest["model_id"] or spec.config_hash != manifest["config_hash"]:
        raise DumpError(f"{p / 'manifest.json'}: field 'spec' names another model than the manifest")
    if votes is not None and votes < 1:
        raise DumpError(f"votes must be >= 1, got {votes}")
    docs = [
        load_doc(p, e, spec, manifest["params"], votes, sink_chunks, recent_chunks, verify)
        for e in manifest["shards"]
        if splits is None or e.get("split") in splits
    ]
    return Dump(p, manifest, spec, docs)


def data_fingerprint(dump: Dump) -> str:
    """Identity of the training data (shard hashes and parameters): a resumed run must match."""
    import hashlib

    blob = json.dumps({"params": dump.params, "shards": [(e["doc_id"], e.get("sha256")) for e in dump.manifest["shards"]]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = ["DocData", "Dump", "data_fingerprint", "load_doc", "load_dump"]
