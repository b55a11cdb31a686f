"""`python -m lsa_sglang.launch_server --model-path M --lsa-config X.yaml [any sglang flag]`.

SGLang's own HTTP server with `--attention-backend lsa`. This wrapper only:
- reads and validates the LSA config (one clear message and exit code 2 on a bad field),
- checks it against the model (target layers exist),
- hands it to SGLang's processes through `LSA_SGLANG_CONFIG`,
- checks the indexer checkpoint against the model, as the server would load it,
- checks the preset's `sglang:` defaults against SGLang's own flags,
- fills in the flags LSA needs (backend, page size = chunk size) and the preset's
  `sglang:` defaults, binds loopback unless `--host` is given, and on a host without CUDA
  takes SGLang's CPU engine route,
- on a CUDA host without a real sgl-kernel (or with `--lsa-gpu-mode torch`), takes the GPU mode
  without it (`lsa_sglang.gpu_mode`: torch fused ops, Triton attention, torch sampling) and says
  so in one line on stderr,
- `--lsa-dense-backend NAME`: the SGLang attention backend LSA hands prefill, extend and LSA-off
  decode to (default: torch_native on CPU, triton on CUDA),
then runs SGLang's launcher unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lsa_sglang import gpu_mode
from lsa_sglang.config import ENV_VAR, LSAConfig, LSAConfigError, read_preset, show, show_key
from lsa_sglang.session import DENSE_ENV_VAR

DEFAULT_CPU_MAX_TOTAL_TOKENS = 32768
DEFAULT_HOST = "127.0.0.1"
BACKEND = "lsa"


class LaunchError(SystemExit):
    """Printed once on stderr; exit code 2 like argparse."""

    def __init__(self, message: str) -> None:
        print(f"lsa_sglang.launch_server: error: {message}", file=sys.stderr)
        super().__init__(2)


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _pop_flag(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    out, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv):
                raise LaunchError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, value


def sglang_flags(defaults: dict[str, Any]) -> list[list[str]]:
    """`{max_total_tokens: 8192, disable_cuda_graph: true}` -> [[flag, value], [flag]]."""
    flags = []
    for key, value in defaults.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append([flag])
        elif value is not False and value is not None:
            flags.append([flag, str(value)])
    return flags


def load_preset(path: str | None) -> tuple[LSAConfig, list[list[str]]]:
    if path is None:
        return LSAConfig(), []
    config, sglang_defaults = read_preset(path)
    per_key = {key: sglang_flags({key: value}) for key, value in sglang_defaults.items()}
    check_sglang_flags({key: flags[0] for key, flags in per_key.items() if flags})
    return config, [flag for flags in per_key.values() for flag in flags]


class _ArgumentError(Exception):
    pass


def _sglang_parser():
    """SGLang's own command-line parser, raising instead of printing usage and exiting."""
    import argparse

    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.server_args import ServerArgs

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise _ArgumentError(message)

    if BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND])
    parser = Parser(prog="sglang serve", add_help=False)
    ServerArgs.add_cli_args(parser)
    return parser


def check_sglang_flags(flags: dict[str, list[str]]) -> None:
    """Each key of the preset's `sglang:` map is an SGLang flag and its value one the flag takes
    (raises LSAConfigError naming `sglang.<key>`)."""
    if not flags:
        return
    import logging

    parser = _sglang_parser()
    options = parser._option_string_actions
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # deprecated flags warn when parsed; SGLang warns again later
    try:
        for key, flag in flags.items():
            field = f"lsa config field 'sglang.{show_key(key)}'"
            action = options.get(flag[0])
            if action is None:
                raise LSAConfigError(
                    f"{field}: --{show_key(flag[0][2:])} is not an SGLang server flag "
                    "(python -m sglang.launch_server --help)"
                )
            if action.nargs == 0 and len(flag) > 1:
                raise LSAConfigError(f"{field}: {flag[0]} is a switch; expected true or false, got {show(flag[1])}")
            try:
                parser.parse_args(["--model-path", "model", *flag])
            except _ArgumentError as e:
                message = " ".join(str(e).split())
                if len(message) > 200:
                    message = message[:197] + "..."
                raise LSAConfigError(f"{field}: {message}") from None
    finally:
        logging.disable(previous)


