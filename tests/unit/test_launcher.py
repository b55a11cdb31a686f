"""The launcher turns our command line into SGLang's and refuses bad configs at start."""

import json
import os
import subprocess
import sys

import pytest

from lsa_sglang import launch_server as ls


def _model_dir(tmp_path, layers=30, heads=None):
    d = tmp_path / "model"
    d.mkdir()
    shape = {"num_hidden_layers": layers, **({} if heads is None else {"num_attention_heads": heads})}
    (d / "config.json").write_text(json.dumps(shape))
    return str(d)


def test_fills_lsa_flags_and_preset_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_size: 32\nsglang:\n  dtype: float32\n  max_total_tokens: 4096\n")
    m = _model_dir(tmp_path)
    argv, config = ls.prepare_argv(["--model-path", m, "--lsa-config", str(cfg), "--dtype", "bfloat16"])
    assert config.chunk_size == 32
    assert ls.flag_value(argv, "--attention-backend") == "lsa"
    assert ls.flag_value(argv, "--page-size") == "32"
    assert ls.flag_value(argv, "--dtype") == "bfloat16"  # command line beats the preset
    assert ls.flag_value(argv, "--max-total-tokens") == "4096"
    assert "--lsa-config" not in argv
    # the prefix cache stays on; host-backed LSA rows are evicted first
    assert "--disable-radix-cache" not in argv
    assert ls.flag_value(argv, "--radix-cache-backend") == "lsa"
    assert ls.flag_value(argv, "--radix-eviction-policy") == "priority"
    argv, _ = ls.prepare_argv(["--model-path", m, "--lsa-config", str(cfg), "--radix-eviction-policy", "lru"])
    assert ls.flag_value(argv, "--radix-eviction-policy") == "lru"


def test_cpu_route_defaults(tmp_path, monkeypatch):
    """Without CUDA: SGLang's CPU engine, a bounded pool, and a scheduler that sleeps when idle
    (it would poll at 100% of a core); each default yields to a flag given."""
    monkeypatch.setattr(ls, "cuda_available", lambda: False)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    m = _model_dir(tmp_path)
    argv, _ = ls.prepare_argv(["--model-path", m])
    assert ls.flag_value(argv, "--device") == "cpu"
    assert ls.flag_value(argv, "--max-total-tokens") == str(ls.DEFAULT_CPU_MAX_TOTAL_TOKENS)
    assert argv.count("--sleep-on-idle") == 1
    assert os.environ["SGLANG_USE_CPU_ENGINE"] == "1"
    argv, _ = ls.prepare_argv(["--model-path", m, "--sleep-on-idle", "--max-total-tokens", "4096"])
    assert argv.count("--sleep-on-idle") == 1 and ls.flag_value(argv, "--max-total-tokens") == "4096"


def test_page_size_must_match_chunk_size(tmp_path):
    with pytest.raises(SystemExit) as e:
        ls.prepare_argv(["--model-path", _model_dir(tmp_path), "--page-size", "16"])
    assert e.value.code == 2


