"""LSAConfig: every knob of Lookahead Sparse Attention in one frozen, validated object.

Loaded from YAML (`--lsa-config`), checked field by field at server start so a bad value
fails once, early, with a message that names the field and what it accepts. Handed to
SGLang's scheduler processes as JSON through the `LSA_SGLANG_CONFIG` environment variable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "LSA_SGLANG_CONFIG"

ENSEMBLES = ("max", "mean")
POLICIES = ("indexer", "recency", "random", "quest", "attention")
KERNELS = ("auto", "torch", "triton", "flashinfer")
LATER_WINDOWS = ("indexer", "carry")  # how the `attention` policy picks after window 0
SELECTION_FIELDS = ("threshold", "sink_chunks", "chunks_per_page", "page_budget", "min_pages", "policy")
RESELECT = ("off", "quest")  # `attention` policy: re-selection on evidence after every decode step

# Upper bounds: beyond them a count overflows the int64 tensors it ends up in (the selector,
# the page layout) or a seed the torch generator (which also adds the chunk count to it).
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_HOST_POOL_GB = float(2**20)  # 1 PiB
ATTENTION_MAX_ROWS = 64  # prompt rows whose queries the prefill keeps for the `attention` policy
_SHOW_LIMIT = 60
_FLAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class LSAConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def check_selection(values: dict[str, Any], where: str) -> None:
    """The rules of the selection fields LSAConfig and `indexer.selector.SelectionParams` share
    (`recent_chunks` only where given): raises LSAConfigError "{where} 'name': expected ..."."""

    def bad(name: str, allowed: str) -> LSAConfigError:
        return LSAConfigError(f"{where} '{name}': expected {allowed}, got {show(values[name])}")

    if not _is_finite(values["threshold"]) or not 0.0 < values["threshold"] < 1.0:
        raise bad("threshold", "a number strictly between 0 and 1")
    counts = (("sink_chunks", 0), ("recent_chunks", 0), ("chunks_per_page", 1), ("page_budget", 1), ("min_pages", 0))
    for name, lo in counts:
        v = values.get(name, 0)
        if not _is_int(v) or not lo <= v <= MAX_COUNT:
            raise bad(name, f"an integer in [{lo}, {MAX_COUNT}]")
    if values["min_pages"] > values["page_budget"]:
        raise LSAConfigError(
            f"{where} 'min_pages': expected an integer <= page_budget ({values['page_budget']}), "
            f"got {values['min_pages']!r}"
        )
    if values["policy"] not in POLICIES:
        raise bad("policy", "one of " + ", ".join(POLICIES))


def show(value: Any, limit: int = _SHOW_LIMIT) -> str:
    """`repr(value)` on one line, cut to `limit` characters: error messages echo user input."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_key(key: Any) -> str:
    """A mapping key as it appears in quotes in a message ('policy', 'a\\nb', '1')."""
    text = key if isinstance(key, str) else repr(key)
    text = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def budget_from_tokens(data: dict[str, Any], tokens_per_page: int, where: str) -> dict[str, Any]:
    """`budget_tokens` (device tokens for the selected chunks) given instead of `page_budget`: the
    same budget in pages, so a budget keeps its device bytes across chunk sizes. `where` starts
    the message ("lsa config field", "lsa request override")."""
    if "budget_tokens" not in data:
        return data
    data = dict(data)
    tokens = data.pop("budget_tokens")
    if "page_budget" in data:
        raise LSAConfigError(f"{where} 'budget_tokens': expected either budget_tokens or page_budget, got both")
    if not _is_int(tokens) or tokens < tokens_per_page or tokens % tokens_per_page or tokens // tokens_per_page > MAX_COUNT:
        raise LSAConfigError(
            f"{where} 'budget_tokens': expected a positive multiple of chunk_size x chunks_per_page "
            f"({tokens_per_page}), got {show(tokens)}"
        )
    data["page_budget"] = tokens // tokens_per_page
    return data


