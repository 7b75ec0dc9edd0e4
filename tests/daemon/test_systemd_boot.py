"""seqshare under a real systemd: install the README's way, then drive it through systemctl,
journalctl and the seqshare CLI only.

A container boots this machine's root with systemd as PID 1 (tests/nspawn.py). Inside it,
scripts/install-service.sh installs the units for the test's venv, the model key becomes a systemd
credential, and two worker instances run the shipped units with all their hardening
(ProtectProc=invisible and PrivateUsers=yes included: the instances cannot see each other's
processes). The one allowance is a drop-in that lets the units reach this venv's Python where it lives
under /root (ProtectHome=tmpfs plus a read-only bind), shortens the heartbeat so a dead peer is
noticed in seconds, and turns on the test gate (queue_helpers.Gate) so "mid-job" is made, not hoped for.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from nspawn import Container, unavailable
from queue_helpers import DOCS, Gate, compile_tiny_bundle, wait_until, write_qa_input

from seqshare.bundle import crypto

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "")

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
SEQSHARE = str(VENV / "bin/seqshare")
INSTANCES = ("a", "b")
WORK = "/root/seqshare-test"  # inside the container: the test's files (in its overlay, gone at poweroff)


def _outside_paths() -> tuple[Path, ...]:
    """What the units and the test run from: this venv, its base Python and the checkout, each once
    (a folder inside another is covered by it)."""
    paths = sorted({Path(sys.base_prefix).resolve(), REPO, VENV.resolve()})
    return tuple(p for p in paths if not any(q != p and p.is_relative_to(q) for q in paths))


def _drop_in() -> str:
    # The units say ProtectHome=yes and PrivateTmp=yes; this venv's python may live under /root
    # (pyenv) and the checkout under /tmp or /root (CI's clone). Bind exactly those read-only.
    lines = ["[Service]", "ProtectHome=tmpfs"]
    lines += [f"BindReadOnlyPaths={p}" for p in _outside_paths()]
    return "\n".join(lines) + "\n"


def _config(bundle: str) -> str:
    return f"""threads = 1