def test_target_layers_checked_against_model(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("experimental:\n  target_layers: [2, 40]\n")
    with pytest.raises(SystemExit):
        ls.prepare_argv(["--model-path", _model_dir(tmp_path, 30), "--lsa-config", str(cfg)])
    err = capsys.readouterr().err
    assert "'target_layers'" in err and "[0, 29]" in err


def test_attention_first_layer_checked_against_model(tmp_path, capsys):
    cfg, model = tmp_path / "c.yaml", _model_dir(tmp_path, 30)
    cfg.write_text("experimental:\n  attention_first_layer: 30\n")
    with pytest.raises(SystemExit):
        ls.prepare_argv(["--model-path", model, "--lsa-config", str(cfg)])
    err = capsys.readouterr().err
    assert "'attention_first_layer'" in err and "[0, 29]" in err
    cfg.write_text("experimental:\n  attention_first_layer: 29\n")
    assert ls.prepare_argv(["--model-path", model, "--lsa-config", str(cfg)])[1].attention_first_layer == 29


def test_attention_heads_checked_against_model(tmp_path, capsys):
    cfg, model = tmp_path / "c.yaml", _model_dir(tmp_path, 30, heads=9)
    for bad, named in (("[[30, 0]]", "[30, 0]"), ("[[2, 9]]", "[2, 9]")):
        cfg.write_text(f"experimental:\n  attention_heads: {bad}\n")
        with pytest.raises(SystemExit):
            ls.prepare_argv(["--model-path", model, "--lsa-config", str(cfg)])
        err = capsys.readouterr().err
        assert "'attention_heads'" in err and "30 layers of 9 heads" in err and named in err
    cfg.write_text("experimental:\n  attention_heads: [[29, 8], [0, 0]]\n")
    assert ls.prepare_argv(["--model-path", model, "--lsa-config", str(cfg)])[1].attention_heads == ((29, 8), (0, 0))


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


# -- the indexer checkpoint is checked before SGLang starts -------------------------------------
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
    "vocab_size": 128, "rms_norm_eps": 1e-5,
}


def _model_with_checkpoint(tmp_path, preset="chunk_size: 32\n", poison=None):
    """A model folder, a checkpoint written by save_indexer for it (chunk size 32, the server's
    default target layers) and a preset naming the checkpoint by a path relative to the preset."""
    import torch

    from lsa_sglang.indexer.checkpoint import save_indexer, spec_from_hf_config
    from lsa_sglang.indexer.model import NeuralMemoryIndexer
    from lsa_sglang.models.adapter import default_target_layers

    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    spec = spec_from_hf_config(TINY_LLAMA, "tiny-llama", default_target_layers(4), 32, 64, 0.5)
    indexer = NeuralMemoryIndexer(spec)
    if poison is not None:
        with torch.no_grad():
            getattr(indexer, poison).view(-1)[-1] = float("nan")
    save_indexer(indexer, tmp_path / "ckpt" / "idx.safetensors")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(preset + "indexer_checkpoint: ckpt/idx.safetensors\n")
    return str(model), str(cfg)


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        ls.prepare_argv(argv)
    assert e.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("lsa_sglang.launch_server: error: lsa config field 'indexer_checkpoint': ")
    return lines[0]


def test_checkpoint_that_fits_is_accepted(tmp_path):
    model, cfg = _model_with_checkpoint(tmp_path)
    argv, config = ls.prepare_argv(["--model-path", model, "--lsa-config", cfg])
    assert config.indexer_checkpoint == str(tmp_path / "ckpt" / "idx.safetensors")
    assert ls.flag_value(argv, "--page-size") == "32"


def test_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    model, cfg = _model_with_checkpoint(tmp_path, poison="weights_proj")
    line = _refused(["--model-path", model, "--lsa-config", cfg], capsys)
    assert "tensor 'weights_proj' has 1 NaN or infinite values" in line


def test_checkpoint_for_other_chunking_or_model_is_refused(tmp_path, capsys):
    model, cfg = _model_with_checkpoint(tmp_path, preset="chunk_size: 64\n")
    assert "field 'chunk_size' expected 64, got 32" in _refused(["--model-path", model, "--lsa-config", cfg], capsys)
    renamed = tmp_path / "other-model"
    (tmp_path / "tiny-llama").rename(renamed)
    line = _refused(["--model-path", str(renamed), "--lsa-config", cfg, "--page-size", "64"], capsys)
    assert "field 'model_id' expected 'other-model', got 'tiny-llama'" in line
    (renamed / "config.json").write_text(json.dumps({**TINY_LLAMA, "num_hidden_layers": 8}))
    line = _refused(["--model-path", str(renamed), "--lsa-config", cfg], capsys)
    assert "'model_id'" in line or "'config_hash'" in line


