"""`make demo` (scripts/demo.py) end to end on the real default model: a reduced set in the default run,
the full set marked slow. Each run uses a private $SEQSHARE_HOME, so the compile step really runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from queue_helpers import Gate

from seqshare.daemon.redis_server import ENV_URL

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def demo(home: Path, gguf: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SEQSHARE_HOME": str(home)}
    return subprocess.run([sys.executable, str(DEMO), "--gguf", str(gguf), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes mentioning `marker` (the demo's worker name)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(cmd)
    return found


def finished_cleanly(out: str) -> None:
    assert "worker stopped (exit code 0)" in out
    worker = re.search(r"worker (demo-\d+) ready", out)
    assert worker and not leftovers(f"--name {worker.group(1)}")
    if not os.environ.get("SEQSHARE_REDIS_URL"):
        assert "Redis stopped" in out
        sock = re.search(r"private redis-server on unix://(\S+)", out)
        assert sock and not Path(sock.group(1)).exists()


def test_demo_reduced_set_compiles_encrypts_answers_and_reuses_the_bundle(tmp_path: Path,
                                                                           default_gguf: Path) -> None:
    first = demo(tmp_path, default_gguf, "--docs", "1", "--questions", "2", "--max-new-tokens", "16")
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "seqshare model keygen" in out and "seqshare model compile" in out and "seqshare model encrypt" in out
    bundle = tmp_path / "demo" / "SmolLM2-135M-Instruct.Q4_1.ssb"
    assert bundle.read_bytes()[:8] != b"SEQSHRB\0"  # on disk it is encrypted, not a plain bundle
    assert not list((tmp_path / "demo").glob(".*plain*"))  # the plain intermediate is gone
    rows = [json.loads(x) for x in (tmp_path / "demo" / "last-run" / "answers.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["tidewater-1", "tidewater-2"]
    assert [r["cache_hit"] for r in rows] == [False, True]  # the follow-up found the document's prefix cached
    assert "oyelaran" in rows[0]["answer"].lower()  # the CEO's name, read from the document
    assert "Q: Who is the chief executive officer of Tidewater Robotics?" in out
    assert "prefix from the cache 1, computed 1" in out
    assert re.search(r"context tokens prefilled \d+, saved \d+", out)
    assert "cached=1, done=1, failed=0" in first.stderr  # qa's progress bar in the follow-up round
    assert "1 answered, 0 failed, 1 from cached prefixes, 1 already answered" in first.stderr
    finished_cleanly(out)

    mtime = bundle.stat().st_mtime_ns
    second = demo(tmp_path, default_gguf, "--docs", "1", "--questions", "1", "--max-new-tokens", "8")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "cached: " in second.stdout and "model compile" not in second.stdout
    assert bundle.stat().st_mtime_ns == mtime
    finished_cleanly(second.stdout)


def test_demo_interrupted_stops_worker_and_redis(tmp_path: Path, default_gguf: Path) -> None:
    # The worker inherits the test gate: the first job is held, so Ctrl-C lands inside `seqshare qa`.
    env = {**os.environ, "SEQSHARE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "SEQSHARE_TEST_HOLD": "1"}
    # A suite started as a background job (`cmd &` in a script) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: give the demo the terminal's default back.
    with_ctrl_c = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", with_ctrl_c, str(DEMO), "--gguf", str(default_gguf), "--docs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    lines = []
    given = os.environ.get(ENV_URL)  # else the demo says where its private server is
    gate = Gate(redis.Redis.from_url(given)).close(after_questions=0) if given else None
    stuck = threading.Timer(600, proc.kill)  # a demo that hangs without a line must not hang the suite
    stuck.start()
    for line in proc.stdout:
        lines.append(line)
        if (m := re.search(r"private redis-server on (\S+)", line)) is not None:
            gate = Gate(redis.Redis.from_url(m.group(1))).close(after_questions=0)
        if line.startswith("[4/5]"):
            assert gate is not None, "".join(lines)
            gate.wait_held(timeout=300)  # into the first `seqshare qa`, its first job running
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends the demo
            gate.open()  # the worker's first SIGTERM finishes its batch: let it
            break
    rest, _ = proc.communicate(timeout=120)
    stuck.cancel()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted; everything was stopped" in out
    finished_cleanly(out)


@pytest.mark.slow
def test_demo_full_set(tmp_path: Path, default_gguf: Path) -> None:
    res = demo(tmp_path, default_gguf, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in (tmp_path / "demo" / "last-run" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and len({r["custom_id"] for r in rows}) == 24
    assert sum(r["cache_hit"] for r in rows) == 4  # the four follow-ups
    assert "prefix from the cache 4, computed 4" in res.stdout
    finished_cleanly(res.stdout)
