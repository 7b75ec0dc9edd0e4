from __future__ import annotations

from pathlib import Path

import pytest
import redis

from seqshare.daemon.redis_server import EmbeddedRedis, RedisServerError, find_redis_server


def test_embedded_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        assert server.url.startswith("unix://")
        conn = redis.Redis.from_url(server.url)
        assert conn.ping()
        conn.set("k", "v")
        assert conn.get("k") == b"v"
        pid = server.proc.pid if server.proc else None
        conn.close()
    finally:
        server.stop()
    assert server.proc is None
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"unix://{tmp_path / 'r' / 'redis.sock'}", socket_connect_timeout=0.5).ping()


def test_temp_directory_is_removed_after_stop() -> None:
    with EmbeddedRedis() as server:
        directory = server.directory
        assert directory.exists()
    assert not directory.exists()


def test_restart_keeps_url_and_serves_again(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "r") as server:
        url = server.url
        server.restart()
        assert server.url == url
        assert redis.Redis.from_url(url).ping()


def test_bad_binary_is_a_named_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQSHARE_REDIS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(RedisServerError, match="not an executable"):
        find_redis_server()


def test_server_that_cannot_start_reports_why(tmp_path: Path) -> None:
    # /bin/false exits at once: start() must say the server exited rather than time out.
    with pytest.raises(RedisServerError, match="exited"):
        EmbeddedRedis(tmp_path / "r", binary="/bin/false").start(timeout=5)
