"""An offline bundle of SGLang for a GPU host with torch but without SGLang or network.

    lsa-sglang bundle build --out lsa-bundle.tar.xz [--python-version 3.12] [--host-packages FILE]
    python3 -m lsa_sglang.bundle install lsa-bundle.tar.xz --venv DIR     (on the GPU host, no network)

`build` downloads (pip, from the package index) the wheels of `requirements/gpu-bundle.txt` (SGLang
and every package its server's launch path imports) for a target interpreter and platform, skips
those the target host already has (`--host-packages`: one name per line, `pip freeze` output
works; the default is the lent GPU host's list, `requirements/gpu-host-packages.txt`), unpacks
them, drops what the server never imports (SGLang's Rust extensions, multimodal generation and test
kits, byte-code caches) and writes one xz-compressed tar with a MANIFEST.json; it refuses an archive
over `--max-mib` (24). `install` needs only the Python standard library: a virtual environment over
the host's interpreter (its system packages, torch among them, stay visible), the bundle's packages
in its site-packages, this repository on its path with the `sglang.srt.plugins` entry point, and
the `sgl_kernel` stand-in in every process (`cpu_stub`). Then `DIR/bin/python -m
lsa_sglang.launch_server ...` serves in the GPU mode without sgl-kernel (`gpu_mode`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PINS = REPO_ROOT / "requirements" / "gpu-bundle.txt"
HOST_PACKAGES = REPO_ROOT / "requirements" / "gpu-host-packages.txt"
MAX_MIB = 24
MANIFEST = "MANIFEST.json"
# manylinux tags pip must match exactly: the glibc versions wheels are built for
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]
# paths (inside site-packages) the server never imports
DROP = (
    re.compile(r"^sglang/multimodal_gen/"),
    re.compile(r"^sglang/test/"),
    re.compile(r"^sglang/.*\.so$"),  # Rust cores; SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python
    re.compile(r"(^|/)__pycache__/"),
)


class BundleError(RuntimeError):
    """An expected failure: printed as one message."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> list[tuple[str, str]]:
    """`name==version` lines (comments and blank lines skipped)."""
    pins = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if m is None:
            raise BundleError(f"{path}:{n}: expected name==version, got {line!r}")
        pins.append((m.group(1), m.group(2)))
    return pins


def read_host_packages(path: Path) -> set[str]:
    """Normalized names of the packages the target host has (`name` or `name==version` lines)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.split(r"[=<>!~ @;\[]", line, maxsplit=1)[0]))
    return names


def wanted(pins: list[tuple[str, str]], host: set[str]) -> list[tuple[str, str]]:
    """The pins the host lacks (SGLang always: a host with it needs no bundle)."""
    return [(n, v) for n, v in pins if normalize(n) not in host or normalize(n) == "sglang"]


def download(pins: list[tuple[str, str]], dest: Path, python_version: str) -> list[Path]:
    """The wheels of `pins` for CPython `python_version` on x86-64 manylinux (pip, no deps)."""
    dest.mkdir(parents=True, exist_ok=True)
    tag = python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
           "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError("pip download failed:\n" + (proc.stderr or proc.stdout)[-3000:])
    wheels = sorted(dest.glob("*.whl"))
    found = {normalize(w.name.split("-")[0]) for w in wheels}
    missing = [n for n, _ in pins if normalize(n) not in found]
    if missing:
        raise BundleError(f"no wheel downloaded for {', '.join(missing)}")
    return wheels


def dropped(path: str) -> bool:
    return any(p.search(path) for p in DROP)


def unpack(wheels: list[Path], site: Path) -> dict[str, int]:
    """Extract each wheel's files into `site`, less `DROP`; returns bytes kept per wheel."""
    kept = {}
    for wheel in wheels:
        total = 0
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                name = info.filename
                if info.is_dir() or dropped(name) or name.split("/", 1)[0].endswith(".data"):
                    continue
                target = site / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if (info.external_attr >> 16) & 0o111:
                    target.chmod(0o755)
                total += info.file_size
        kept[wheel.name] = total
    return kept