def model_shape(model_path: str) -> tuple[int | None, int | None]:
    """The model's layers and query heads from its config.json (None where it does not say)."""
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        return None, None
    data = json.loads(cfg.read_text())
    data = data.get("text_config", data)
    return data.get("num_hidden_layers"), data.get("num_attention_heads")


def check_against_model(config: LSAConfig, model_path: str) -> None:
    n, heads = model_shape(model_path)
    if n is None:
        return
    error = config.model_error(n, heads)
    if error:
        raise LSAConfigError("lsa config field " + error)
    if config.target_layers is None:
        return
    bad = [x for x in config.target_layers if x >= n]
    if bad:
        raise LSAConfigError(
            f"lsa config field 'target_layers': expected layer indices in [0, {n - 1}] "
            f"for this model ({n} layers), got {list(config.target_layers)!r}"
        )


def model_hf_config(model_path: str, argv: list[str]) -> dict | None:
    """The model's config as the server will see it (SGLang's loader, with
    --json-model-override-args applied); the bare config.json if that loader fails; None
    without a config.json."""
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        return None
    override: dict = {}
    raw_override = flag_value(argv, "--json-model-override-args")
    if raw_override:
        try:
            override = json.loads(raw_override)
        except json.JSONDecodeError:
            override = {}
        override = override if isinstance(override, dict) else {}
    try:
        from sglang.srt.utils.hf_transformers.config import get_config

        hf = get_config(
            model_path,
            trust_remote_code=_has_flag(argv, "--trust-remote-code"),
            revision=flag_value(argv, "--revision"),
            model_override_args=override,
        )
        return hf.to_dict()
    except Exception:
        pass
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return {**data, **override} if isinstance(data, dict) else None


