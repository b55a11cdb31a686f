"""Where results go, and what they say about the run (machine, model, versions, commit).

Every run writes `<kind>-<model>-<time>[-<label>].json` (and its PNG) into the results folder
(`bench/results/` of this repository by default) and appends one summary line to
`bench/results/runs.jsonl`, so runs accumulate and can be compared later.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata as _md
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_results_dir() -> Path:
    """`bench/results` here (or of this repository), else `./lsa-bench-results`."""
    for base in (Path.cwd(), REPO_ROOT):
        if (base / "bench" / "results").is_dir():
            return base / "bench" / "results"
    return Path.cwd() / "lsa-bench-results"


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def git_info() -> dict[str, Any] | None:
    if not (REPO_ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    return {"commit": run("rev-parse", "--short", "HEAD"), "dirty": bool(run("status", "--porcelain", "-uno"))}


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def model_facts(model_path: str | None) -> dict[str, Any]:
    """Name and shape of the served model, from its folder when it is local."""
    if not model_path:
        return {}
    facts: dict[str, Any] = {"path": model_path, "name": Path(model_path).name}
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        data = data.get("text_config", data)
        for key in ("architectures", "num_hidden_layers", "num_key_value_heads", "num_attention_heads",
                    "hidden_size", "head_dim", "max_position_embeddings", "torch_dtype"):
            if key in data:
                facts[key] = data[key]
    return facts


def kv_bytes_per_token(model_path: str | None, dtype: str | None) -> int | None:
    """2 x layers x kv_heads x head_dim x bytes: what one token of full KV occupies on the device."""
    f = model_facts(model_path)
    try:
        layers, heads = int(f["num_hidden_layers"]), int(f.get("num_key_value_heads") or f["num_attention_heads"])
        head_dim = int(f.get("head_dim") or int(f["hidden_size"]) // int(f["num_attention_heads"]))
    except (KeyError, TypeError, ValueError):
        return None
    size = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}.get(str(dtype or "bfloat16"), 2)
    return 2 * layers * heads * head_dim * size


def run_metadata(model_path: str | None = None, **extra: Any) -> dict[str, Any]:
    cuda = _gpus()
    return {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "arch": platform.machine(),
            "system": f"{platform.system()} {platform.release()}",
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpus": cuda,
            "device": "cuda" if cuda else "cpu",
        },
        "model": model_facts(model_path),
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("lsa-sglang", "sglang", "torch", "transformers", "flashinfer-python")},
        },
        "git": git_info(),
        **extra,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def result_stem(kind: str, model: str | None, label: str | None) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [kind, _slug(Path(model).name) if model else "server", stamp]
    if label:
        parts.append(_slug(label))
    return "-".join(parts)


def save_run(data: dict[str, Any], folder: Path, stem: str, summary: dict[str, Any]) -> Path:
    """Write the full JSON next to earlier runs and append a one-line summary to runs.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    line = {"file": path.name, "time": data.get("meta", {}).get("time"), **summary}
    with open(folder / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
    return path