def test_missing_checkpoint_is_refused(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("indexer_checkpoint: nowhere.safetensors\n")
    line = _refused(["--model-path", _model_dir(tmp_path), "--lsa-config", str(cfg)], capsys)
    assert f"{tmp_path / 'nowhere.safetensors'}: file not found" in line


def test_bad_checkpoint_stops_the_server_process_with_one_line(tmp_path):
    model, cfg = _model_with_checkpoint(tmp_path, poison="layer_bias")
    r = subprocess.run(
        [sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model, "--lsa-config", cfg],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "'indexer_checkpoint'" in lines[0] and "'layer_bias'" in lines[0], r.stderr


# -- the bind address ---------------------------------------------------------------------------
def test_binds_loopback_unless_host_given(tmp_path, capsys):
    m = _model_dir(tmp_path)
    argv, _ = ls.prepare_argv(["--model-path", m])
    assert ls.flag_value(argv, "--host") == "127.0.0.1"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "127.0.0.1 (loopback only)" in lines[0] and "--host 0.0.0.0" in lines[0]

    argv, _ = ls.prepare_argv(["--model-path", m, "--host", "0.0.0.0"])
    assert ls.flag_value(argv, "--host") == "0.0.0.0" and argv.count("--host") == 1
    argv, _ = ls.prepare_argv(["--model-path", m, "--host=::"])
    assert ls.flag_value(argv, "--host") == "::" and "--host" not in argv
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sglang:\n  host: 0.0.0.0\n")
    argv, _ = ls.prepare_argv(["--model-path", m, "--lsa-config", str(cfg)])
    assert ls.flag_value(argv, "--host") == "0.0.0.0"
    assert capsys.readouterr().err == ""


# -- the GPU mode without sgl-kernel (wiring only: no GPU here, so CUDA and the presence of
# sgl_kernel are stand-ins, named as such) ----------------------------------------------------------

_MODE_ENV = ("SGLANG_FORCE_FUSED_OP_BACKEND", "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK",
             "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", "LSA_SGLANG_GPU_MODE")


def _fake_cuda_host(monkeypatch, real_sgl_kernel: bool):
    from lsa_sglang import gpu_mode

    monkeypatch.setattr(ls, "cuda_available", lambda: True)  # stand-in: a CUDA host
    monkeypatch.setattr(gpu_mode, "real_sgl_kernel", lambda: real_sgl_kernel)  # stand-in
    for name in _MODE_ENV:
        monkeypatch.delenv(name, raising=False)


def test_gpu_mode_without_sgl_kernel_with_stand_ins_for_cuda_and_sgl_kernel(tmp_path, monkeypatch, capsys):
    _fake_cuda_host(monkeypatch, real_sgl_kernel=False)
    m = _model_dir(tmp_path)
    argv, _ = ls.prepare_argv(["--model-path", m])
    assert ls.flag_value(argv, "--sampling-backend") == "pytorch"
    assert ls.flag_value(argv, "--cuda-graph-backend-prefill") == "disabled"
    assert ls.flag_value(argv, "--attention-backend") == "lsa"  # Triton is LSA's dense backend there
    assert ls.flag_value(argv, "--device") is None  # not the CPU route
    assert {n: os.environ[n] for n in _MODE_ENV} == {
        "SGLANG_FORCE_FUSED_OP_BACKEND": "torch", "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
        "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python", "LSA_SGLANG_GPU_MODE": "torch"}
    err = capsys.readouterr().err
    assert err.count("GPU mode without sgl-kernel") == 1
    # a flag given on the command line stays as given
    argv, _ = ls.prepare_argv(["--model-path", m, "--sampling-backend", "flashinfer"])
    assert ls.flag_value(argv, "--sampling-backend") == "flashinfer"


def test_gpu_mode_is_not_taken_where_sgl_kernel_is_unless_forced(tmp_path, monkeypatch, capsys):
    _fake_cuda_host(monkeypatch, real_sgl_kernel=True)
    m = _model_dir(tmp_path)
    argv, _ = ls.prepare_argv(["--model-path", m])
    assert ls.flag_value(argv, "--sampling-backend") is None and "LSA_SGLANG_GPU_MODE" not in os.environ
    assert "GPU mode" not in capsys.readouterr().err
    argv, _ = ls.prepare_argv(["--model-path", m, "--lsa-gpu-mode", "torch"])
    assert ls.flag_value(argv, "--sampling-backend") == "pytorch" and os.environ["LSA_SGLANG_GPU_MODE"] == "torch"
    assert "--lsa-gpu-mode" not in argv


def test_gpu_mode_flag_errors(tmp_path, monkeypatch, capsys):
    _fake_cuda_host(monkeypatch, real_sgl_kernel=False)
    m = _model_dir(tmp_path)
    for args, message in ((["--lsa-gpu-mode", "fast"], "--lsa-gpu-mode: expected one of auto, torch, sgl-kernel"),
                          (["--lsa-gpu-mode", "sgl-kernel"], "no sgl_kernel is importable"),
                          (["--lsa-dense-backend", "lsa"], "--lsa-dense-backend lsa: expected an SGLang attention"),
                          (["--lsa-dense-backend", "nope"], "--lsa-dense-backend nope")):
        with pytest.raises(SystemExit) as e:
            ls.prepare_argv(["--model-path", m, *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_dense_backend_flag_reaches_the_session(tmp_path, monkeypatch):
    from lsa_sglang.session import DENSE_ENV_VAR, Session

    monkeypatch.setattr(ls, "cuda_available", lambda: False)
    monkeypatch.delenv(DENSE_ENV_VAR, raising=False)
    argv, _ = ls.prepare_argv(["--model-path", _model_dir(tmp_path), "--lsa-dense-backend", "triton"])
    assert "--lsa-dense-backend" not in argv and os.environ[DENSE_ENV_VAR] == "triton"
    assert Session.from_environment().dense_backend == "triton"


def test_gpu_mode_stock_server_gets_triton_and_the_mode(monkeypatch):
    """lsa-bench's stock server on a GPU host without sgl-kernel (stand-ins for both)."""
    from lsa_sglang import gpu_mode
    from lsa_sglang.bench import servers

    monkeypatch.setattr(servers, "cuda_available", lambda: True)  # stand-in: a CUDA host
    monkeypatch.setattr(gpu_mode, "real_sgl_kernel", lambda: False)  # stand-in
    s = servers.stock_server("/m", ["--dtype", "bfloat16"], log=None)
    assert ls.flag_value(s.cmd, "--attention-backend") == "triton"
    assert ls.flag_value(s.cmd, "--sampling-backend") == "pytorch"
    assert s.env["LSA_SGLANG_GPU_MODE"] == "torch" and s.env["SGLANG_FORCE_FUSED_OP_BACKEND"] == "torch"
    monkeypatch.setattr(gpu_mode, "real_sgl_kernel", lambda: True)
    s = servers.stock_server("/m", [], log=None)
    assert ls.flag_value(s.cmd, "--attention-backend") is None and "LSA_SGLANG_GPU_MODE" not in s.env


def test_gpu_mode_replaces_the_three_sglang_attributes_in_a_fresh_process():
    """What the plugin does in every SGLang process when the mode is on (here on CPU: the
    replaced attributes are read back, not run on a GPU)."""
    code = (
        "import os; os.environ['LSA_SGLANG_GPU_MODE'] = 'torch'\n"
        "from lsa_sglang import plugin; plugin.register()\n"
        "from sglang.srt.layers.attention import triton_backend as t\n"
        "from sglang.srt.layers import dual_gemm as d\n"
        "from sglang.srt.mem_cache import memory_pool as m\n"
        "fs = (t.is_arch_support_pdl, d.DualGemm._select_mode, m.can_use_store_cache)\n"
        "print(*(f.__module__ for f in fs), t.is_arch_support_pdl(), d.DualGemm._select_mode(None, None, 4096),"
        " m.can_use_store_cache(256, 256))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-6:] == ["lsa_sglang.gpu_mode"] * 3 + ["False", "None", "False"]
    # without the mode, none is replaced
    plain = subprocess.run([sys.executable, "-c", code.replace("'torch'", "''")], capture_output=True, text=True,
                           timeout=300)
    assert "lsa_sglang.gpu_mode" not in plain.stdout
