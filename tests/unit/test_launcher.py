"""The launcher turns our command line into SGLang's and refuses bad configs at start."""

import json
import subprocess
import sys

import pytest

from lsa_sglang import launch_server as ls


def _model_dir(tmp_path, layers=30):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return str(d)


def test_fills_lsa_flags_and_preset_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_size: 32\nsglang:\n  dtype: float32\n  max_total_tokens: 4096\n")
    m = _model_dir(tmp_path)
    argv, config = ls.prepare_argv(["--model-path", m, "--lsa-config", str(cfg), "--dtype", "bfloat16"])
    assert config.chunk_size == 32
    assert ls._flag_value(argv, "--attention-backend") == "lsa"
    assert ls._flag_value(argv, "--page-size") == "32"
    assert ls._flag_value(argv, "--dtype") == "bfloat16"  # command line beats the preset
    assert ls._flag_value(argv, "--max-total-tokens") == "4096"
    assert "--lsa-config" not in argv
    # the prefix cache stays on; host-backed LSA rows are evicted first
    assert "--disable-radix-cache" not in argv
    assert ls._flag_value(argv, "--radix-cache-backend") == "lsa"
    assert ls._flag_value(argv, "--radix-eviction-policy") == "priority"
    argv, _ = ls.prepare_argv(["--model-path", m, "--lsa-config", str(cfg), "--radix-eviction-policy", "lru"])
    assert ls._flag_value(argv, "--radix-eviction-policy") == "lru"


def test_page_size_must_match_chunk_size(tmp_path):
    with pytest.raises(SystemExit) as e:
        ls.prepare_argv(["--model-path", _model_dir(tmp_path), "--page-size", "16"])
    assert e.value.code == 2


def test_target_layers_checked_against_model(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target_layers: [2, 40]\n")
    with pytest.raises(SystemExit):
        ls.prepare_argv(["--model-path", _model_dir(tmp_path, 30), "--lsa-config", str(cfg)])
    err = capsys.readouterr().err
    assert "'target_layers'" in err and "[0, 29]" in err


def test_bad_config_fails_once_with_clear_message(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tau: 0\n")
    r = subprocess.run(
        [sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", _model_dir(tmp_path),
         "--lsa-config", str(cfg)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == ["lsa_sglang.launch_server: error: lsa config field 'tau': expected an integer in [1, 65536], got 0"]