def check_checkpoint(config: LSAConfig, model_path: str, argv: list[str]) -> None:
    """Load the indexer checkpoint the way the server will and check it against the model: a
    checkpoint that would stop the server stops the launcher instead, with one message."""
    if not config.indexer_checkpoint:
        return
    from lsa_sglang.indexer.checkpoint import (
        IndexerCheckpointError,
        architecture_fields,
        load_indexer,
        model_id_from_path,
        spec_from_hf_config,
    )
    from lsa_sglang.models.adapter import default_target_layers

    expected = None
    hf = model_hf_config(model_path, argv)
    if hf is not None:
        try:
            n = int(architecture_fields(hf)["num_hidden_layers"])
            layers = config.target_layers or default_target_layers(n)
            expected = spec_from_hf_config(
                hf, model_id_from_path(model_path), tuple(layers), config.chunk_size, config.tau, config.threshold
            )
        except Exception:  # a config we cannot read: check the file on its own
            expected = None
    try:
        load_indexer(config.indexer_checkpoint, expected)
    except IndexerCheckpointError as e:
        raise LSAConfigError(f"lsa config field 'indexer_checkpoint': {e}") from None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def prepare_argv(argv: list[str]) -> tuple[list[str], LSAConfig]:
    """Turn our command line into SGLang's, validating everything LSA owns (the environment
    SGLang's processes need goes into `os.environ`)."""
    argv, config_path = _pop_flag(list(argv), "--lsa-config")
    argv, gpu_mode_flag = _pop_flag(argv, "--lsa-gpu-mode")
    argv, dense = _pop_flag(argv, "--lsa-dense-backend")
    try:
        config, preset_flags = load_preset(config_path)
    except LSAConfigError as e:
        raise LaunchError(str(e)) from None
    # Preset flags are defaults: anything on the command line wins.
    for flag in preset_flags:
        if not _has_flag(argv, flag[0]):
            argv += flag

    model = flag_value(argv, "--model-path") or flag_value(argv, "--model")
    if model is None:
        raise LaunchError("--model-path is required (a model folder or an embedded model name)")
    if not Path(model).exists():
        from lsa_sglang import assets

        try:
            fetched = str(assets.model_path_or_fetch(model))
        except assets.AssetError as e:
            raise LaunchError(str(e)) from None
        argv = [fetched if a == model else a for a in argv]
        model = fetched
    try:
        check_against_model(config, model)
        if flag_value(argv, "--attention-backend") in (None, BACKEND):
            check_checkpoint(config, model, argv)
    except LSAConfigError as e:
        raise LaunchError(str(e)) from None

    if not _has_flag(argv, "--host"):
        argv += ["--host", DEFAULT_HOST]
        print(
            f"lsa_sglang.launch_server: listening on {DEFAULT_HOST} (loopback only); "
            "pass --host 0.0.0.0 to accept connections from other machines",
            file=sys.stderr,
        )

    backend = flag_value(argv, "--attention-backend")
    if backend is None:
        argv += ["--attention-backend", "lsa"]
    elif backend != BACKEND:
        print(
            f"lsa_sglang.launch_server: warning: --attention-backend {backend} given; "
            "LSA is inactive on this server",
            file=sys.stderr,
        )
    page = flag_value(argv, "--page-size")
    if page is None:
        argv += ["--page-size", str(config.chunk_size)]
    elif backend in (None, "lsa") and page != str(config.chunk_size):
        raise LaunchError(
            f"--page-size {page} differs from the lsa chunk_size {config.chunk_size}; "
            "LSA keeps one chunk per KV page: drop --page-size or make them equal"
        )

    if backend in (None, "lsa"):
        if not _has_flag(argv, "--radix-cache-backend"):
            argv += ["--radix-cache-backend", "lsa"]
        if config.enabled and not _has_flag(argv, "--radix-eviction-policy"):
            # LSA rows enter the tree at a lower priority: their chunks are in the host
            # mirror, so the device tier drops them before rows that exist nowhere else.
            argv += ["--radix-eviction-policy", "priority"]

    if dense is not None:
        from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

        if dense == BACKEND or dense not in ATTENTION_BACKEND_CHOICES:
            raise LaunchError(f"--lsa-dense-backend {dense}: expected an SGLang attention backend other "
                              f"than lsa ({', '.join(c for c in ATTENTION_BACKEND_CHOICES if c != BACKEND)})")
        os.environ[DENSE_ENV_VAR] = dense

    cuda = cuda_available()
    try:
        mode = gpu_mode.choose(gpu_mode_flag or "auto", cuda)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if gpu_mode_flag == "sgl-kernel" and cuda and not gpu_mode.real_sgl_kernel():
        raise LaunchError("--lsa-gpu-mode sgl-kernel: no sgl_kernel is importable on this host; "
                          "drop the flag (the GPU mode without it is then chosen) or install sgl-kernel")
    if mode == "torch":
        argv = gpu_mode.add_flags(argv, os.environ, stock=False)
        if dense not in (None, gpu_mode.ATTENTION_BACKEND):
            print(f"lsa_sglang.launch_server: warning: --lsa-dense-backend {dense} in the GPU mode "
                  "without sgl-kernel (which has only triton and torch_native)", file=sys.stderr)
        print(f"lsa_sglang.launch_server: {gpu_mode.describe()}", file=sys.stderr)

    if cuda:
        if backend in (None, "lsa") and not _has_flag(argv, "--disable-cuda-graph"):
            # The decode plan changes every window; graph capture of it is not wired yet.
            argv.append("--disable-cuda-graph")
    else:
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        if not _has_flag(argv, "--device"):
            argv += ["--device", "cpu"]
        if not _has_flag(argv, "--max-total-tokens"):
            # Without it SGLang sizes the KV cache from host RAM.
            argv += ["--max-total-tokens", str(DEFAULT_CPU_MAX_TOTAL_TOKENS)]
        if not _has_flag(argv, "--sleep-on-idle"):
            # An idle scheduler otherwise polls at 100% of a core, which the model's own
            # threads (or a second server on the host) need.
            argv.append("--sleep-on-idle")
    return argv, config


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        print("\nLSA config fields: " + ", ".join(LSAConfig.field_names()))
        print("All other flags are SGLang's (python -m sglang.launch_server --help).")
        return
    sglang_argv, config = prepare_argv(argv)
    os.environ[ENV_VAR] = config.to_json()

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sglang_argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