max_batch = 8
[[models]]
name = "tiny"
path = "{bundle}"
[cache]
memory_bytes = 67108864
disk_bytes = 67108864
[memory]
workers = 2
scratch_bytes = 16777216
"""


class Box:
    """The container with seqshare installed and running; helpers to act as an operator."""

    def __init__(self, c: Container, names: dict[str, str]):
        self.c, self.names = c, names
        env = self.c.path("/etc/seqshare/worker.env").read_text()
        self.url = re.search(r"^SEQSHARE_REDIS_URL=(\S+)$", env, re.M)[1]  # type: ignore[index]
        password = re.search(r"unix://seqshare:([^@]+)@", self.url)[1]  # type: ignore[index]
        # The test's own view of the queue, through the container's socket.
        self.conn = redis.Redis(unix_socket_path=str(self.c.path("/run/seqshare-redis/redis.sock")),
                                username="seqshare", password=password)
        self.gate = Gate(self.conn)

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.c.run("systemctl", *args, check=check).stdout

    def seqshare(self, *args: str, check: bool = True, timeout: float = 120) -> tuple[int, str, str]:
        out = self.c.run(SEQSHARE, *args, env={"SEQSHARE_REDIS_URL": self.url, "HOME": "/root"}, check=check,
                         timeout=timeout)
        return out.returncode, out.stdout, out.stderr

    def journal(self, unit: str, *matches: str) -> list[dict[str, str]]:
        out = self.c.run("journalctl", "--no-pager", "-o", "json", "-u", unit, *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def messages(self, unit: str, *matches: str) -> list[str]:
        return [str(r.get("MESSAGE", "")) for r in self.journal(unit, *matches)]

    def active(self, unit: str) -> str:
        return self.systemctl("is-active", unit, check=False).strip()

    def status_text(self, unit: str) -> str:
        return self.systemctl("show", "-p", "StatusText", "--value", unit).strip()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    host_tmp = tmp_path_factory.mktemp("systemd-boot")
    bundle = compile_tiny_bundle(host_tmp)
    key_file = host_tmp / "model.key"
    crypto.generate_key_file(key_file)
    encrypted = host_tmp / "tiny.bundle"
    crypto.encrypt_file(bundle, encrypted, crypto.parse_key(key_file.read_bytes(), "key"))
    c = Container("seqshare-test", binds=_outside_paths())
    try:
        c.boot()
        work = c.path(WORK)
        work.mkdir(parents=True)
        (work / "model.key").write_bytes(key_file.read_bytes())
        (work / "tiny.bundle").write_bytes(encrypted.read_bytes())
        (work / "worker.toml").write_text(_config("/var/lib/seqshare/models/tiny.bundle"))
        # --- install the README's way ---
        c.run(str(REPO / "scripts/install-service.sh"), "--prefix", str(VENV))
        c.run("install", "-m", "0640", "-o", "seqshare", "-g", "seqshare", f"{WORK}/tiny.bundle",
              "/var/lib/seqshare/models/tiny.bundle")
        c.run("install", "-m", "0640", "-o", "root", "-g", "seqshare", f"{WORK}/worker.toml",
              "/etc/seqshare/worker.toml")
        c.run("systemd-creds", "encrypt", "--name=seqshare-model-key", f"{WORK}/model.key",
              "/etc/credstore.encrypted/seqshare-model-key")
        for unit in ("seqshare-worker@.service", "seqshare-memory-setup.service"):
            d = c.path(f"/etc/systemd/system/{unit}.d")
            d.mkdir()
            extra = ("Environment=SEQSHARE_HEARTBEAT_S=0.5 SEQSHARE_TEST_HOLD=1\n"
                     if unit.startswith("seqshare-worker") else "")
            (d / "test.conf").write_text(_drop_in() + extra)
        c.run("systemctl", "daemon-reload")
        c.run("systemctl", "enable", "--now", "seqshare-redis.service")
        c.run("systemctl", "start", *[f"seqshare-worker@{i}.service" for i in INSTANCES], timeout=180)
        host = c.run("hostname").stdout.strip()
        b = Box(c, {i: f"{host}-{i}" for i in INSTANCES})
        for i in INSTANCES:
            assert b.active(f"seqshare-worker@{i}") == "active", b.c.run(
                "journalctl", "--no-pager", "-u", f"seqshare-worker@{i}", check=False).stdout[-3000:]
        yield b
    finally:
        c.close()


def _unit(i: str) -> str:
    return f"seqshare-worker@{i}.service"


def test_two_instances_serve_a_qa_run_with_nothing_run_twice(box: Box) -> None:
    # memory-setup ran, and succeeded, before the workers (Requires= and After= in the worker unit).
    setup = box.systemctl("show", "-p", "Result,ExecMainStatus,InactiveEnterTimestampMonotonic",
                          "seqshare-memory-setup.service")
    assert "Result=success" in setup and "ExecMainStatus=0" in setup, setup
    ran = int(setup.split("InactiveEnterTimestampMonotonic=")[1].split()[0])
    for i in INSTANCES:
        started = box.systemctl("show", "-p", "ExecMainStartTimestampMonotonic", "--value", _unit(i))
        assert 0 < ran <= int(started), (ran, started)
    # The shipped sandbox: neither instance can see the other's process.
    for i in INSTANCES:
        shown = box.systemctl("show", "-p", "ProtectProc,PrivateUsers", _unit(i))
        assert "ProtectProc=invisible" in shown and "PrivateUsers=yes" in shown
    # Both have looked for dead peers at least once while the other ran (their hashes say when).
    since = time.time()
    for name in box.names.values():
        wait_until(lambda n=name: float(box.conn.hget(f"seqshare:worker:{n}", "peers_checked_at") or 0) > since,
                   what=f"{name} to look for dead peers")
    # Both serve, by construction: with the gate closed, a worker holds the first job it claims and
    # cannot claim another (jobs on other documents are never batched with it), so the second job of
    # another document must be claimed by the other worker.
    box.gate.close(after_questions=0)
    held = []
    for d in range(2):
        _, out, _ = box.seqshare("submit", "--context", f"{DOCS[d]} Held {d}.", "-q", "Who?", "--max-new-tokens",
                                 "3", "--no-wait", "--json")
        held.append(json.loads(out)["job_id"])
    assert {box.gate.holder(j) for j in held} == set(box.names.values())
    box.gate.open()
    for job_id in held:
        code, out, err = box.seqshare("result", job_id, "--json", "--timeout", "60", check=False)
        assert code == 0, out + err
    docs = [f"{DOCS[d % len(DOCS)]} Part {d}." for d in range(6)]
    ids = write_qa_input(box.c.path(f"{WORK}/in.jsonl"), docs, 4)
    code, _, err = box.seqshare("qa", f"{WORK}/in.jsonl", "--out", f"{WORK}/out.jsonl", "--timeout", "120", "--quiet")
    assert code == 0, err
    rows = [json.loads(x) for x in box.c.path(f"{WORK}/out.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)
    for i in INSTANCES:
        log = "\n".join(box.messages(_unit(i)))
        assert "is dead" not in log and "already had a result" not in log, log[-3000:]
    # The job's journal lines are found by the fields the README names, with the hash `submit` shows.
    code, out, err = box.seqshare("submit", "--context", DOCS[0], "-q", "Who?", "--max-new-tokens", "3", "--json",
                                  "--timeout", "60")
    assert code == 0, err
    result = json.loads(out)
    unit = _unit(next(i for i, n in box.names.items() if n == result["worker"]))
    lines = box.messages(unit, f"SEQSHARE_JOB_ID={result['job_id']}")
    assert len(lines) == 2 and "started" in lines[0] and "finished" in lines[1], lines
    assert len(box.messages(unit, f"SEQSHARE_CONTEXT_HASH={result['context_hash']}")) >= 1
    # rq's own view counts the jobs too.
    finished = sum(int(box.conn.hget(f"rq:worker:{n}", "successful_job_count") or 0) for n in box.names.values())
    assert finished == int(box.conn.hget("seqshare:totals", "jobs_done") or 0) >= 9


def test_kill9_of_one_instance_mid_job_every_answer_arrives_once(box: Box) -> None:
    box.gate.close(after_questions=1)
    # One job (one document): wait until a worker holds it mid-job, then kill that worker.
    submit = box.seqshare("submit", "--context", f"{DOCS[1]} Kill.", "-q", "Who?", "-q", "What?", "-q", "Why?",
                          "--max-new-tokens", "8", "--no-wait", "--json")
    job_id = json.loads(submit[1])["job_id"]
    victim_name = box.gate.holder(job_id)
    victim = next(i for i, n in box.names.items() if n == victim_name)
    box.systemctl("kill", "-s", "KILL", _unit(victim))
    box.gate.forget(job_id)
    box.gate.open()
    code, out, err = box.seqshare("result", job_id, "--json", "--timeout", "120", check=False)
    assert code == 0, out + err
    assert len(json.loads(out)["answers"]) == 3
    assert box.conn.xlen(f"rq:results:{job_id}") == 1
    # systemd restarts the killed instance (Restart=on-failure).
    wait_until(lambda: box.active(_unit(victim)) == "active", timeout=60, what="the restart")


def test_reload_reports_success_and_failure_to_systemctl(box: Box) -> None:
    unit = _unit("a")
    ok = box.c.run("systemctl", "reload", unit, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "last reload: loaded none; kept tiny" in box.status_text(unit)
    config = box.c.path("/etc/seqshare/worker.toml")
    good = config.read_text()
    config.write_text(good + "\nthis is not toml =\n")
    try:
        bad = box.c.run("systemctl", "reload", unit, check=False)
        assert bad.returncode != 0, bad.stdout + bad.stderr
        assert box.status_text(unit).startswith("reload failed")
        assert box.active(unit) == "active"  # still serving the previous configuration
    finally:
        config.write_text(good)
    assert box.c.run("systemctl", "reload", unit, check=False).returncode == 0
    assert not box.status_text(unit).startswith("reload failed")


def test_stop_drains_the_running_batch(box: Box) -> None:
    box.gate.close(after_questions=0)
    _, out, _ = box.seqshare("submit", "--context", f"{DOCS[2]} Drain.", "-q", "Who?", "--max-new-tokens", "4",
                             "--no-wait", "--json")
    job_id = json.loads(out)["job_id"]
    holder = box.gate.holder(job_id)
    instance = next(i for i, n in box.names.items() if n == holder)
    box.systemctl("stop", "--no-block", _unit(instance))
    wait_until(lambda: box.active(_unit(instance)) == "deactivating", what="the stop to begin")
    box.gate.open()
    wait_until(lambda: box.active(_unit(instance)) == "inactive", timeout=60, what="the stop to end")
    code, out, err = box.seqshare("result", job_id, "--json", "--timeout", "30", check=False)
    assert code == 0, out + err
    assert json.loads(out)["worker"] == holder  # finished by the stopping worker, not requeued
    assert box.conn.xlen(f"rq:results:{job_id}") == 1
