"""LSAConfig: every field rejects its bad values with one message naming the field."""

import json

import pytest

from lsa_sglang.config import ENV_VAR, LSAConfig, LSAConfigError, read_preset

BAD_VALUES = {
    "enabled": ["yes", 1, None],
    "chunk_size": [0, 7, 48, 8192, "64", 64.0, True],
    "tau": [0, -1, 1.5, "64", 70000],
    "threshold": [0, 1, 1.5, -0.1, "0.5", None, True, float("nan"), float("inf")],
    "ensemble": ["sum", "", None, 1],
    "target_layers": [(), (1, 1), (-1,), ("a",), (1.0,), 3, (2**31,)],
    "sink_chunks": [-1, 0.5, "1", None, 2**31],
    "recent_tokens": [-1, 1.5, None, 10**20],
    "chunks_per_page": [0, -2, 1.5, 2**31],
    "page_budget": [0, -1, 2.5, None, 10**30],
    "min_pages": [-1, 0.5],
    "budget_fraction": [0, -0.1, 1.5, "0.1", True, float("nan"), float("inf")],
    "host_pool_gb": [0, -1, "4", None, True, float("inf"), float("nan"), 2e6],
    "indexer_checkpoint": [3, ["a"], "", "a\0b"],
    "policy": ["oracle", "", None],
    "attention_rows": [0, 65, 1.5, "8", None, True],
    "attention_spill": [-1, 65, 1.5, "16", None, True],
    "attention_first_layer": [-1, 1.5, "3", None, True, 2**31],
    "attention_heads": [[], [[1]], [[1, 2, 3]], [[1, 2], [1, 2]], [[-1, 0]], [[1.5, 2]], [["1", 2]], [[True, 0]],
                        "x", 3, [[2**31, 0]]],
    "attention_later": ["quest", "", None, 1],
    "swap_limit": [-1, 1.5, "2", True, 2**31],
    "reselect": ["exact", "", None, True],
    "reselect_after": [-1, 1.5, "16", None, True, 2**31],
    "release_copied": [-1, 65, 1.5, "4", None, True],
    "copy_siblings": [-1, 65, 1.5, "8", None, True, 8],  # 8: release_copied is 0
    "needle_fallback": ["true", 0],
    "kernel": ["cuda", None],
    "seed": [-1, 1.5, 2**32, 2**64 - 1],
    "poison_released": ["no", 1],
}


def test_every_field_has_bad_value_cases():
    assert set(BAD_VALUES) == set(LSAConfig.field_names())


@pytest.mark.parametrize(
    "name,value", [(n, v) for n, vals in BAD_VALUES.items() for v in vals]
)
def test_bad_value_names_field(name, value):
    with pytest.raises(LSAConfigError) as err:
        LSAConfig.from_dict({name: value})
    msg = str(err.value)
    assert f"'{name}'" in msg and "expected" in msg and "\n" not in msg


def test_allowed_values_are_listed():
    with pytest.raises(LSAConfigError, match="one of indexer, recency, random, quest"):
        LSAConfig.from_dict({"policy": "oracle"})
    with pytest.raises(LSAConfigError, match="one of max, mean"):
        LSAConfig.from_dict({"ensemble": "sum"})


def test_min_pages_above_budget():
    with pytest.raises(LSAConfigError, match="'min_pages'.*<= page_budget"):
        LSAConfig(page_budget=4, min_pages=5)


def test_copy_siblings_follows_the_copies_release_copied_finds():
    with pytest.raises(LSAConfigError, match="'copy_siblings'.*0 when release_copied is 0"):
        LSAConfig(copy_siblings=8)
    assert LSAConfig(copy_siblings=8, release_copied=3).copy_siblings == 8
    with pytest.raises(LSAConfigError, match="'copy_siblings'"):
        LSAConfig(chunk_size=16, copy_siblings=17, release_copied=3)


def test_unknown_field_lists_known_fields():
    with pytest.raises(LSAConfigError, match="'chunksize': unknown field; known fields are .*chunk_size"):
        LSAConfig.from_dict({"chunksize": 64})


