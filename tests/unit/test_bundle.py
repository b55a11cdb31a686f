"""The offline bundle (lsa_sglang/bundle.py): its inputs, and a built bundle serving the launch
path on a simulated GPU host (only torch and the host's own packages, no SGLang)."""

from __future__ import annotations

import importlib.metadata as md
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lsa_sglang import bundle

REPO = Path(__file__).resolve().parents[2]


def test_pins_host_list_and_what_the_host_lacks(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("# comment\nsglang==0.5.23\nPyZMQ==27.3.0  # needed\n\nfastapi==0.165.0\n")
    host = tmp_path / "host.txt"
    host.write_text("torch==2.11.0\npyzmq\nsglang\nFastAPI @ file:///x\n")
    assert bundle.read_pins(pins) == [("sglang", "0.5.23"), ("PyZMQ", "27.3.0"), ("fastapi", "0.165.0")]
    assert bundle.read_host_packages(host) == {"torch", "pyzmq", "sglang", "fastapi"}
    # the host's pins are skipped, SGLang never (a host with it needs no bundle)
    assert bundle.wanted(bundle.read_pins(pins), bundle.read_host_packages(host)) == [("sglang", "0.5.23")]
    pins.write_text("sglang>=0.5\n")
    with pytest.raises(bundle.BundleError, match=r"pins.txt:1: expected name==version"):
        bundle.read_pins(pins)


def test_the_shipped_lists_parse_and_every_pin_matches_the_cpu_route():
    pins = dict((bundle.normalize(n), v) for n, v in bundle.read_pins(bundle.PINS))
    assert pins["sglang"] == "0.5.23"
    host = bundle.read_host_packages(bundle.HOST_PACKAGES)
    assert {"torch", "triton", "transformers", "numpy"} <= host and "sglang" not in host
    lock = {}
    for line in (REPO / "requirements" / "cpu.lock").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            lock[bundle.normalize(m.group(1))] = m.group(2)
    differ = {n: (v, lock[n]) for n, v in pins.items() if n in lock and lock[n] != v}
    assert not differ, f"bundle pins differ from requirements/cpu.lock: {differ}"


def test_dropped_paths():
    assert bundle.dropped("sglang/multimodal_gen/x.py")
    assert bundle.dropped("sglang/test/kits/a.py")
    assert bundle.dropped("sglang/srt/mem_cache/radix_core.cpython-312-x86_64-linux-gnu.so")
    assert bundle.dropped("pydantic/__pycache__/main.cpython-312.pyc")
    assert not bundle.dropped("sglang/srt/layers/attention/triton_backend.py")
    assert not bundle.dropped("pydantic_core/_pydantic_core.cpython-312-x86_64-linux-gnu.so")


def _requirement_closure(root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = bundle.normalize(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _simulated_host(folder: Path) -> Path:
    """A folder of links to this environment's packages that the GPU host has (its list, and
    torch with whatever torch's own wheel needs here): the host's site-packages, as far as it
    can be had on this machine."""
    host = bundle.read_host_packages(bundle.HOST_PACKAGES) | _requirement_closure("torch")
    folder.mkdir()
    for dist in md.distributions():
        name = bundle.normalize(dist.metadata["Name"])
        if name not in host or name == "sglang":
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        base = Path(dist.locate_file(""))
        for top in tops:
            src, dst = base / top, folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_built_bundle_serves_the_launch_path_beside_torch_alone(tmp_path):
    """Built for this interpreter (the GPU host's is 3.12; same code, other tags), from the package
    index, for a host that has no pin of the bundle; installed into an environment that sees only
    the simulated host's packages; then `bundle check` imports the launch path there and
    registers the plugin through its entry point."""
    archive = tmp_path / "b.tar.xz"
    empty_host = tmp_path / "host.txt"
    empty_host.write_text("torch\n")
    version = "%d.%d" % sys.version_info[:2]
    manifest = bundle.build(archive, version, empty_host, log=lambda m: None)
    assert archive.stat().st_size <= bundle.MAX_MIB * 2**20
    assert manifest["packages"]["sglang"] == "0.5.23"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not any(n.startswith("site/sglang/test/") or n.startswith("site/sglang/multimodal_gen/") for n in names)

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([sys.executable, "-m", "lsa_sglang.bundle", "install", str(archive), "--venv", str(venv),
                          "--no-system-site-packages"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    py = Path(out.stdout.strip())
    site = bundle.site_packages(venv)
    (site / "host.pth").write_text(str(_simulated_host(tmp_path / "host-site")) + "\n")

    # nothing of this environment leaks in: the sim sees no SGLang without the bundle
    probe = subprocess.run([str(py), "-c", "import sys, sglang; print(sglang.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert probe.returncode == 0 and str(site) in probe.stdout, probe.stderr
    check = subprocess.run([str(py), "-m", "lsa_sglang.bundle", "check"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
    assert check.returncode == 0, check.stderr[-4000:]
    assert "plugin registered" in check.stderr and "can_use_store_cache" in check.stderr

    # a bundle for another interpreter is refused with one message, nothing written
    other = tmp_path / "other.tar.xz"
    with tarfile.open(archive) as src, tarfile.open(other, "w:xz") as dst:
        data = json.dumps({**json.loads(src.extractfile(bundle.MANIFEST).read()), "python_version": "2.7"}).encode()
        info = tarfile.TarInfo(bundle.MANIFEST)
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    bad = subprocess.run([sys.executable, "-m", "lsa_sglang.bundle", "install", str(other), "--venv",
                          str(tmp_path / "v2")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "is for Python 2.7" in bad.stderr
    assert not (tmp_path / "v2").exists()