def with_heads_tuples(data: dict[str, Any]) -> dict[str, Any]:
    """`attention_heads` as YAML or JSON gives it (a list of [layer, head] lists) in the tuples
    the config holds; any other value is left for the config's check to refuse."""
    heads = data.get("attention_heads")
    if isinstance(heads, list):
        data = {**data, "attention_heads": tuple(tuple(h) if isinstance(h, list) else h for h in heads)}
    return data


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
    budget_fraction: float | None = None  # the budget also grows to this share of a request's prompt (None: fixed)
    host_pool_gb: float = 4.0
    indexer_checkpoint: str | None = None
    policy: str = "attention"
    attention_rows: int = 16  # `attention` policy: last prompt tokens whose attention picks window 0
    attention_spill: int = 0  # `attention` policy: a chunk also counts the mass of the previous chunk's last tokens
    attention_first_layer: int = 0  # `attention` policy: window 0 reads the attention of this layer and the later ones
    attention_heads: tuple[tuple[int, int], ...] | None = None  # `attention` policy: window 0 from these (layer, head) only
    attention_later: str = "indexer"  # `attention` policy after window 0: the indexer, or carry window 0's ranking
    swap_limit: int | None = None  # later boundaries bring in at most this many pages not resident (None: any)
    reselect: str = "off"  # `attention` policy: swap one chunk in after a step that read it (key bounds)
    reselect_after: int = 0  # `reselect`: no swap while the answer has at most this many tokens
    release_copied: int = 0  # `reselect`: a chunk the answer copies (its last this many tokens) holds its page to the copy's end, then only what later steps read (0: off)
    copy_siblings: int = 0  # `release_copied`: a copy's other list items (where its last this many lead-in tokens recur) come in and hold (0: off)
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
                f"lsa config field '{name}': expected {allowed}, got {show(getattr(self, name))}"
            )

        def need_int(name: str, lo: int, hi: int = MAX_COUNT) -> None:
            v = getattr(self, name)
            if not _is_int(v) or v < lo or v > hi:
                raise bad(name, f"an integer in [{lo}, {hi}]")

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
        check_selection({f: getattr(self, f) for f in SELECTION_FIELDS}, "lsa config field")
        need_choice("ensemble", ENSEMBLES)
        if self.target_layers is not None:
            tl = self.target_layers
            if (
                not isinstance(tl, tuple)
                or not tl
                or not all(_is_int(x) and 0 <= x <= MAX_COUNT for x in tl)
                or len(set(tl)) != len(tl)
            ):
                raise bad("target_layers", f"null or a non-empty list of distinct layer indices in [0, {MAX_COUNT}]")
        need_int("recent_tokens", 0)
        if self.budget_fraction is not None and (
            not _is_finite(self.budget_fraction) or not 0.0 < self.budget_fraction <= 1.0
        ):
            raise bad("budget_fraction", "null or a number in (0, 1]")
        if not _is_finite(self.host_pool_gb) or not 0 < self.host_pool_gb <= MAX_HOST_POOL_GB:
            raise bad("host_pool_gb", f"a number of GiB in (0, {MAX_HOST_POOL_GB:.0f}]")
        ckpt = self.indexer_checkpoint
        if ckpt is not None and (not isinstance(ckpt, str) or not ckpt or "\0" in ckpt):
            raise bad("indexer_checkpoint", "null or a path to a checkpoint")
        need_int("attention_rows", 1, ATTENTION_MAX_ROWS)
        need_int("attention_spill", 0, self.chunk_size)
        need_int("attention_first_layer", 0)
        heads = self.attention_heads
        if heads is not None and (
            not isinstance(heads, tuple) or not heads
            or not all(isinstance(h, tuple) and len(h) == 2 and all(_is_int(x) and 0 <= x <= MAX_COUNT for x in h)
                       for h in heads)
            or len(set(heads)) != len(heads)
        ):
            given = [list(h) if isinstance(h, tuple) else h for h in heads] if isinstance(heads, tuple) else heads
            raise LSAConfigError(f"lsa config field 'attention_heads': expected null or a non-empty list of distinct "
                                 f"[layer, head] pairs of indices in [0, {MAX_COUNT}], got {show(given)}")
        need_choice("attention_later", LATER_WINDOWS)
        if self.swap_limit is not None:
            need_int("swap_limit", 0)
        need_choice("reselect", RESELECT)
        need_int("reselect_after", 0)
        need_int("release_copied", 0, self.chunk_size)
        need_int("copy_siblings", 0, self.chunk_size)
        if self.copy_siblings and not self.release_copied:
            raise bad("copy_siblings", "0 when release_copied is 0 (the copies it follows are those release_copied finds)")
        need_bool("needle_fallback")
        need_choice("kernel", KERNELS)
        need_int("seed", 0, MAX_SEED)
        need_bool("poison_released")

    def model_error(self, num_layers: int, num_heads: int | None = None) -> str | None:
        """Why `attention_first_layer` or `attention_heads` does not fit a model of `num_layers`
        layers of `num_heads` query heads (None: they do; heads unchecked when `num_heads` is None);
        the caller names where the value came from."""
        if self.attention_first_layer >= num_layers:
            return (f"'attention_first_layer': expected a layer index in [0, {num_layers - 1}] "
                    f"for this model ({num_layers} layers), got {self.attention_first_layer}")
        for layer, head in self.attention_heads or ():
            if layer >= num_layers or (num_heads is not None and head >= num_heads):
                shape = f"{num_layers} layers" + ("" if num_heads is None else f" of {num_heads} heads")
                return (f"'attention_heads': expected [layer, head] pairs for this model ({shape}), "
                        f"got {[layer, head]}")
        return None

    def for_prompt(self, prompt_tokens: int) -> "LSAConfig":
        """What a request with a prompt of `prompt_tokens` tokens runs under: with
        `budget_fraction`, `page_budget` raised to that share of the prompt in whole pages
        (never lowered), so the device keeps the same share of a long prompt's KV as of a
        short one's."""
        if self.budget_fraction is None:
            return self
        pages = int(self.budget_fraction * prompt_tokens) // (self.chunk_size * self.chunks_per_page)
        return self if pages <= self.page_budget else self.replace(page_budget=min(pages, MAX_COUNT))

    # -- derived ------------------------------------------------------------------------
    @property
    def recent_chunks(self) -> int:
        """Chunks covered by the recency tail (rounded up)."""
        return -(-self.recent_tokens // self.chunk_size)

    @property
    def reselects(self) -> bool:
        """Re-selection on evidence is on (it needs the `attention` policy's window-0 scores)."""
        return self.enabled and self.reselect != "off" and self.policy == "attention"

    @property
    def reads_chunk_keys(self) -> bool:
        """Some selection reads the chunks' keys at the target layers (the indexer's scores, or
        the `quest` policy's bound): not the `attention` policy when later windows carry."""
        if not self.enabled or self.policy in ("recency", "random"):
            return False
        return self.policy != "attention" or self.attention_later == "indexer"

    @property
    def host_pool_bytes(self) -> int:
        return int(self.host_pool_gb * (1 << 30))

    # -- IO ---------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base_dir: Path | None = None, *,
                  refuse_inert: bool = True) -> "LSAConfig":
        """The config `data` sets, the rest defaults. `refuse_inert`: a field `data` names that does
        nothing under the result is an error (off for a serialized config, which names them all)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LSAConfigError(f"lsa config must be a mapping of field: value, got {type(data).__name__}")
        unknown = [k for k in data if k not in cls.field_names() + ("budget_tokens",)]
        if unknown:
            raise LSAConfigError(
                f"lsa config field '{show_key(min(unknown, key=show_key))}': unknown field; known fields are "
                + ", ".join(cls.field_names() + ("budget_tokens",))
            )
        data = dict(data)
        if "budget_tokens" in data:  # the chunk size and page width it divides by, checked first
            rest = {k: v for k, v in data.items() if k not in ("budget_tokens", "page_budget", "min_pages")}
            page = cls.from_dict(rest, base_dir)
            data = budget_from_tokens(data, page.chunk_size * page.chunks_per_page, "lsa config field")
        if isinstance(data.get("target_layers"), list):
            data["target_layers"] = tuple(data["target_layers"])
        data = with_heads_tuples(data)
        ckpt = data.get("indexer_checkpoint")
        if isinstance(ckpt, str) and ckpt and "\0" not in ckpt and base_dir is not None and not os.path.isabs(ckpt):
            # Relative checkpoint paths are relative to the YAML file, not the CWD.
            data["indexer_checkpoint"] = str((base_dir / ckpt).resolve())
        config = cls(**data)
        inert = config.inert_error(data) if refuse_inert else None
        if inert:
            raise LSAConfigError("lsa config field " + inert)
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "LSAConfig":
        return read_preset(path)[0]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LSAConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LSAConfigError(f"lsa config is not valid JSON: {e}") from None
        return cls.from_dict(data, refuse_inert=False)

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

    def inert_error(self, given: Any) -> str | None:
        """Why a field in `given` (the names a user set) does nothing under this config: its
        policy or prerequisite is off (None: each one acts, is at its default, which turns it
        off or leaves it as it would be, or LSA is off altogether)."""
        if not self.enabled:
            return None
        defaults = LSAConfig.__dataclass_fields__
        for name in sorted(set(given) & set(_PREREQUISITES)):
            need, holds = _PREREQUISITES[name]
            if getattr(self, name) != defaults[name].default and not holds(self):
                return f"'{name}': does nothing unless {need}; set that or drop '{name}'"
        return None


def _attention(c: LSAConfig) -> bool:
    return c.policy == "attention"


# field -> (what it needs, as a message says it; the test): a field set where it does nothing
# is refused, so a preset says only what it runs
_PREREQUISITES: dict[str, tuple[str, Any]] = {
    **{name: ("policy is attention", _attention) for name in (
        "attention_rows", "attention_spill", "attention_first_layer", "attention_heads",
        "attention_later", "reselect")},
    **{name: ("reselect is quest (policy: attention)", lambda c: c.reselects) for name in (
        "reselect_after", "release_copied")},
    "copy_siblings": ("release_copied is above 0 (reselect: quest)", lambda c: c.reselects and c.release_copied > 0),
    "needle_fallback": ("policy is indexer", lambda c: c.policy == "indexer"),
}


# The fields a user sets; every other field is a selection rule or a test switch, which a preset
# lists under `experimental:` (per-request overrides and the JSON the launcher hands on are flat).
USER_FIELDS = ("enabled", "chunk_size", "tau", "sink_chunks", "recent_tokens", "page_budget", "budget_tokens",
               "host_pool_gb", "policy", "kernel", "indexer_checkpoint")
EXPERIMENTAL = "experimental"


def experimental_fields() -> tuple[str, ...]:
    return tuple(f for f in LSAConfig.field_names() if f not in USER_FIELDS)


def nest_preset(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat field: value map as a preset holds it: the experimental fields under `experimental:`."""
    inner = {k: v for k, v in flat.items() if k in experimental_fields()}
    top = {k: v for k, v in flat.items() if k not in inner}
    return {**top, EXPERIMENTAL: inner} if inner else top