def test_yaml_round_trip_and_env(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text(
        "chunk_size: 32\nindexer_checkpoint: ckpt/x.safetensors\nexperimental:\n  target_layers: [3, 7]\n"
        "sglang:\n  dtype: float32\n  disable_radix_cache: true\n"
    )
    cfg, sglang_defaults = read_preset(p)
    assert cfg.chunk_size == 32 and cfg.target_layers == (3, 7)
    # relative checkpoint paths resolve against the YAML's folder
    assert cfg.indexer_checkpoint == str((tmp_path / "ckpt/x.safetensors").resolve())
    assert sglang_defaults == {"dtype": "float32", "disable_radix_cache": True}
    monkeypatch.setenv(ENV_VAR, cfg.to_json())
    assert LSAConfig.from_env() == cfg
    monkeypatch.setenv(ENV_VAR, str(p))
    assert LSAConfig.from_env() == cfg
    assert json.loads(cfg.to_json())["recent_tokens"] == 512


def test_yaml_errors(tmp_path):
    with pytest.raises(LSAConfigError, match="not found"):
        LSAConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1, 2\n")
    with pytest.raises(LSAConfigError, match="not valid YAML"):
        LSAConfig.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(LSAConfigError, match="mapping"):
        LSAConfig.from_yaml(lst)


def test_shipped_presets_are_valid():
    from pathlib import Path

    presets = sorted((Path(__file__).parents[2] / "server_configs").glob("*.yaml"))
    assert presets
    for p in presets:
        read_preset(p)


@pytest.mark.parametrize("chunk,per_page,pages", [(64, 1, 9), (32, 1, 18), (16, 1, 36), (32, 2, 9)])
def test_budget_in_tokens_is_the_same_bytes_at_every_chunk_size(chunk, per_page, pages):
    cfg = LSAConfig.from_dict({"chunk_size": chunk, "chunks_per_page": per_page, "budget_tokens": 576})
    assert cfg.page_budget == pages
    assert cfg.page_budget * cfg.chunks_per_page * cfg.chunk_size == 576


@pytest.mark.parametrize(
    "data,text",
    [
        ({"budget_tokens": 100}, "'budget_tokens': expected a positive multiple of chunk_size x chunks_per_page (64), got 100"),
        ({"budget_tokens": 0}, "'budget_tokens': expected a positive multiple"),
        ({"budget_tokens": "576"}, "'budget_tokens': expected a positive multiple"),
        ({"budget_tokens": 576, "page_budget": 9}, "'budget_tokens': expected either budget_tokens or page_budget, got both"),
        ({"budget_tokens": 576, "chunk_size": 48}, "'chunk_size': expected a power of two"),
        ({"budget_tokens": 128, "min_pages": 3}, "'min_pages': expected an integer <= page_budget (2)"),
    ],
)
def test_budget_in_tokens_errors(data, text):
    with pytest.raises(LSAConfigError) as e:
        LSAConfig.from_dict(data)
    assert text in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("prompt,budget", [
    (0, 576), (8192, 576), (8300, 576),  # 0.07 x 8300 = 581 tokens: 18 pages of 32 still
    (8685, 576), (8686, 608),  # 0.07 x 8686 = 608.02: the first prompt with a 19th page
    (16384, 1120), (131072, 9152),
])
def test_budget_fraction_grows_the_budget_with_the_prompt_in_whole_pages(prompt, budget):
    cfg = LSAConfig.from_dict({"chunk_size": 32, "budget_tokens": 576, "budget_fraction": 0.07})
    got = cfg.for_prompt(prompt)
    assert got.page_budget * got.chunk_size == budget
    assert got.replace(page_budget=cfg.page_budget) == cfg  # nothing else changes
    assert LSAConfig(page_budget=5).for_prompt(10**6) == LSAConfig(page_budget=5)  # fixed without a fraction
    # pages of 2 chunks: whole pages of 128 tokens
    assert LSAConfig(chunk_size=64, chunks_per_page=2, page_budget=1, budget_fraction=0.5).for_prompt(1000).page_budget == 3


@pytest.mark.parametrize("fields, reads", [
    ({"policy": "indexer"}, True),
    ({"policy": "quest"}, True),
    ({"policy": "attention"}, True),  # later windows from the indexer
    ({"policy": "attention", "attention_later": "carry"}, False),
    ({"policy": "attention", "attention_later": "carry", "reselect": "quest"}, False),
    ({"policy": "recency"}, False),
    ({"policy": "random"}, False),
    ({"policy": "indexer", "enabled": False}, False),
])
def test_chunk_keys_kept_only_for_a_selection_that_reads_them(fields, reads):
    assert LSAConfig(**fields).reads_chunk_keys is reads


def test_a_field_that_does_nothing_is_refused_naming_its_prerequisite(tmp_path):
    from lsa_sglang.plugin import parse_overrides

    preset = tmp_path / "quest.yaml"
    preset.write_text("policy: quest\nexperimental:\n  attention_spill: 4\n")
    with pytest.raises(LSAConfigError, match=r"^lsa config field 'attention_spill': does nothing unless policy is "
                                             r"attention; set that or drop 'attention_spill'$"):
        read_preset(preset)
    with pytest.raises(LSAConfigError, match=r"'release_copied': does nothing unless reselect is quest"):
        LSAConfig.from_dict({"release_copied": 2})  # reselect is off by default
    with pytest.raises(LSAConfigError, match=r"'copy_siblings': does nothing unless release_copied is above 0"):
        LSAConfig.from_dict({"release_copied": 2, "copy_siblings": 4})  # reselect is off
    with pytest.raises(LSAConfigError, match=r"'needle_fallback': does nothing unless policy is indexer"):
        LSAConfig.from_dict({"needle_fallback": False})
    # turning a rule off per request, with the rule that depends on it: both at their defaults
    assert parse_overrides({"lsa": {"release_copied": 0, "copy_siblings": 0}},
                           LSAConfig(reselect="quest", release_copied=3, copy_siblings=4)) == \
        {"release_copied": 0, "copy_siblings": 0}
    on = LSAConfig.from_dict({"reselect": "quest", "release_copied": 2, "copy_siblings": 4})
    assert on.copy_siblings == 4
    assert LSAConfig.from_dict({"enabled": False, "release_copied": 2}).release_copied == 2  # LSA off: nothing acts
    assert LSAConfig.from_dict({"release_copied": 0, "reselect_after": 0}).release_copied == 0  # at the default: off
    assert LSAConfig.from_json(on.to_json()) == on  # a serialized config names every field
    # per request: fields the server's preset sets are not the request's; the ones it sends are
    assert parse_overrides({"lsa": {"policy": "quest"}}, on) == {"policy": "quest"}
    with pytest.raises(LSAConfigError, match=r"^lsa request override 'release_copied': does nothing unless"):
        parse_overrides({"lsa": {"policy": "quest", "release_copied": 2}}, on)


def test_experimental_fields_live_under_experimental(tmp_path):
    from lsa_sglang.config import USER_FIELDS, nest_preset

    p = tmp_path / "p.yaml"
    p.write_text("chunk_size: 32\nexperimental:\n  reselect: quest\n  release_copied: 3\n")
    cfg, _ = read_preset(p)
    assert (cfg.chunk_size, cfg.reselect, cfg.release_copied) == (32, "quest", 3)
    for text, message in (
        ("reselect: quest\n", r"^lsa config field 'reselect': experimental; put it under 'experimental:'$"),
        ("experimental:\n  chunk_size: 32\n", r"'experimental.chunk_size': a field users set; put it at the top level"),
        ("experimental:\n  chunksize: 32\n", r"'experimental.chunksize': unknown field; experimental fields are "),
        ("experimental: [1]\n", r"'experimental': expected a mapping of field: value, got \[1\]"),
    ):
        p.write_text(text)
        with pytest.raises(LSAConfigError, match=message):
            read_preset(p)
    flat = {"chunk_size": 32, "tau": 16, "reselect": "quest"}
    assert nest_preset(flat) == {"chunk_size": 32, "tau": 16, "experimental": {"reselect": "quest"}}
    assert set(USER_FIELDS) - {"budget_tokens"} < set(LSAConfig.field_names())
