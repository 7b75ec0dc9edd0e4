"""Shared fixtures. Every test that touches Redis gets a real server on an empty database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from seqshare.daemon.redis_server import ENV_URL, EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One private redis-server for the session (or $SEQSHARE_REDIS_URL); yields its URL."""
    if url := os.environ.get(ENV_URL):
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The server's URL with its database flushed before and after the test."""
    conn = redis.Redis.from_url(redis_server)
    conn.flushdb()
    yield redis_server
    conn.flushdb()
    conn.close()


@pytest.fixture
def seqshare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $SEQSHARE_HOME for the test."""
    home = tmp_path / "home"
    monkeypatch.setenv("SEQSHARE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The verified default model (make test fetches it before pytest runs)."""
    from seqshare.daemon.fetch import default_model_path, fetch_default

    path = default_model_path()
    if not path.exists():
        fetch_default(quiet=True)
    return path


@pytest.fixture(scope="module")
def q4_model(default_gguf: Path) -> Any:
    """The default model as it ships: Q4_1 weights as they are in the GGUF (int4 with a scale and a
    min per group of 32), f16 KV. One per test module."""
    from seqshare.bundle.convert import load_checkpoint
    from seqshare.worker.model import Model

    return Model(load_checkpoint(default_gguf, "keep"), threads=2)


# --- the queue and service tests: a tiny real bundle and a `seqshare worker` process on it -------
@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from queue_helpers import tiny_bundle_once

    return tiny_bundle_once(tmp_path_factory)


@pytest.fixture
def worker(redis_url: str, tiny_bundle: Path, tmp_path: Path) -> Iterator[Any]:
    from queue_helpers import WorkerProc

    w = WorkerProc(redis_url, tiny_bundle, tmp_path, "w1").wait_ready()
    yield w
    w.stop()
