"""The sd_notify protocol of `seqshare worker`, for real: the worker runs as a subprocess with
NOTIFY_SOCKET bound to a datagram socket of the test and WATCHDOG_USEC set, as systemd starts it.

One worker life covers the issue's list in order: READY=1 only after the bundles (one encrypted, its
key from a systemd credential directory) are decrypted, loaded and published; WATCHDOG=1 on time
while idle and while working; no WATCHDOG=1 while a native call hangs (daemon/debug.py); STATUS=
follows the work; SIGHUP reloads (RELOADING=1, READY=1) the changed bundle only and keeps the other
model's cached prefix; a broken config on SIGHUP changes nothing; STOPPING=1 and exit 0 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from queue_helpers import DOCS, WORKER_ENV
from service_helpers import SEQSHARE, NotifySocket, max_gap, run_cli, tiny_bundles

from seqshare.bundle import crypto
from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.daemon.notify import watchdog_interval
from seqshare.jobqueue.client import Client
from seqshare.jobqueue.payload import Question
from seqshare.worker.params import SamplingParams

WATCHDOG_S = 2.0  # WatchdogSec=: the deadline systemd would enforce; pings come every 1 s
STALL_S = 3.0  # no progress for this long while a job runs: pings stop
HANG_MS = 7000  # the debug hang of the first job: pings must stay away for more than WATCHDOG_S


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_bundles(tmp_path_factory)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def _setup(tmp: Path, bundles: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    """Model `a` encrypted (key as a systemd credential), model `b` plain in a file we may rewrite."""
    creds = tmp / "credentials"
    creds.mkdir()
    key_file = creds / crypto.CREDENTIAL
    crypto.generate_key_file(key_file)
    enc = tmp / "a.enc.bundle"
    crypto.encrypt_file(bundles["a"], enc, crypto.parse_key(key_file.read_bytes(), "key"))
    b = tmp / "b.bundle"
    b.write_bytes(bundles["b"].read_bytes())
    cfg = tmp / "worker.toml"
    cfg.write_text(f"""
threads = 1
max_batch = 16
[[models]]
name = "a"
path = "{enc}"
[[models]]
name = "b"
path = "{b}"
[cache]
memory_bytes = 67108864
disk_bytes = 67108864
directory = "{tmp / 'cache'}"
[memory]
plan_path = "{tmp / 'memory-plan.json'}"
scratch_bytes = 16777216
""")
    return cfg, {"CREDENTIALS_DIRECTORY": str(creds)}


def _ask(client: Client, model: str, doc: str, n: int = 1, tokens: int = 4) -> dict:
    qs = [Question(custom_id=f"q{i}", text=f"What jumps over the dog {i}?",
                   params=SamplingParams(max_new_tokens=tokens)) for i in range(n)]
    return client.submit(doc, qs, model=model).wait(120)


def _reload(proc: subprocess.Popen[bytes], tmp: Path) -> subprocess.CompletedProcess[str]:
    """What the unit's ExecReload= runs: signal the worker, wait for its outcome."""
    return run_cli("reload", "--pid", str(proc.pid), "--state-dir", str(tmp / "run"), "--timeout", "60")


