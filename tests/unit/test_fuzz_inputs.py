"""Fuzz of the inputs that reach our code from outside: per-request overrides
(`custom_params["lsa"]`), preset YAML files through the launcher, and indexer checkpoints.

Each invalid input must raise the one error type of its layer (LSAConfigError, exit code 2 with
one stderr line, IndexerCheckpointError) with a message that names the offending field; each
valid one must be taken exactly as given. The expected outcome comes from the rules in
docs/configuration.md, written out here independently of the code under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lsa_sglang import launch_server as ls
from lsa_sglang.config import (
    KERNELS, LATER_WINDOWS, MAX_COUNT, MAX_SEED, POLICIES, LSAConfig, LSAConfigError, nest_preset, read_preset,
    show_key,
)
from lsa_sglang.indexer.checkpoint import (
    CHECKED_FIELDS,
    IndexerCheckpointError,
    load_indexer,
    read_metadata,
    save_indexer,
    spec_from_hf_config,
)
from lsa_sglang.indexer.model import IndexerSpec, NeuralMemoryIndexer
from lsa_sglang.plugin import OVERRIDABLE, parse_overrides

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
SMALL = settings(FUZZ, max_examples=60)

# -- value strategies ---------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.integers(-(2**200), 2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-0.5, 1.5),
    st.text(max_size=12),
    st.sampled_from(["max", "mean", "indexer", "recency", "quest", "auto", "torch", "64", "true", "x" * 5000]),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
# Values likely to be valid for some field, so the valid side is explored as well.
plausible = st.one_of(
    st.booleans(),
    st.integers(0, 40),
    st.sampled_from([8, 16, 32, 64, 128, 4096, 65536, MAX_COUNT, MAX_SEED]),
    st.floats(0.01, 0.99),
    st.sampled_from(POLICIES + KERNELS + ("max", "mean")),
    st.lists(st.integers(0, 40), min_size=1, max_size=4),
    st.none(),
)
values = st.one_of(plausible, plausible, junk)
odd_keys = st.one_of(
    st.text(max_size=10),
    st.integers(),
    st.none(),
    st.booleans(),
    st.tuples(st.integers(), st.integers()),
    st.sampled_from(["sglang", "chunksize", "Policy", "a\nb", "it's", "é" * 3, "k" * 500]),
)


# -- the rules, written out ---------------------------------------------------------------------
def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in(v, choices) -> bool:
    return isinstance(v, str) and v in choices


RULES = {
    "enabled": lambda v: isinstance(v, bool),
    "chunk_size": lambda v: _int(v) and 8 <= v <= 4096 and v & (v - 1) == 0,
    "tau": lambda v: _int(v) and 1 <= v <= 65536,
    "threshold": lambda v: _finite(v) and 0 < v < 1,
    "ensemble": lambda v: _in(v, ("max", "mean")),
    "target_layers": lambda v: v is None
    or (
        isinstance(v, (list, tuple))
        and len(v) > 0
        and all(_int(x) and 0 <= x <= MAX_COUNT for x in v)
        and len(set(v)) == len(v)
    ),
    "sink_chunks": lambda v: _int(v) and 0 <= v <= MAX_COUNT,
    "recent_tokens": lambda v: _int(v) and 0 <= v <= MAX_COUNT,
    "chunks_per_page": lambda v: _int(v) and 1 <= v <= MAX_COUNT,
    "page_budget": lambda v: _int(v) and 1 <= v <= MAX_COUNT,
    "min_pages": lambda v: _int(v) and 0 <= v <= MAX_COUNT,
    "budget_fraction": lambda v: v is None or (_finite(v) and 0 < v <= 1),
    "host_pool_gb": lambda v: _finite(v) and 0 < v <= 2**20,
    "indexer_checkpoint": lambda v: v is None or (isinstance(v, str) and v != "" and "\0" not in v),
    "policy": lambda v: _in(v, POLICIES),
    "attention_rows": lambda v: _int(v) and 1 <= v <= 64,
    "attention_spill": lambda v: _int(v) and 0 <= v <= MAX_COUNT,  # and <= chunk_size: config_offenders
    "attention_first_layer": lambda v: _int(v) and 0 <= v <= MAX_COUNT,  # and < the model's layers: the launcher
    "attention_heads": lambda v: v is None or (
        isinstance(v, list) and len(v) > 0
        and all(isinstance(h, list) and len(h) == 2 and all(_int(x) and 0 <= x <= MAX_COUNT for x in h) for h in v)
        and len({tuple(h) for h in v}) == len(v)),  # and inside the model: the launcher
    "attention_later": lambda v: _in(v, LATER_WINDOWS),
    "swap_limit": lambda v: v is None or (_int(v) and 0 <= v <= MAX_COUNT),
    "reselect": lambda v: _in(v, ("off", "quest")),
    "reselect_after": lambda v: _int(v) and 0 <= v <= MAX_COUNT,
    "release_copied": lambda v: _int(v) and 0 <= v <= MAX_COUNT,  # and <= chunk_size: config_offenders
    "copy_siblings": lambda v: _int(v) and 0 <= v <= MAX_COUNT,  # and <= chunk_size, with release_copied: config_offenders
    "needle_fallback": lambda v: isinstance(v, bool),
    "kernel": lambda v: _in(v, KERNELS),
    "seed": lambda v: _int(v) and 0 <= v <= MAX_SEED,
    "poison_released": lambda v: isinstance(v, bool),
}


def test_rules_cover_every_field():
    assert set(RULES) == set(LSAConfig.field_names())


def config_offenders(data: dict, base: dict | None = None) -> set:
    """Keys of `data` the rules reject (empty: the config is valid)."""
    known = set(LSAConfig.field_names())
    unknown = {k for k in data if k not in known}
    if unknown:
        return unknown
    bad = {k for k, v in data.items() if not RULES[k](v)}
    # cross-field rules, among values each valid alone (the config may report them first)
    merged = {**(base or {}), **{k: v for k, v in data.items() if k not in bad}}
    if merged.get("min_pages", 0) > merged.get("page_budget", 16):
        bad |= {k for k in ("min_pages", "page_budget") if k in data} or {"min_pages"}
    if merged.get("attention_spill", 0) > merged.get("chunk_size", 64):
        bad.add("attention_spill")
    if merged.get("release_copied", 0) > merged.get("chunk_size", 64):
        bad.add("release_copied")
    if merged.get("copy_siblings", 0) > merged.get("chunk_size", 64) or (
            merged.get("copy_siblings", 0) and not merged.get("release_copied", 0)):
        bad.add("copy_siblings")
    if not bad and merged.get("enabled", True) is True:
        # a field given where it does nothing: its policy or prerequisite is off
        policy = merged.get("policy", "attention")
        reselects = policy == "attention" and merged.get("reselect", "off") == "quest"
        acts = {
            **{k: policy == "attention" for k in ("attention_rows", "attention_spill",
                                                  "attention_first_layer", "attention_heads", "attention_later",
                                                  "reselect")},
            **{k: reselects for k in ("reselect_after", "release_copied")},
            "copy_siblings": reselects and merged.get("release_copied", 0) > 0,
            "needle_fallback": policy == "indexer",
        }
        default = LSAConfig()
        bad |= {k for k in data if k in acts and not acts[k] and data[k] != getattr(default, k)}
    return bad


def names_one_of(message: str, keys) -> bool:
    return any(f"'{show_key(k)}'" in message for k in keys)


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) < 600


# -- 1. per-request overrides -------------------------------------------------------------------
servers = st.builds(
    lambda budget, frac: LSAConfig(page_budget=budget, min_pages=int(budget * frac)),
    st.integers(1, 40),
    st.floats(0, 1),
)
override_keys = st.one_of(*[st.sampled_from(OVERRIDABLE)] * 4, odd_keys)


@FUZZ
@given(over=st.dictionaries(override_keys, values, max_size=4), server=servers)
def test_override_fuzz(over, server):
    base = {"page_budget": server.page_budget, "min_pages": server.min_pages}
    unknown = {k for k in over if k not in OVERRIDABLE}
    offenders = unknown or config_offenders(over, base)
    if not offenders:
        assert parse_overrides({"lsa": over}, server) == over
        assert server.replace(**over)  # what the server then applies
        return
    with pytest.raises(LSAConfigError) as e:
        parse_overrides({"lsa": over}, server)
    msg = str(e.value)
    assert names_one_of(msg, offenders), (over, msg)
    assert msg.startswith("lsa request override '") and one_line(msg)


@FUZZ
@given(params=st.one_of(junk, st.builds(lambda v: {"lsa": v}, junk)))
def test_override_container_fuzz(params):
    """Whatever sits where the mapping should be: only a mapping under 'lsa' is read."""
    if not isinstance(params, dict) or "lsa" not in params:
        assert parse_overrides(params) == {}
        return
    if isinstance(params["lsa"], dict):
        return  # covered above
    with pytest.raises(LSAConfigError, match=r"^lsa request override 'lsa': expected a mapping"):
        parse_overrides(params)
    assert parse_overrides({"other": params}) == {}


@pytest.mark.parametrize(
    "over,key,text",
    [
        ({"page_budget": True}, "page_budget", "integer"),
        ({"page_budget": 10**30}, "page_budget", "[1, 2147483647]"),
        ({"threshold": float("nan")}, "threshold", "between 0 and 1"),
        ({"threshold": float("inf")}, "threshold", "between 0 and 1"),
        ({"threshold": "0.5"}, "threshold", "number"),
        ({"enabled": 1}, "enabled", "true or false"),
        ({"policy": "x" * 100_000}, "policy", "one of"),
        ({"policy": {"nested": ["junk"]}}, "policy", "one of"),
        ({"tau": 8}, "tau", "not overridable"),
        ({1: 2, "x": 3}, "1", "not overridable"),  # mixed key types
        ({"min_pages": 17}, "min_pages", "<= page_budget (16)"),
    ],
)
def test_override_examples(over, key, text):
    with pytest.raises(LSAConfigError) as e:
        parse_overrides({"lsa": over})
    msg = str(e.value)
    assert f"'{key}'" in msg and text in msg and one_line(msg), msg


def test_override_budget_in_tokens_uses_the_server_chunk_size():
    server = LSAConfig(chunk_size=16, page_budget=36)
    assert parse_overrides({"lsa": {"budget_tokens": 1024, "policy": "quest"}}, server) == {"policy": "quest", "page_budget": 64}
    assert parse_overrides({"lsa": {"budget_tokens": 1024}}) == {"page_budget": 16}  # default chunk 64
    with pytest.raises(LSAConfigError, match=r"^lsa request override 'budget_tokens': .*multiple .*\(16\), got 1000$"):
        parse_overrides({"lsa": {"budget_tokens": 1000}}, server)
    with pytest.raises(LSAConfigError, match=r"^lsa request override 'budget_tokens': expected either"):
        parse_overrides({"lsa": {"budget_tokens": 1024, "page_budget": 4}}, server)


def test_override_checked_against_the_server_config():
    """min_pages is held against the budget the request gets, not the default budget."""
    server = LSAConfig(page_budget=32, min_pages=4)
    assert parse_overrides({"lsa": {"min_pages": 20}}, server) == {"min_pages": 20}
    with pytest.raises(LSAConfigError, match=r"^lsa request override 'page_budget': .*min_pages \(4\), got 2$"):
        parse_overrides({"lsa": {"page_budget": 2}}, server)


# -- 2. preset YAML through the launcher --------------------------------------------------------
LAYERS = 30


@contextlib.contextmanager
def preset_dir():
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "model").mkdir()
        (d / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS}))
        yield d


def launch(d: Path, preset_text: str | bytes, *extra: str) -> tuple[int | None, list[str], list[str], LSAConfig | None]:
    """prepare_argv on a preset file: (exit code or None, stderr lines, argv, config)."""
    p = d / "preset.yaml"
    p.write_bytes(preset_text if isinstance(preset_text, bytes) else preset_text.encode())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            argv, config = ls.prepare_argv(["--model-path", str(d / "model"), "--lsa-config", str(p), *extra])
        except SystemExit as e:
            return e.code, err.getvalue().splitlines(), [], None
    return None, err.getvalue().splitlines(), argv, config


field_keys = st.one_of(*[st.sampled_from(LSAConfig.field_names())] * 6,
                       odd_keys.filter(lambda k: k not in ("sglang", "experimental")))


def _yaml_safe(v) -> bool:
    try:
        yaml.safe_dump(v)
        return True
    except yaml.YAMLError:
        return False


@FUZZ
@given(data=st.dictionaries(field_keys, values, max_size=4))
def test_preset_fuzz(data):
    assume(_yaml_safe(data))
    text = yaml.safe_dump(nest_preset(data))  # the experimental fields under `experimental:`
    try:
        loaded = yaml.safe_load(text)  # what the launcher reads
        data = {**{k: v for k, v in loaded.items() if k != "experimental"}, **loaded.get("experimental", {})}
    except yaml.YAMLError:  # e.g. a sequence as a key: written, but not read back
        with preset_dir() as d:
            code, lines, _, _ = launch(d, text)
        assert code == 2 and len(lines) == 1 and "is not valid YAML: line " in lines[0], lines
        return
    offenders = config_offenders(data)
    tl = data.get("target_layers")
    if not offenders and tl and max(tl) >= LAYERS:
        offenders = {"target_layers"}  # the model has 30 layers
    if not offenders and data.get("indexer_checkpoint"):
        offenders = {"indexer_checkpoint"}  # no such checkpoint file
    with preset_dir() as d:
        code, lines, argv, config = launch(d, text)
    if offenders:
        assert code == 2 and len(lines) == 1, (data, lines)
        assert lines[0].startswith("lsa_sglang.launch_server: error: lsa config field '")
        assert names_one_of(lines[0], offenders), (data, lines)
        return
    assert code is None, (data, lines)
    assert len(lines) == 1 and "127.0.0.1 (loopback only)" in lines[0], lines
    expected = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
    assert {k: getattr(config, k) for k in expected} == expected
    assert LSAConfig.from_json(config.to_json()) == config
    assert ls.flag_value(argv, "--page-size") == str(config.chunk_size)


@SMALL
@given(doc=junk.filter(lambda v: not isinstance(v, dict)))
def test_preset_that_is_not_a_mapping(doc):
    assume(doc is not None and _yaml_safe(doc))
    with preset_dir() as d:
        code, lines, _, _ = launch(d, yaml.safe_dump(doc))
    assert code == 2 and len(lines) == 1 and "must hold a mapping of field: value" in lines[0], lines


@SMALL
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_preset_random_bytes(raw):
    """Bytes that are not YAML, not UTF-8 or not a mapping: one line, exit 2; or a valid preset."""
    with preset_dir() as d:
        code, lines, _, config = launch(d, raw)
    if code is None:
        assert isinstance(config, LSAConfig)
    else:
        assert code == 2 and len(lines) == 1 and lines[0].startswith("lsa_sglang.launch_server: error: lsa config")


@pytest.mark.parametrize(
    "text,field",
    [
        (b"\xff\xfe binary", "cannot be read as UTF-8"),
        (b"chunk_size: [1, 2\n", "not valid YAML: line 2"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"1: 2\nfoo: 3\n", "'1': unknown field"),
        (b"host_pool_gb: .inf\n", "'host_pool_gb'"),
        (b"seed: 18446744073709551615\n", "'seed'"),
        (b"recent_tokens: 100000000000000000000\n", "'recent_tokens'"),
        (b"indexer_checkpoint: ''\n", "'indexer_checkpoint'"),
        (b'indexer_checkpoint: "a\\0b"\n', "'indexer_checkpoint'"),
        (b"sglang: 0\n", "'sglang'"),
        (b"sglang: [dtype]\n", "'sglang'"),
        (b"sglang: {max_total_tokens: [1, 2]}\n", "'sglang.max_total_tokens'"),
        (b"sglang: {dtype: {a: 1}}\n", "'sglang.dtype'"),
        (b"sglang: {--dtype: float32}\n", "'sglang.--dtype'"),
        (b"sglang: {1: 2}\n", "'sglang.1'"),
        (b"sglang: {max_total_tokens: .nan}\n", "'sglang.max_total_tokens'"),
        (b"sglang: {not_a_flag: 1}\n", "'sglang.not_a_flag': --not-a-flag is not an SGLang server flag"),
        (b"sglang: {max_total_tokens: lots}\n", "'sglang.max_total_tokens': argument --max-total-tokens"),
        (b"sglang: {max_total_tokens: true}\n", "'sglang.max_total_tokens': argument --max-total-tokens"),
        (b"sglang: {dtype: float99}\n", "'sglang.dtype': argument --dtype: invalid choice"),
        (b"sglang: {disable_cuda_graph: sometimes}\n", "'sglang.disable_cuda_graph': --disable-cuda-graph is a switch"),
        (b"sglang: {lsa_config: x.yaml}\n", "'sglang.lsa_config'"),
    ],
)
def test_preset_examples(text, field):
    with preset_dir() as d:
        code, lines, _, _ = launch(d, text)
    assert code == 2 and len(lines) == 1 and field in lines[0], lines


sglang_keys = st.one_of(
    st.sampled_from(["dtype", "max_total_tokens", "context_length", "disable_cuda_graph", "mem_fraction_static",
                     "max_running_requests", "log_level", "host"]),
    odd_keys.filter(lambda k: not isinstance(k, tuple)),  # a sequence key is not read back
)


@SMALL
@given(sg=st.dictionaries(sglang_keys, values, min_size=1, max_size=3))
def test_preset_sglang_map_fuzz(sg):
    """Every entry reaches SGLang as a flag it accepts, or the launcher names the entry."""
    assume(_yaml_safe({"sglang": sg}))
    text = yaml.safe_dump({"sglang": sg})
    sg = yaml.safe_load(text)["sglang"]
    with preset_dir() as d:
        code, lines, argv, _ = launch(d, text)
    if code is not None:
        assert code == 2 and len(lines) == 1, lines
        assert any(f"'sglang.{show_key(k)}'" in lines[0] for k in sg) or "'sglang'" in lines[0], lines
        return
    for key, value in sg.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            assert flag in argv
        elif value is not None and value is not False:
            assert ls.flag_value(argv, flag) == str(value), (sg, argv)


@SMALL
@given(rel=st.lists(st.text("abcXYZ019._- ", min_size=1, max_size=8), min_size=1, max_size=3))
def test_relative_checkpoint_path_resolves_against_the_yaml(rel, tmp_path_factory):
    rel_path = "/".join(rel)
    d = tmp_path_factory.mktemp("preset")
    (d / "p.yaml").write_text(yaml.safe_dump({"indexer_checkpoint": rel_path}))
    old = os.getcwd()
    os.chdir(tmp_path_factory.getbasetemp())  # elsewhere: the CWD must not matter
    try:
        config, _ = read_preset(d / "p.yaml")
    finally:
        os.chdir(old)
    assert config.indexer_checkpoint == str((d / rel_path).resolve())
    assert LSAConfig.from_json(config.to_json()) == config


# -- 3. indexer checkpoints ---------------------------------------------------------------------
D, H, HK, DH = 16, 4, 2, 4
HF = {"model_type": "llama", "hidden_size": D, "num_hidden_layers": 4, "num_attention_heads": H,
      "num_key_value_heads": HK, "rope_theta": 10000.0, "vocab_size": 64, "rms_norm_eps": 1e-5}


def hf_spec(**hf_changes) -> IndexerSpec:
    return spec_from_hf_config({**HF, **hf_changes}, "tiny", (1, 3), chunk_size=16, tau=32, threshold=0.5)


SPEC = hf_spec()


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    model = NeuralMemoryIndexer(dataclasses.replace(SPEC, q_bias=True))
    path = tmp_path_factory.mktemp("ckpt") / "idx.safetensors"
    save_indexer(model, path, training={"kind": "fuzz"})
    load_indexer(path, SPEC)  # the intact file loads
    return path.read_bytes()


LOADED: list[NeuralMemoryIndexer] = []


def load_bytes(raw: bytes) -> IndexerCheckpointError | None:
    """Load a checkpoint made of `raw`: the error, or None when it loaded (the model is then
    LOADED[-1]). Any other exception fails the test."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.safetensors"
        p.write_bytes(raw)
        try:
            model = load_indexer(p, SPEC)
        except IndexerCheckpointError as e:
            assert str(p) in str(e) and one_line(str(e)), str(e)
            return e
    LOADED[:] = [model]
    for name, t in model.state_dict().items():
        assert bool(torch.isfinite(t).all()), name
    return None


