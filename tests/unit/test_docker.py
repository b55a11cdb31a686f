"""The GPU image's command line is one the launcher and SGLang's argument parser accept.

No Docker engine runs on CI machines, so the image is not built; its ENTRYPOINT/CMD and
the compose command are parsed and fed through the same code the container would run.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from lsa_sglang import launch_server as ls

ROOT = Path(__file__).parents[2]


def _dockerfile_command() -> list[str]:
    text = (ROOT / "docker/Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entry[:3] == ["python3", "-m", "lsa_sglang.launch_server"]
    assert entry[3:] == ["--host", "0.0.0.0"]  # kept when `docker run IMAGE ...` replaces CMD
    return entry[3:] + cmd


def _compose_command() -> list[str]:
    svc = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())["services"]["lsa-sglang"]
    assert svc["healthcheck"]["test"][-1].endswith("/health")
    assert any(v.endswith(":/models/model:ro") for v in svc["volumes"])
    return [re.sub(r"\$\{LSA_PRESET:-([^}]+)\}", r"\1", a) for a in svc["command"]]


def _localize(argv: list[str], model_dir: Path) -> list[str]:
    out = []
    for a in argv:
        a = a.replace("/models/model", str(model_dir))
        a = a.replace("/opt/lsa-sglang/", str(ROOT) + "/")
        out.append(a)
    return out


@pytest.mark.parametrize("source", ["dockerfile", "compose"])
def test_image_command_is_accepted(source, tmp_path):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    cmd = _dockerfile_command() if source == "dockerfile" else _compose_command()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 32, "model_type": "llama"}))
    for a in cmd:
        if a.endswith(".yaml"):
            assert (ROOT / a.replace("/opt/lsa-sglang/", "")).is_file(), a
    argv, config = ls.prepare_argv(_localize(cmd, model))
    load_plugins()
    args = prepare_server_args(argv)
    assert args.attention_backend == "lsa"
    assert args.page_size == config.chunk_size
    assert args.port == 30000 and args.host == "0.0.0.0"