def build(out: Path, python_version: str = "3.12", host_packages: Path = HOST_PACKAGES,
          pins_file: Path = PINS, max_mib: float = MAX_MIB, wheels_dir: Path | None = None,
          log=print) -> dict:
    """Write the bundle to `out`; returns its manifest."""
    pins = read_pins(pins_file)
    host = read_host_packages(host_packages)
    chosen = wanted(pins, host)
    with tempfile.TemporaryDirectory(prefix="lsa-bundle-") as tmp:
        tmp = Path(tmp)
        wheel_dir = wheels_dir or tmp / "wheels"
        log(f"bundle: downloading {len(chosen)} wheels for CPython {python_version} "
            f"({len(pins) - len(chosen)} of {len(pins)} pins are on the host already)")
        wheels = download(chosen, wheel_dir, python_version)
        wheels = [w for w in wheels if normalize(w.name.split("-")[0]) in {normalize(n) for n, _ in chosen}]
        site = tmp / "site"
        kept = unpack(wheels, site)
        manifest = {
            "python_version": python_version,
            "packages": {n: v for n, v in chosen},
            "host_packages_file": host_packages.name,
            "skipped_on_host": sorted(n for n, v in pins if (n, v) not in chosen),
            "wheel_bytes": sum(w.stat().st_size for w in wheels),
            "unpacked_bytes": sum(kept.values()),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:xz", preset=9) as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            tar.add(site, arcname="site")
        size = partial.stat().st_size
        if size > max_mib * 2**20:
            partial.unlink()
            raise BundleError(f"bundle is {size / 2**20:.1f} MiB, over the {max_mib} MiB limit; "
                              "trim the pins or drop more (lsa_sglang/bundle.py DROP)")
        partial.replace(out)
        manifest["archive_bytes"] = size
        log(f"bundle: {out} ({size / 2**20:.1f} MiB; {len(wheels)} packages, "
            f"{manifest['unpacked_bytes'] / 2**20:.1f} MiB unpacked)")
        return manifest


def _entry_points() -> str:
    """The `[project.entry-points]` tables of pyproject.toml as entry_points.txt."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    return "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items())


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise BundleError(f"{venv} has no lib/python3*/site-packages")
    return found[0]


def install(archive: Path, venv: Path, system_site_packages: bool = True, log=print) -> Path:
    """Unpack `archive` into a new virtual environment at `venv` over this interpreter; returns
    the environment's python."""
    from lsa_sglang import __version__

    with tarfile.open(archive, "r:xz") as tar:
        manifest = json.loads(tar.extractfile(MANIFEST).read())
        want, have = manifest["python_version"], "%d.%d" % sys.version_info[:2]
        if have != want:
            raise BundleError(f"bundle {archive} is for Python {want}; this is Python {have}")
        cmd = [sys.executable, "-m", "venv", "--without-pip", str(venv)]
        if system_site_packages:
            cmd.append("--system-site-packages")
        subprocess.run(cmd, check=True)
        site = site_packages(venv)
        members = [m for m in tar.getmembers() if m.name.startswith("site/")]
        for m in members:
            m.name = m.name[len("site/"):]
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(site, members=[m for m in members if m.name], **kwargs)
    dist = site / f"lsa_sglang-{__version__}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lsa-sglang\nVersion: {__version__}\n")
    (dist / "entry_points.txt").write_text(_entry_points())
    # the repository on the path, then the sgl_kernel stand-in, in every process of this venv
    (site / "lsa_sglang.pth").write_text(
        f"{REPO_ROOT}\nimport lsa_sglang.cpu_stub as _lsa_stub; _lsa_stub.install()\n"
    )
    py = venv / "bin" / "python"
    log(f"bundle: installed {len(manifest['packages'])} packages into {venv} (python: {py})")
    return py


# What the server's launch path imports, in SGLang's processes and ours (the `check` action).
LAUNCH_PATH = (
    "sglang.launch_server",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.managers.scheduler",
    "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.models.llama",
    "sglang.srt.models.qwen2",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.srt.layers.attention.torch_native_backend",
    "lsa_sglang.launch_server",
    "lsa_sglang.plugin",
    "lsa_sglang.attention.backend",
    "lsa_sglang.memory.radix",
    "lsa_sglang.bench.cli",
)


def check(log=print) -> list[str]:
    """Import every module of `LAUNCH_PATH`, register the plugin through its entry point and make
    the GPU mode's replacements; returns the problems found (empty: the server can start)."""
    import importlib
    import importlib.metadata

    problems = []
    for name in LAUNCH_PATH:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is a finding here
            problems.append(f"import {name}: {type(e).__name__}: {e}")
    eps = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "lsa"]
    if not eps:
        problems.append("no 'lsa' entry point in group sglang.srt.plugins (SGLang would not load the plugin)")
    if not problems:
        try:
            eps[0].load()()
            from lsa_sglang import gpu_mode

            replaced = gpu_mode.patch_sglang()
            import torch

            log(f"bundle check: sglang {importlib.metadata.version('sglang')}, torch {torch.__version__}, "
                f"cuda {torch.cuda.is_available()}, real sgl_kernel {gpu_mode.real_sgl_kernel()}, "
                f"{len(LAUNCH_PATH)} modules imported, plugin registered, replaced: {', '.join(replaced)}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"plugin: {type(e).__name__}: {e}")
    return problems


def main(argv: list[str] | None = None, prog: str = "python -m lsa_sglang.bundle") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="download, trim and pack the bundle (needs the package index)")
    b.add_argument("--out", type=Path, required=True, help="archive to write (.tar.xz)")
    b.add_argument("--python-version", default="3.12", help="target CPython X.Y (default 3.12)")
    b.add_argument("--host-packages", type=Path, default=HOST_PACKAGES,
                   help=f"the target host's packages, one per line (default {HOST_PACKAGES.relative_to(REPO_ROOT)})")
    b.add_argument("--pins", type=Path, default=PINS, help="name==version lines to bundle")
    b.add_argument("--max-mib", type=float, default=MAX_MIB, help="largest archive allowed (MiB)")
    b.add_argument("--wheels-dir", type=Path, default=None, help="keep the downloaded wheels here")
    i = sub.add_parser("install", help="unpack a bundle into a new virtual environment (no network)")
    i.add_argument("archive", type=Path)
    i.add_argument("--venv", type=Path, required=True, help="folder of the new environment")
    i.add_argument("--no-system-site-packages", action="store_true",
                   help="do not see the interpreter's own packages (tests)")
    sub.add_parser("check", help="import the server's launch path and register the plugin (no network)")
    args = parser.parse_args(argv)
    if args.action == "check":
        problems = check(log=lambda m: print(m, file=sys.stderr))
        for p in problems:
            print(f"{prog} check: {p}", file=sys.stderr)
        return 1 if problems else 0
    try:
        if args.action == "build":
            manifest = build(args.out, args.python_version, args.host_packages, args.pins, args.max_mib,
                             args.wheels_dir, log=lambda m: print(m, file=sys.stderr))
            print(json.dumps(manifest, indent=1))
        else:
            py = install(args.archive, args.venv, not args.no_system_site_packages,
                         log=lambda m: print(m, file=sys.stderr))
            print(py)
    except (BundleError, OSError, subprocess.CalledProcessError) as e:
        print(f"{prog} {args.action}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
