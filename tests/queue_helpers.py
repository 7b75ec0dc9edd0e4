"""Helpers for the queue tests: a tiny real bundle, and `seqshare worker` in a real subprocess."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from seqshare.jobqueue.routing import Keys

SEQSHARE = str(Path(sys.executable).with_name("seqshare"))
# Liveness TTL 3 s: dead peers are noticed quickly. The job gate (jobqueue/hold.py) is on: a test that
# needs a job still running holds it there instead of hoping it is slow enough.
WORKER_ENV = {"SEQSHARE_HEARTBEAT_S": "0.5", "SEQSHARE_TEST_HOLD": "1"}
# Short documents in the tiny tokenizer's alphabet (it was trained on one English sentence).
DOCS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "def f(x): return x. The lazy fox jumps over 0123456789.",
    "The brown dog jumps over the quick fox. 42 foxes sleep.",
]


def compile_tiny_bundle(directory: Path) -> Path:
    """A random tiny Llama (transformers, seeded) compiled to a seqshare bundle (f32 weights)."""
    from seqshare.bundle.convert import load_checkpoint
    from seqshare.bundle.format import Limits, write_bundle

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_model

    src = directory / "tiny-hf"
    src.mkdir(parents=True, exist_ok=True)
    make_model("llama", src, max_position_embeddings=512)
    ck = load_checkpoint(src, "keep", 32)
    out = directory / "tiny.bundle"
    write_bundle(ck, out, Limits(share_length=200, unshare_length=48, seq_length=400))
    return out


def tiny_bundle_once(factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle, compiled once per test session for every queue test module."""
    directory = factory.getbasetemp() / "queue-tiny-bundle"
    done = directory / "done"
    if not done.exists():
        directory.mkdir(exist_ok=True)
        compile_tiny_bundle(directory)
        done.touch()
    return directory / "tiny.bundle"


_STARTED: list[subprocess.Popen[Any]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test that failed half way may leave a worker running: never let it outlive the test session."""
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()


class WorkerProc:
    """One `seqshare worker` process with its stderr in a log file."""

    def __init__(self, url: str, bundle: Path, log_dir: Path, name: str, *extra: str,
                 env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()):
        """`wrap`: a command the worker runs under (e.g. `unshare --pid --fork --mount-proc`)."""
        self.url, self.name = url, name
        self.log_path = log_dir / f"{name}.log"
        cmd = [*wrap, SEQSHARE, "worker", "--bundle", str(bundle), "--redis-url", url, "--name", name,
               "--threads", "1", *extra]
        # A home (so a prefix spill directory) per worker name, as separate service instances would have.
        full_env = {**os.environ, **WORKER_ENV, "SEQSHARE_HOME": str(log_dir / f"home-{name}"), **(env or {})}
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        _STARTED.append(self.proc)

    def wait_ready(self, timeout: float = 60.0) -> WorkerProc:
        conn = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log()}")
            if conn.exists(f"seqshare:worker:{self.name}"):
                return self
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"worker {self.name} not ready after {timeout} s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(redis.RedisError):  # a test that failed holding a job: let it finish
                redis.Redis.from_url(self.url).delete(Keys.test_hold())
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def write_qa_input(path: Path, docs: list[str], per_doc: int, interleave: bool = True,
                   max_new_tokens: int = 6, prefix: str = "", stagger: int = 0) -> list[str]:
    """`per_doc` questions per document as qa lines; returns the custom_ids in file order.

    `stagger`: question q gets `max_new_tokens - q * stagger` tokens, so a job's questions finish one
    after another (the engine reports progress as questions finish)."""
    rows: list[dict[str, Any]] = []
    order = [(q, d) for q in range(per_doc) for d in range(len(docs))] if interleave else \
        [(q, d) for d in range(len(docs)) for q in range(per_doc)]
    for q, d in order:
        rows.append({"custom_id": f"{prefix}d{d}-q{q}", "document": docs[d],
                     "question": f"What jumps over the dog {q}?",
                     "params": {"max_new_tokens": max_new_tokens - q * stagger}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["custom_id"] for r in rows]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_qa(url: str, input_path: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    """`seqshare qa` in a subprocess (stdout/stderr captured as text)."""
    cmd = [SEQSHARE, "qa", str(input_path), "--out", str(out), "--redis-url", url, "--timeout", "120", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _STARTED.append(proc)
    return proc


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return got


class Gate:
    """The worker's test gate (jobqueue/hold.py): jobs pause at a known point until released.

    `close(n)`: every running job pauses once it has answered n of its questions (0: at its first
    progress point); `held()` maps the paused jobs to their workers; `let_through(id)` releases one;
    `open()` all. A worker killed while its job was held leaves the entry behind: `forget` it.
    """

    def __init__(self, conn: redis.Redis):
        self.conn = conn

    def close(self, after_questions: int = 0) -> Gate:
        self.conn.set(Keys.test_hold(), after_questions)
        return self

    def open(self) -> None:
        self.conn.delete(Keys.test_hold(), Keys.test_pass())

    def let_through(self, job_id: str) -> None:
        self.conn.sadd(Keys.test_pass(), job_id)

    def forget(self, job_id: str) -> None:
        self.conn.hdel(Keys.test_held(), job_id)

    def held(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.conn.hgetall(Keys.test_held()).items()}

    def _wait(self, job_id: str | None, worker: str | None, timeout: float) -> tuple[str, str]:
        def found() -> tuple[str, str] | None:
            return next(((j, w) for j, w in self.held().items() if job_id in (None, j) and worker in (None, w)), None)
        return wait_until(found, timeout, what=f"job {job_id or '(any)'} to be held at the gate")

    def wait_held(self, job_id: str | None = None, worker: str | None = None, timeout: float = 60.0) -> str:
        """The id of a job held at the gate (this one, by this worker, if given), once there is one."""
        return self._wait(job_id, worker, timeout)[0]

    def holder(self, job_id: str, timeout: float = 60.0) -> str:
        """Once the job is held: the name of the worker holding it."""
        return self._wait(job_id, None, timeout)[1]


def unshare_unavailable(*flags: str) -> str | None:
    """Why `unshare FLAGS true` cannot run here (it needs root), or None."""
    if os.geteuid() != 0:
        return f"needs root for unshare {' '.join(flags)}"
    if shutil.which("unshare") is None:
        return "unshare(1) is missing"
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare {' '.join(flags)} fails here: {probe.stderr.strip()}"