@FUZZ
@given(data=st.data())
def test_truncated_checkpoint(ckpt_bytes, data):
    cut = data.draw(st.integers(0, len(ckpt_bytes) - 1))
    e = load_bytes(ckpt_bytes[:cut])
    assert e is not None and e.field == "format", (cut, e)


@FUZZ
@given(data=st.data())
def test_corrupted_checkpoint(ckpt_bytes, data):
    """Random bytes overwritten anywhere: the file loads (data bytes that stay finite) or fails
    with IndexerCheckpointError, never with another exception."""
    raw = bytearray(ckpt_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    load_bytes(bytes(raw))


@SMALL
@given(raw=st.binary(max_size=300))
def test_random_bytes_checkpoint(raw):
    e = load_bytes(raw)
    assert e is not None and e.field == "format", e


def write_ckpt(tensors: dict, meta: dict | None = None, metadata: dict | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.safetensors"
        if metadata is None:
            metadata = {"lsa_indexer": json.dumps(meta)}
        save_file(tensors, str(p), metadata=metadata)
        return p.read_bytes()


def good_parts():
    model = NeuralMemoryIndexer(SPEC)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"format": "lsa-indexer", "format_version": 1, "spec": SPEC.to_dict(), "training": {}}
    return tensors, meta


TENSORS = sorted(good_parts()[0])
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@SMALL
@given(name=st.sampled_from(TENSORS), shape=shapes)
def test_wrong_tensor_shape(name, shape):
    tensors, meta = good_parts()
    assume(shape != tuple(tensors[name].shape))
    tensors[name] = torch.zeros(shape)
    e = load_bytes(write_ckpt(tensors, meta))
    assert e is not None and e.field == name and "shape" in str(e), e


@SMALL
@given(
    name=st.sampled_from(TENSORS),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]),
)
def test_integer_tensor(name, dtype):
    tensors, meta = good_parts()
    tensors[name] = tensors[name].to(dtype)
    e = load_bytes(write_ckpt(tensors, meta))
    assert e is not None and e.field == name and "dtype" in str(e), e


