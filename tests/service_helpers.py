"""Helpers for the service tests: tiny bundles with distinct weights, a real sd_notify socket, the CLI."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

SEQSHARE = str(Path(sys.executable).with_name("seqshare"))
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
_BUNDLES: dict[str, dict[str, Path]] = {}


def tiny_bundles(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three bundles of one tiny random Llama, made once per session:
    `a` (f32 weights, limits 200/48/400), `a_short` (the same weights, lower limits: the same weight
    digest), `b` (f16 weights: another digest)."""
    if not _BUNDLES:
        from queue_helpers import compile_tiny_bundle

        from seqshare.bundle.convert import load_checkpoint
        from seqshare.bundle.format import Limits, write_bundle

        d = factory.mktemp("svc-bundles")
        a = compile_tiny_bundle(d)
        a_short, b = d / "tiny-short.bundle", d / "tiny-f16.bundle"
        write_bundle(load_checkpoint(d / "tiny-hf", "keep", 32), a_short, Limits(100, 32, 200))
        write_bundle(load_checkpoint(d / "tiny-hf", "f16", 32), b, Limits(200, 48, 400))
        _BUNDLES["all"] = {"a": a, "a_short": a_short, "b": b, "hf": d / "tiny-hf"}
    return _BUNDLES["all"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEQSHARE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def write_config(tmp: Path, models: list[tuple[str, Path]], memory: str = "") -> Path:
    """A small worker config in `tmp`: the models, a 64 MiB cache, `memory` lines in [memory]."""
    cfg = tmp / "worker.toml"
    body = "threads = 1\nmax_batch = 4\n"
    for name, path in models:
        body += f'[[models]]\nname = "{name}"\npath = "{path}"\n'
    body += f"[cache]\nmemory_bytes = {64 * MIB}\ndirectory = \"{tmp / 'cache'}\"\n"
    body += f"[memory]\nplan_path = \"{tmp / 'plan.json'}\"\nscratch_bytes = {16 * MIB}\n{memory}\n"
    cfg.write_text(body)
    return cfg


@dataclass
class Note:
    """One sd_notify datagram as received: its arrival time and its fields in order."""

    t: float
    fields: list[tuple[str, str]]

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.fields if k == key), None)

    def __repr__(self) -> str:
        return f"{self.t:.2f} " + " | ".join(f"{k}={v}" for k, v in self.fields)


class NotifySocket:
    """A datagram socket standing where systemd's notify socket would: it records every message."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sqnotify-"))  # short: sun_path holds 108 bytes
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.notes: list[Note] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = [tuple(line.split("=", 1)) for line in data.decode().split("\n") if "=" in line]
            with self._lock:
                self.notes.append(Note(time.monotonic(), fields))  # type: ignore[arg-type]

    def snapshot(self) -> list[Note]:
        with self._lock:
            return list(self.notes)

    def wait_for(self, pred: Callable[[Note], bool], timeout: float, after: float = 0.0,
                  what: str = "message") -> Note:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.snapshot():
                if n.t >= after and pred(n):
                    return n
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout} s; got:\n" + "\n".join(map(repr, self.snapshot()[-30:])))

    def with_key(self, key: str, start: float = 0.0, end: float = float("inf")) -> list[Note]:
        return [n for n in self.snapshot() if start <= n.t <= end and n.get(key) is not None]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.dir.rmdir()


def max_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch of [start, end] without one of `times`."""
    points = [start, *[t for t in times if start <= t <= end], end]
    return max(b - a for a, b in itertools.pairwise(points))