def flatten_preset(data: dict[str, Any]) -> dict[str, Any]:
    """A preset's fields as one flat map. An experimental field at the top level, or a field users
    set under `experimental:`, is refused with where it belongs."""
    data = dict(data)
    inner = data.pop(EXPERIMENTAL, None)
    if inner is None:
        inner = {}
    if not isinstance(inner, dict):
        raise LSAConfigError(f"lsa config field '{EXPERIMENTAL}': expected a mapping of field: value, got {show(inner)}")
    exp = experimental_fields()
    misplaced = sorted(show_key(k) for k in data if k in exp)
    if misplaced:
        raise LSAConfigError(f"lsa config field '{misplaced[0]}': experimental; put it under '{EXPERIMENTAL}:'")
    for key in sorted(inner, key=show_key):
        if key in USER_FIELDS:
            raise LSAConfigError(f"lsa config field '{EXPERIMENTAL}.{key}': a field users set; put it at the top level")
        if key not in exp:
            raise LSAConfigError(f"lsa config field '{EXPERIMENTAL}.{show_key(key)}': unknown field; experimental "
                                 f"fields are " + ", ".join(exp))
    return {**data, **inner}


def read_preset(path: str | os.PathLike) -> tuple[LSAConfig, dict[str, Any]]:
    """A preset YAML: the fields users set, the others under `experimental:`, plus an optional
    `sglang:` map of default server flags."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LSAConfigError(f"lsa config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LSAConfigError(f"lsa config file {p} cannot be read as UTF-8 text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LSAConfigError(f"lsa config file {p} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise LSAConfigError(f"lsa config file {p} is not valid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LSAConfigError(
            f"lsa config file {p} must hold a mapping of field: value, got {type(data).__name__}"
        )
    sglang_defaults = data.pop("sglang", None)
    fields = flatten_preset(data)
    return LSAConfig.from_dict(fields, base_dir=p.parent.resolve()), _check_sglang_map(sglang_defaults)


def _yaml_problem(e: Exception) -> str:
    """One line: where and what (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(e).split())


def _check_sglang_map(value: Any) -> dict[str, Any]:
    """The preset's `sglang:` map: flag names (without dashes) to scalar values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LSAConfigError(
            f"lsa config field 'sglang': expected a mapping of sglang flag: value, got {show(value)}"
        )
    for key, v in value.items():
        if not isinstance(key, str) or not _FLAG_NAME.fullmatch(key):
            raise LSAConfigError(
                f"lsa config field 'sglang.{show_key(key)}': expected an sglang flag name such as "
                "max_total_tokens (letters, digits, '_' or '-', no leading dashes)"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise LSAConfigError(
                f"lsa config field 'sglang.{show_key(key)}': expected a finite number, got {show(v)}"
            )
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise LSAConfigError(
                f"lsa config field 'sglang.{show_key(key)}': expected a string, number, true/false or null, "
                f"got {show(v)}"
            )
    return dict(value)


__all__ = [
    "LSAConfig",
    "LSAConfigError",
    "ENV_VAR",
    "read_preset",
    "nest_preset",
    "flatten_preset",
    "USER_FIELDS",
    "ENSEMBLES",
    "POLICIES",
    "KERNELS",
    "MAX_COUNT",
    "MAX_SEED",
]