@FUZZ
@given(
    name=st.sampled_from(TENSORS),
    data=st.data(),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_non_finite_weights(name, data, value, dtype):
    tensors, meta = good_parts()
    t = tensors[name].to(dtype)
    flat = t.view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = value
    tensors[name] = t
    e = load_bytes(write_ckpt(tensors, meta))
    assert e is not None and e.field == name and "NaN or infinite" in str(e), e


def test_float64_weight_that_overflows_float32():
    tensors, meta = good_parts()
    tensors["layer_bias"] = torch.tensor([0.0, 1e300], dtype=torch.float64)
    e = load_bytes(write_ckpt(tensors, meta))
    assert e is not None and e.field == "layer_bias" and "as torch.float32" in str(e), e


# A checkpoint for another model config: each change of the backbone shows in a checked field.
OTHER_MODELS = {
    "hidden_size": {"hidden_size": 32},
    "num_heads": {"num_attention_heads": 8, "hidden_size": 32},
    "num_kv_heads": {"num_key_value_heads": 1},
    "rope_theta": {"rope_theta": 5e5},
    "config_hash": {"vocab_size": 65},
    "head_dim": {"head_dim": 8},
}


@pytest.mark.parametrize("change", sorted(OTHER_MODELS))
def test_checkpoint_for_another_model(change, tmp_path):
    other = hf_spec(**OTHER_MODELS[change])
    path = tmp_path / "other.safetensors"
    save_indexer(NeuralMemoryIndexer(other), path)
    with pytest.raises(IndexerCheckpointError) as e:
        load_indexer(path, SPEC)
    assert e.value.field in CHECKED_FIELDS and f"'{e.value.field}'" in str(e.value)
    assert getattr(other, e.value.field) != getattr(SPEC, e.value.field)
    assert one_line(str(e.value))


@pytest.mark.parametrize(
    "field,expected",
    [("model_id", "other"), ("target_layers", (0, 3)), ("chunk_size", 32)],
)
def test_checkpoint_for_another_server_config(field, expected, tmp_path):
    path = tmp_path / "c.safetensors"
    save_indexer(NeuralMemoryIndexer(SPEC), path)
    with pytest.raises(IndexerCheckpointError) as e:
        load_indexer(path, dataclasses.replace(SPEC, **{field: expected}))
    assert e.value.field == field


SPEC_FIELDS = sorted(SPEC.to_dict())


# Spec fields a checkpoint may set freely (the server's own values apply at run time), and the
# values each takes; every other field must equal the backbone's (or decides the tensor shapes).
FREE_SPEC_FIELDS = {
    "tau": lambda v: _int(v) and v >= 1,
    "threshold": lambda v: _finite(v) and 0 < v < 1,
    "rms_eps": lambda v: _finite(v) and v > 0,
    "prenormed": lambda v: isinstance(v, bool),
}


@FUZZ
@given(field=st.sampled_from(SPEC_FIELDS), value=values)
def test_spec_metadata_fuzz(field, value):
    """Junk in one field of the stored spec: IndexerCheckpointError naming that field (or the
    tensor whose shape it decides), or a load that takes the value as stored."""
    tensors, meta = good_parts()
    meta["spec"][field] = value
    e = load_bytes(write_ckpt(tensors, meta))
    if e is None:
        stored = getattr(LOADED[-1].spec, field)
        if field in FREE_SPEC_FIELDS:
            assert FREE_SPEC_FIELDS[field](value) and stored == value, (field, value)
        else:  # a backbone-facing field: only the value the backbone implies loads
            assert json.dumps(value) == json.dumps(SPEC.to_dict()[field]), (field, value)
        return
    assert e.field in TENSORS or field in str(e), (field, value, str(e))
@pytest.mark.parametrize(
    "field,value",
    [
        ("rms_eps", float("nan")),
        ("rms_eps", "tiny"),
        ("rms_eps", -1.0),
        ("q_bias", "yes"),
        ("prenormed", 1),
        ("target_layers", "13"),
        ("target_layers", {"1": 3}),
        ("target_layers", [1.5, 3]),
        ("rotary_dim", 4.0),
        ("rope_theta", float("inf")),
        ("model_id", 7),
        ("threshold", "0.5"),
    ],
)
def test_spec_metadata_examples(field, value):
    tensors, meta = good_parts()
    meta["spec"][field] = value
    e = load_bytes(write_ckpt(tensors, meta))
    assert e is not None and e.field == field and f"'{field}'" in str(e), e


@pytest.mark.parametrize(
    "metadata,text",
    [
        ({}, "no 'lsa_indexer' metadata"),
        ({"lsa_indexer": "{not json"}, "not valid JSON"),
        ({"lsa_indexer": "[]"}, "format is not 'lsa-indexer'"),
        ({"lsa_indexer": json.dumps({"format": "lsa-indexer", "format_version": 1})}, "no 'spec' mapping"),
        ({"lsa_indexer": json.dumps({"format": "lsa-indexer", "format_version": "1" * 1000, "spec": {}})},
         "format_version"),
    ],
)
def test_missing_or_foreign_metadata(metadata, text):
    tensors, _ = good_parts()
    e = load_bytes(write_ckpt(tensors, metadata=metadata))
    assert e is not None and text in str(e), e


def test_empty_and_missing_files(tmp_path):
    assert load_bytes(b"").field == "format"
    with pytest.raises(IndexerCheckpointError) as e:
        read_metadata(tmp_path / "missing.safetensors")
    assert e.value.field == "path"
