"""`python -m lsa_sglang.launch_server --model-path M --lsa-config X.yaml [any sglang flag]`.

SGLang's own HTTP server with `--attention-backend lsa`. This wrapper only:
- reads and validates the LSA config (one clear message and exit code 2 on a bad field),
- checks it against the model (target layers exist),
- hands it to SGLang's processes through `LSA_SGLANG_CONFIG`,
- fills in the flags LSA needs (backend, page size = chunk size) and the preset's
  `sglang:` defaults, and on a host without CUDA takes SGLang's CPU engine route,
then runs SGLang's launcher unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lsa_sglang.config import ENV_VAR, LSAConfig, LSAConfigError, read_preset

DEFAULT_CPU_MAX_TOTAL_TOKENS = 32768


class LaunchError(SystemExit):
    """Printed once on stderr; exit code 2 like argparse."""

    def __init__(self, message: str) -> None:
        print(f"lsa_sglang.launch_server: error: {message}", file=sys.stderr)
        super().__init__(2)


def _flag_value(argv: list[str], flag: str) -> str | None:
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


def _sglang_defaults(defaults: dict[str, Any]) -> list[list[str]]:
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
    return config, _sglang_defaults(sglang_defaults)


def model_num_layers(model_path: str) -> int | None:
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    data = data.get("text_config", data)
    return data.get("num_hidden_layers")


def check_against_model(config: LSAConfig, model_path: str) -> None:
    n = model_num_layers(model_path)
    if n is None or config.target_layers is None:
        return
    bad = [x for x in config.target_layers if x >= n]
    if bad:
        raise LSAConfigError(
            f"lsa config field 'target_layers': expected layer indices in [0, {n - 1}] "
            f"for this model ({n} layers), got {list(config.target_layers)!r}"
        )


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def prepare_argv(argv: list[str]) -> tuple[list[str], LSAConfig]:
    """Turn our command line into SGLang's, validating everything LSA owns."""
    argv, config_path = _pop_flag(list(argv), "--lsa-config")
    try:
        config, preset_flags = load_preset(config_path)
    except LSAConfigError as e:
        raise LaunchError(str(e)) from None
    # Preset flags are defaults: anything on the command line wins.
    for flag in preset_flags:
        if not _has_flag(argv, flag[0]):
            argv += flag

    model = _flag_value(argv, "--model-path") or _flag_value(argv, "--model")
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
    except LSAConfigError as e:
        raise LaunchError(str(e)) from None

    backend = _flag_value(argv, "--attention-backend")
    if backend is None:
        argv += ["--attention-backend", "lsa"]
    elif backend != "lsa":
        print(
            f"lsa_sglang.launch_server: warning: --attention-backend {backend} given; "
            "LSA is inactive on this server",
            file=sys.stderr,
        )
    page = _flag_value(argv, "--page-size")
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

    if cuda_available():
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