def _sigterm_and_wait(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_worker_speaks_sd_notify(redis_url: str, bundles: dict[str, Path], tmp_path: Path,
                                 notify: NotifySocket) -> None:
    cfg, cred_env = _setup(tmp_path, bundles)
    setup = run_cli("memory-setup", "--config", str(cfg), env=cred_env)
    assert setup.returncode == 0, setup.stderr
    env = {**os.environ, **WORKER_ENV, **cred_env, "SEQSHARE_HOME": str(tmp_path / "home"),
           "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
           "SEQSHARE_WATCHDOG_STALL_S": str(STALL_S), "SEQSHARE_DEBUG": "1", "SEQSHARE_DEBUG_HANG_MS": str(HANG_MS),
           "RUNTIME_DIRECTORY": str(tmp_path / "run")}  # as the unit's RuntimeDirectory= sets it
    (tmp_path / "run").mkdir()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([SEQSHARE, "worker", "--config", str(cfg), "--redis-url", redis_url,
                                 "--name", "nw"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            _life(proc, notify, redis_url, cfg, bundles, tmp_path)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text()
    assert "matches this configuration" in log  # the worker read memory-setup's plan for this config
    assert "debug hang: blocking in native code" in log and "withholding WATCHDOG=1" in log


def _life(proc: subprocess.Popen[bytes], notify: NotifySocket, url: str, cfg: Path,
          bundles: dict[str, Path], tmp: Path) -> None:
    conn = redis.Redis.from_url(url)
    client = Client(url)

    # --- start: more time asked while loading, READY=1 only once both models are loaded ---------------
    ready = notify.wait_for(lambda n: n.get("READY") == "1", 90, what="READY=1")
    published = {k.decode() for k in conn.hkeys("seqshare:models")}
    assert published == {"a", "b"}  # written from the loaded engines before READY=1 was sent
    before = [n for n in notify.snapshot() if n.t < ready.t]
    assert any(n.get("EXTEND_TIMEOUT_USEC") for n in before), before
    assert all(n.get("READY") is None for n in before)
    assert "models: a, b" in (ready.get("STATUS") or "") and "jobs done: 0" in (ready.get("STATUS") or "")

    # --- idle: WATCHDOG=1 well within WatchdogSec ------------------------------------------------------
    time.sleep(2.5)
    idle_end = time.monotonic()
    pings = [n.t for n in notify.with_key("WATCHDOG")]
    assert max_gap(pings, ready.t, idle_end) < WATCHDOG_S

    # --- the first job hangs in a native call: pings stop for longer than WatchdogSec, then resume ---
    t0 = time.monotonic()
    hung = _ask(client, "a", DOCS[0])
    t1 = time.monotonic()
    assert t1 - t0 >= HANG_MS / 1000 and hung["prefix"] == "miss"
    silence = max_gap([n.t for n in notify.with_key("WATCHDOG")], t0, t1)
    assert silence > WATCHDOG_S, f"pings went on during the hang (longest gap {silence:.2f} s)"
    assert silence >= HANG_MS / 1000 - STALL_S - 1.5
    stalled = [n for n in notify.with_key("STATUS", t0, t1) if (n.get("STATUS") or "").startswith("stalled")]
    assert stalled, "no 'stalled' STATUS during the hang"
    resumed = notify.wait_for(lambda n: n.get("WATCHDOG") == "1", 5, after=stalled[0].t, what="pings resuming")
    # While stalled, every status line says so (the worker's periodic line cannot hide it).
    while_stalled = notify.with_key("STATUS", stalled[0].t, resumed.t - 0.05)
    assert all((n.get("STATUS") or "").startswith("stalled") for n in while_stalled)

    # --- working: pings on time through prefill and decode of 6 groups of 16 long answers ------------
    w0 = time.monotonic()
    qs = [Question(custom_id=f"q{i}", text=f"Question {i}?", params=SamplingParams(max_new_tokens=300))
          for i in range(16)]
    handles = [client.submit(doc, qs, model=m) for m in ("b", "a") for doc in DOCS]
    results = [h.wait(300) for h in handles]
    w1 = time.monotonic()
    assert [r["prefix"] for r in results] == ["miss"] * 3 + ["hit", "miss", "miss"]
    assert max_gap([n.t for n in notify.with_key("WATCHDOG")], w0, w1) < WATCHDOG_S
    status = notify.wait_for(lambda n: "jobs done: 7" in (n.get("STATUS") or ""), 10, what="STATUS with 7 jobs")
    assert "cached prefixes: 6" in (status.get("STATUS") or "")

    # --- reload (ExecReload=: `seqshare reload`): b's bundle was rebuilt with other limits; a is
    # untouched and keeps its prefix; the command returns once the worker has reloaded --------------
    b_path = tmp / "b.bundle"
    write_bundle(load_checkpoint(bundles["hf"], "f16", 32), b_path, Limits(150, 40, 300))
    h0 = time.monotonic()
    reload = _reload(proc, tmp)
    assert reload.returncode == 0 and "loaded b; kept a" in reload.stdout, reload.stdout + reload.stderr
    reloading = notify.wait_for(lambda n: n.get("RELOADING") == "1", 1, after=h0, what="RELOADING=1")
    assert reloading.get("MONOTONIC_USEC")
    done = notify.wait_for(lambda n: n.get("READY") == "1", 1, after=reloading.t, what="READY=1 after reload")
    assert "loaded b; kept a" in (done.get("STATUS") or "") and "cached prefixes: 3" in (done.get("STATUS") or "")
    assert b'"seq_length": 300' in conn.hget("seqshare:models", "b")
    assert _ask(client, "a", DOCS[0])["prefix"] == "hit"  # a's engine and cache were kept
    assert _ask(client, "b", DOCS[1])["prefix"] == "miss"  # b was loaded again, with an empty cache

    # --- a broken config: the reload command fails, READY=1 again, nothing changes, and the STATUS
    # line keeps saying so (also in the periodic updates) until a reload succeeds ------------------------
    good = cfg.read_text()
    cfg.write_text(good + "\nthis is not toml =\n")
    h1 = time.monotonic()
    reload = _reload(proc, tmp)
    assert reload.returncode == 1 and "reload failed" in reload.stderr, reload.stdout + reload.stderr
    notify.wait_for(lambda n: n.get("RELOADING") == "1", 1, after=h1, what="second RELOADING=1")
    failed = notify.wait_for(lambda n: n.get("READY") == "1", 1, after=h1, what="READY=1 after a failed reload")
    assert (failed.get("STATUS") or "").startswith("reload failed")
    assert _ask(client, "a", DOCS[0])["prefix"] == "hit"
    later = notify.wait_for(lambda n: "jobs done: 10" in (n.get("STATUS") or ""), 10, after=failed.t,
                            what="a periodic STATUS after the failed reload")
    assert (later.get("STATUS") or "").startswith("reload failed")
    cfg.write_text(good)
    h2 = time.monotonic()
    assert _reload(proc, tmp).returncode == 0
    ok = notify.wait_for(lambda n: n.get("READY") == "1", 1, after=h2, what="READY=1 after the fixed reload")
    assert "reload failed" not in (ok.get("STATUS") or "") and "kept a, b" in (ok.get("STATUS") or "")

    # --- SIGTERM: STOPPING=1, exit 0 -----------------------------------------------------------------
    s0 = time.monotonic()
    assert _sigterm_and_wait(proc) == 0
    assert notify.wait_for(lambda n: n.get("STOPPING") == "1", 5, after=s0, what="STOPPING=1")


def test_watchdog_is_not_ours_when_watchdog_pid_names_another_process() -> None:
    # systemd sets WATCHDOG_PID to the main process; a child that inherited the variables must not ping.
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({}) is None
