"""LSAConfig: every knob of Lookahead Sparse Attention in one frozen, validated object.

Loaded from YAML (`--lsa-config`), checked field by field at server start so a bad value
fails once, early, with a message that names the field and what it accepts. Handed to
SGLang's scheduler processes as JSON through the `LSA_SGLANG_CONFIG` environment variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "LSA_SGLANG_CONFIG"

ENSEMBLES = ("max", "mean")
POLICIES = ("indexer", "recency", "random", "quest", "attention")
KERNELS = ("auto", "torch", "triton", "flashinfer")


class LSAConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class LSAConfig:
    """Lookahead Sparse Attention settings (names follow the paper).

    A chunk is `chunk_size` consecutive tokens (one KV page in SGLang's pool); every `tau`
    decode steps the indexer picks the resident set for the next window: chunks whose score
    exceeds `threshold`, at most `page_budget` pages of `chunks_per_page` chunks (densest
    first), never fewer than `min_pages`, plus the first `sink_chunks` chunks and the last
    `recent_tokens` tokens, which are always resident.
    """

    enabled: bool = True
    chunk_size: int = 64
    tau: int = 64
    threshold: float = 0.5
    ensemble: str = "max"
    target_layers: tuple[int, ...] | None = None  # None: chosen from the model depth
    sink_chunks: int = 1
    recent_tokens: int = 512
    chunks_per_page: int = 1
    page_budget: int = 16
    min_pages: int = 0
    host_pool_gb: float = 4.0
    indexer_checkpoint: str | None = None
    policy: str = "indexer"
    needle_fallback: bool = True
    kernel: str = "auto"
    seed: int = 0
    poison_released: bool = False  # test mode: released device cells are filled with NaN

    def __post_init__(self) -> None:
        self._check()

    # -- validation -----------------------------------------------------------------
    def _check(self) -> None:
        def bad(name: str, allowed: str) -> LSAConfigError:
            return LSAConfigError(
                f"lsa config field '{name}': expected {allowed}, got {getattr(self, name)!r}"
            )

        def need_int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise bad(name, f"an integer {rng}")

        def need_bool(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")

        def need_choice(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(choices))

        need_bool("enabled")
        cs = self.chunk_size
        if not _is_int(cs) or cs < 8 or cs > 4096 or cs & (cs - 1):
            raise bad("chunk_size", "a power of two in [8, 4096]")
        need_int("tau", 1, 65536)
        if not _is_number(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise bad("threshold", "a number strictly between 0 and 1")
        need_choice("ensemble", ENSEMBLES)
        if self.target_layers is not None:
            tl = self.target_layers
            if (
                not isinstance(tl, tuple)
                or not tl
                or not all(_is_int(x) and x >= 0 for x in tl)
                or len(set(tl)) != len(tl)
            ):
                raise bad("target_layers", "null or a non-empty list of distinct layer indices >= 0")
        need_int("sink_chunks", 0)
        need_int("recent_tokens", 0)
        need_int("chunks_per_page", 1)
        need_int("page_budget", 1)
        need_int("min_pages", 0)
        if self.min_pages > self.page_budget:
            raise LSAConfigError(
                f"lsa config field 'min_pages': expected an integer <= page_budget "
                f"({self.page_budget}), got {self.min_pages!r}"
            )
        if not _is_number(self.host_pool_gb) or not self.host_pool_gb > 0:
            raise bad("host_pool_gb", "a number of GiB > 0")
        if self.indexer_checkpoint is not None and not isinstance(self.indexer_checkpoint, str):
            raise bad("indexer_checkpoint", "null or a path to a checkpoint")
        need_choice("policy", POLICIES)
        need_bool("needle_fallback")
        need_choice("kernel", KERNELS)
        need_int("seed", 0)
        need_bool("poison_released")

    # -- derived ------------------------------------------------------------------------
    @property
    def recent_chunks(self) -> int:
        """Chunks covered by the recency tail (rounded up)."""
        return -(-self.recent_tokens // self.chunk_size)

    @property
    def host_pool_bytes(self) -> int:
        return int(self.host_pool_gb * (1 << 30))

    # -- IO ---------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base_dir: Path | None = None) -> "LSAConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LSAConfigError(f"lsa config must be a mapping of field: value, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise LSAConfigError(
                f"lsa config field '{unknown[0]}': unknown field; known fields are "
                + ", ".join(cls.field_names())
            )
        data = dict(data)
        if isinstance(data.get("target_layers"), list):
            data["target_layers"] = tuple(data["target_layers"])
        ckpt = data.get("indexer_checkpoint")
        if isinstance(ckpt, str) and base_dir is not None and not os.path.isabs(ckpt):
            # Relative checkpoint paths are relative to the YAML file, not the CWD.
            data["indexer_checkpoint"] = str((base_dir / ckpt).resolve())
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "LSAConfig":
        return read_preset(path)[0]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LSAConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_env(cls) -> "LSAConfig":
        """The config the launcher validated, or the defaults (also accepts a YAML path)."""
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        if raw.lstrip().startswith("{"):
            return cls.from_json(raw)
        return cls.from_yaml(raw)

    def replace(self, **changes: Any) -> "LSAConfig":
        return dataclasses.replace(self, **changes)


def read_preset(path: str | os.PathLike) -> tuple[LSAConfig, dict[str, Any]]:
    """A preset YAML: LSAConfig fields plus an optional `sglang:` map of default server flags."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LSAConfigError(f"lsa config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LSAConfigError(f"lsa config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LSAConfigError(f"lsa config file {p} must hold a mapping of field: value")
    sglang_defaults = data.pop("sglang", None) or {}
    if not isinstance(sglang_defaults, dict):
        raise LSAConfigError("lsa config field 'sglang': expected a mapping of sglang flag: value")
    return LSAConfig.from_dict(data, base_dir=p.parent.resolve()), sglang_defaults


__all__ = ["LSAConfig", "LSAConfigError", "ENV_VAR", "read_preset", "ENSEMBLES", "POLICIES", "KERNELS"]
