"""Indexer checkpoints: one safetensors file whose header carries the spec as JSON.

A checkpoint only makes sense for the backbone (and chunking) it was trained against, so
`load_indexer` checks it against the spec the server derives from the running model and fails at
start with one message naming the first field that does not fit. Keeping spec and tensors in one
file means they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .model import IndexerSpec, NeuralMemoryIndexer, SpecError, _show

FORMAT = "lsa-indexer"
FORMAT_VERSION = 1
META_KEY = "lsa_indexer"

# Fields that must agree with the running backbone. rank, tau, threshold, rms_eps, prenormed and
# q_bias are properties of the checkpoint itself (a trained indexer may use r < d; the server's
# own threshold/tau apply at run time).
CHECKED_FIELDS = (
    "model_id",
    "config_hash",
    "target_layers",
    "hidden_size",
    "num_heads",
    "head_dim",
    "num_kv_heads",
    "rotary_dim",
    "rope_theta",
    "chunk_size",
)

_HASH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "vocab_size",
)


class IndexerCheckpointError(ValueError):
    """The checkpoint cannot be used with this model; `field` names what is wrong (or None)."""

    def __init__(self, message: str, field: str | None = None, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.field = field
        self.path = None if path is None else str(path)


# -- backbone identity --------------------------------------------------------------------------
def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"expected an HF config dict (or object with to_dict), got {type(cfg).__name__}")


def _text_config(cfg: dict) -> dict:
    """Multimodal configs nest the language model under `text_config`."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        merged = dict(cfg["text_config"])
        merged.setdefault("model_type", cfg.get("model_type"))
        return merged
    return cfg


def _rope_theta(cfg: dict) -> float | None:
    """transformers 5 writes `rope_parameters.rope_theta` instead of a top-level `rope_theta`."""
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and rp.get("rope_theta") is not None:
        return float(rp["rope_theta"])
    return None


def architecture_fields(hf_config: Any) -> dict:
    """The architecture fields `config_hash` covers, with the usual HF defaults filled in."""
    cfg = _text_config(_as_dict(hf_config))
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    out = {
        "model_type": cfg.get("model_type"),
        "hidden_size": hidden,
        "num_hidden_layers": cfg.get("num_hidden_layers", cfg.get("num_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or (hidden // heads if hidden and heads else None),
        "rope_theta": _rope_theta(cfg),
        "vocab_size": cfg.get("vocab_size"),
    }
    return {k: (int(v) if isinstance(v, (int, float)) and k != "rope_theta" else v) for k, v in out.items()}


def model_id_from_path(model_path: Any) -> str:
    """The `model_id` a server checks a checkpoint against: the model folder's name."""
    return str(model_path or "").rstrip("/").split("/")[-1]


def config_hash(hf_config_dict: Any) -> str:
    """Stable 16-hex-digit hash of the backbone's architecture (not of names, dtypes or paths),
    so a checkpoint survives re-saving the model but not a different model of the same name."""
    fields = architecture_fields(hf_config_dict)
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_from_hf_config(
    hf_config: Any,
    model_id: str,
    target_layers: tuple[int, ...],
    chunk_size: int,
    tau: int,
    threshold: float,
    rank: int | None = None,
) -> IndexerSpec:
    """The spec a backbone implies (GQA models: indexer heads = attention heads, keys = KV heads)."""
    cfg = _text_config(_as_dict(hf_config))
    f = architecture_fields(cfg)
    head_dim = int(f["head_dim"])
    rotary_dim = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0) or 1.0))
    theta = f["rope_theta"] if f["rope_theta"] is not None else 10000.0
    return IndexerSpec(
        model_id=model_id,
        config_hash=config_hash(cfg),
        target_layers=tuple(target_layers),
        hidden_size=int(f["hidden_size"]),
        rank=int(rank if rank is not None else f["hidden_size"]),
        num_heads=int(f["num_attention_heads"]),
        head_dim=head_dim,
        num_kv_heads=int(f["num_key_value_heads"]),
        rope_theta=float(theta),
        rotary_dim=rotary_dim - rotary_dim % 2,
        chunk_size=chunk_size,
        tau=tau,
        threshold=threshold,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )


# -- save ---------------------------------------------------------------------------------------
def save_indexer(model: NeuralMemoryIndexer, path: str | os.PathLike, training: dict | None = None) -> None:
    """Write tensors + JSON metadata (spec, format version, free-form training info) to `path`."""
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "training": dict(training or {}),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


