"""Start and stop the servers `compare` and `throughput` measure: stock SGLang and LSA.

Both get the same SGLang flags (dtype, context length, KV budget, running-request cap, page size,
the preset's `sglang:` defaults), so the only difference is the attention backend: stock SGLang
runs `python -m sglang.launch_server` (torch_native on CPU, SGLang's default backend on GPU) and
LSA runs our launcher with a preset. Each server runs in its own process group, so stopping it
ends the scheduler and detokenizer children too; one server at a time, always stopped on exit.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lsa_sglang import gpu_mode
from lsa_sglang.bench.client import ServerClient
from lsa_sglang.launch_server import cuda_available, flag_value, sglang_flags

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 900


def default_preset() -> Path | None:
    """The CPU preset of this repository (its LSA fields suit any small model on CPU)."""
    p = REPO_ROOT / "server_configs" / "cpu-smollm2.yaml"
    return p if p.is_file() else None


def free_port(low: int = 10000, high: int = 21999) -> int:
    """A free port for a server that binds it only later, taken below the kernel's ephemeral
    range: a port from that range can be handed meanwhile to any outgoing connection or bind(0)
    (the server's own gloo and ZMQ sockets among them), and SGLang's warmup then talks to that
    socket instead of its HTTP server and gives up. SGLang picks its internal ports from 22000 up."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = min(high, ephemeral_low - 1)
    for port in random.sample(range(low, high + 1), min(64, max(high - low + 1, 0))):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preset_flags(preset: str | os.PathLike[str] | None) -> list[str]:
    """The preset's `sglang:` map as flags, so the stock server gets the same defaults."""
    if preset is None:
        return []
    from lsa_sglang.config import read_preset

    _, defaults = read_preset(preset)
    return [part for flag in sglang_flags(defaults) for part in flag]


def merge_flags(base: list[str], override: list[str]) -> list[str]:
    """`base` flags not named in `override`, then `override` (later wins, like the launcher)."""
    named = {a.split("=", 1)[0] for a in override if a.startswith("--")}
    out: list[str] = []
    skip = False
    for i, a in enumerate(base):
        if skip:
            skip = False
            continue
        if a.startswith("--") and a.split("=", 1)[0] in named:
            skip = "=" not in a and i + 1 < len(base) and not base[i + 1].startswith("--")
            continue
        out.append(a)
    return out + override


def write_preset(base: str | os.PathLike[str], changes: dict[str, Any], folder: Path) -> Path:
    """A copy of preset `base` with some LSA fields changed (e.g. a trained indexer checkpoint)."""
    import yaml

    from lsa_sglang.config import flatten_preset, nest_preset

    data = yaml.safe_load(Path(base).read_text()) or {}
    sglang = data.pop("sglang", None)
    data = flatten_preset(data)
    ckpt = data.get("indexer_checkpoint")
    if isinstance(ckpt, str) and ckpt and not os.path.isabs(ckpt):
        # Relative to the preset it came from, not to the copy's folder.
        data["indexer_checkpoint"] = str((Path(base).resolve().parent / ckpt).resolve())
    data = nest_preset({**data, **changes})
    if sglang is not None:
        data["sglang"] = sglang
    out = folder / "lsa-bench-preset.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def chunk_size_of(preset: str | os.PathLike[str] | None) -> int:
    if preset is None:
        from lsa_sglang.config import LSAConfig

        return LSAConfig().chunk_size
    from lsa_sglang.config import read_preset

    return read_preset(preset)[0].chunk_size


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when our process dies, however it dies (Linux), so a
    killed benchmark never leaves a server behind (SGLang's own children follow their parent)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManagedServer:
    """One server process (group) we started; a context manager that always stops it."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = START_TIMEOUT_S, progress: bool = True) -> ManagedServer:
        from tqdm import tqdm

        port = free_port()
        cmd = self.cmd + ["--host", "127.0.0.1", "--port", str(port)]
        env = dict(os.environ, **self.env)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self.url = f"http://127.0.0.1:{port}"
        client = ServerClient(self.url)
        t0 = time.monotonic()
        with tqdm(desc=f"starting {self.name} server", unit="s", total=None, disable=not progress,
                  bar_format="{desc}: {elapsed}") as bar:
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-4000:]
                    self.proc = None
                    raise RuntimeError(f"{self.name} server exited while starting (log {self.log}):\n{tail}")
                if client.healthy():
                    return self
                time.sleep(1)
                bar.update(1)
        self.stop()
        raise RuntimeError(f"{self.name} server not healthy after {timeout:.0f} s (log {self.log})")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            return
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlive the leader still belong to the group: kill them and wait until
        # the group is empty, so the next server starts on a quiet machine.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.2)

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stock_server(model_path: str, flags: list[str], log: Path, attention_backend: str | None = None,
                 page_size: int | None = None) -> ManagedServer:
    """Stock SGLang: torch_native on CPU (the CPU engine's only backend here), on CUDA its default,
    or in the GPU mode without sgl-kernel (`gpu_mode`, chosen as the LSA launcher chooses it) its
    Triton backend with that mode's flags and environment."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path]
    env: dict[str, str] = {}
    on_gpu = cuda_available()
    backend = attention_backend or (None if on_gpu else "torch_native")
    if backend and flag_value(flags, "--attention-backend") is None:
        cmd += ["--attention-backend", backend]
    if page_size and flag_value(flags, "--page-size") is None:
        cmd += ["--page-size", str(page_size)]
    if not on_gpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        if flag_value(flags, "--device") is None:
            cmd += ["--device", "cpu"]
        if "--sleep-on-idle" not in flags:  # as the LSA launcher does on CPU: idle, it leaves the cores free
            cmd.append("--sleep-on-idle")
    cmd += flags
    if gpu_mode.choose("auto", on_gpu) == "torch":
        cmd = gpu_mode.add_flags(cmd, env, stock=True)
    return ManagedServer("stock", cmd, log, env)


def lsa_server(model_path: str, preset: str | os.PathLike[str] | None, flags: list[str], log: Path) -> ManagedServer:
    cmd = [sys.executable, "-m", "lsa_sglang.launch_server", "--model-path", model_path]
    if preset is not None:
        cmd += ["--lsa-config", str(preset)]
    return ManagedServer("lsa", cmd + flags, log)


def common_flags(*, dtype: str | None, context_length: int | None, max_total_tokens: int | None,
                 max_running_requests: int | None, mem_fraction_static: float | None,
                 extra: list[str] | None = None) -> list[str]:
    flags: list[str] = []
    for name, value in (("--dtype", dtype), ("--context-length", context_length),
                        ("--max-total-tokens", max_total_tokens),
                        ("--max-running-requests", max_running_requests),
                        ("--mem-fraction-static", mem_fraction_static)):
        if value is not None:
            flags += [name, str(value)]
    return flags + list(extra or [])


# A small server (fp32, 8K context, 32K-token pool, 8 running requests): the footprint and
# prefix benchmarks, the same flags as the integration tests.
SMALL_SERVER_FLAGS = common_flags(dtype="float32", context_length=8192, max_total_tokens=32768,
                                  max_running_requests=8, mem_fraction_static=None)


def logs_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    return Path(tempfile.mkdtemp(prefix="lsa-bench-logs-"))
