"""Real SGLang servers on the embedded model, started once per test session.

`lsa_server` runs our launcher with the CPU preset; `stock_server` runs SGLang's own
launcher with `torch_native` and the same flags, for token-for-token comparisons.
Both log to files under the session's tmp dir so tests can read what the scheduler said.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from lsa_sglang.bench.servers import free_port

ROOT = Path(__file__).parents[2]
PRESET = Path(__file__).parent / "lsa-test.yaml"
START_TIMEOUT_S = 420


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def generate(self, json_body: dict, timeout: float = 600) -> dict:
        r = requests.post(self.url + "/generate", json=json_body, timeout=timeout)
        r.raise_for_status()
        return r.json()


def start_server(cmd: list[str], log: Path, env: dict | None = None) -> Server:
    port = free_port()
    cmd = cmd + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
    full_env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", **(env or {}))
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"server did not become healthy in {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def model_path() -> str:
    from lsa_sglang.assets import default_model_name, fetch_model

    return str(fetch_model(default_model_name()))


# --sleep-on-idle: an idle SGLang scheduler otherwise polls at 100% of a core, and the session's
# servers stay up beside the ones single tests start (the LSA launcher adds it on CPU by itself).
COMMON_FLAGS = ["--dtype", "float32", "--context-length", "8192", "--max-total-tokens", "32768",
                "--max-running-requests", "8", "--device", "cpu", "--sleep-on-idle"]


@pytest.fixture(scope="session")
def lsa_server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("lsa") / "server.log"
    server = start_server(
        [sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model_path,
         "--lsa-config", str(PRESET), "--enable-metrics", *COMMON_FLAGS],
        log,
    )
    yield server
    stop_server(server.proc)


@pytest.fixture(scope="session")
def stock_server(model_path, tmp_path_factory):
    """Stock SGLang (torch_native), same page size as the LSA preset's chunk size."""
    log = tmp_path_factory.mktemp("stock") / "server.log"
    server = start_server(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
         "--attention-backend", "torch_native", "--page-size", "64", *COMMON_FLAGS],
        log,
    )
    yield server
    stop_server(server.proc)