# -- load ---------------------------------------------------------------------------------------
def _err(path: Any, msg: str, field: str | None = None) -> IndexerCheckpointError:
    return IndexerCheckpointError(f"indexer checkpoint {path}: {msg}", field=field, path=path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON metadata (format, format_version, spec, training)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise _err(p, "file not found" if not p.exists() else "is not a file", field="path")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for every malformed header
        raise _err(p, f"is not a safetensors file ({type(e).__name__}: {e})", field="format") from None
    raw = header.get(META_KEY)
    if raw is None:
        raise _err(p, f"has no '{META_KEY}' metadata (not written by save_indexer)", field="format")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _err(p, f"metadata is not valid JSON ({e})", field="format") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _err(p, f"metadata format is not '{FORMAT}'", field="format")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise _err(
            p, f"field 'format_version': expected {FORMAT_VERSION}, got {_show(version)}", field="format_version"
        )
    return meta


def _spec_from_meta(path: Path, meta: dict) -> IndexerSpec:
    raw = meta.get("spec")
    if not isinstance(raw, dict):
        raise _err(path, "metadata has no 'spec' mapping", field="spec")
    fields = dataclasses.fields(IndexerSpec)
    names = [f.name for f in fields]
    for f in fields:
        if f.name not in raw and f.default is dataclasses.MISSING:
            raise _err(path, f"metadata spec is missing field '{f.name}'", field=f.name)
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise _err(path, f"metadata spec has unknown field {_show(unknown[0])}", field=unknown[0])
    try:
        return IndexerSpec(**raw)
    except SpecError as e:
        raise _err(path, f"metadata spec field '{e.field}' is invalid ({e})", field=e.field) from None
    except (TypeError, ValueError) as e:
        raise _err(path, f"metadata spec is invalid ({e})", field="spec") from None


def _same(name: str, want: Any, got: Any) -> bool:
    if name == "rope_theta":
        return math.isclose(float(want), float(got), rel_tol=1e-9)
    if name == "target_layers":
        return tuple(want) == tuple(got)
    return want == got


def check_spec(path: str | os.PathLike, expected: IndexerSpec, got: IndexerSpec) -> None:
    """Raise for the first backbone-facing field where the checkpoint's spec differs."""
    for name in CHECKED_FIELDS:
        want, have = getattr(expected, name), getattr(got, name)
        if not _same(name, want, have):
            raise _err(
                path,
                f"does not fit this model: field '{name}' expected {want!r}, got {_show(have)}",
                field=name,
            )


def expected_shapes(spec: IndexerSpec) -> dict[str, tuple[int, ...]]:
    L, d, r, H, Dh = spec.num_layers, spec.hidden_size, spec.rank, spec.num_heads, spec.head_dim
    shapes = {
        "wq_a": (L, r, d),
        "q_norm": (L, r),
        "wq_b": (L, H * Dh, r),
        "weights_proj": (L, H, d),
        "weights_proj_bias": (L, H),
        "layer_bias": (L,),
    }
    if spec.q_bias:
        shapes["wq_b_bias"] = (L, H * Dh)
    return shapes


def load_indexer(
    path: str | os.PathLike,
    expected: IndexerSpec | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> NeuralMemoryIndexer:
    """Load and validate a checkpoint against the spec the running backbone implies (None: check
    the file on its own, without a backbone).

    Every problem (missing file, not safetensors, foreign metadata, spec mismatch, missing or
    extra tensor, wrong shape or dtype, NaN or infinite weights) raises `IndexerCheckpointError`
    naming the field and the path.
    """
    from safetensors import safe_open

    p = Path(path)
    meta = read_metadata(p)
    spec = _spec_from_meta(p, meta)
    if expected is not None:
        check_spec(p, expected, spec)
    shapes = expected_shapes(spec)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt") as f:
            present = set(f.keys())
            for name in shapes:
                if name not in present:
                    raise _err(p, f"tensor '{name}' is missing", field=name)
            extra = sorted(present - set(shapes))
            if extra:
                raise _err(p, f"unexpected tensor {_show(extra[0])}", field=extra[0])
            for name, shape in shapes.items():
                t = f.get_tensor(name)
                if tuple(t.shape) != shape:
                    raise _err(
                        p, f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}", field=name
                    )
                if not t.is_floating_point():
                    raise _err(p, f"tensor '{name}' has dtype {t.dtype}, expected a float type", field=name)
                stored, t = t.dtype, t.to(dtype)
                finite = torch.isfinite(t)
                if not bool(finite.all()):
                    n_bad = int(finite.numel() - finite.sum())
                    as_dtype = "" if stored == dtype else f" as {dtype}"
                    raise _err(p, f"tensor '{name}' has {n_bad} NaN or infinite values{as_dtype}", field=name)
                tensors[name] = t
    except IndexerCheckpointError:
        raise
    except Exception as e:
        raise _err(p, f"could not read tensors ({type(e).__name__}: {e})", field="format") from None
    model = NeuralMemoryIndexer(spec, dtype=dtype, device=device)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(model, name).copy_(t.to(device=device, dtype=dtype))
    return model


__all__ = [
    "CHECKED_FIELDS",
    "FORMAT_VERSION",
    "IndexerCheckpointError",
    "architecture_fields",
    "check_spec",
    "config_hash",
    "load_indexer",
    "model_id_from_path",
    "read_metadata",
    "save_indexer",
    "spec_from_hf_config",
]
