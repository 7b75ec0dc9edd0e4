"""Who is dead: the local process check and the heartbeat, with workers that cannot see each other.

A worker's pid means something only in its own PID namespace. Workers in containers, in separate PID
namespaces or under ProtectProc=invisible (systemd units with PrivateUsers=yes) share a host name
but cannot see each other's processes; they must judge each other by heartbeat alone and never take
"not visible" for "dead". The real case runs a second worker under `unshare --pid --fork --mount-proc`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from queue_helpers import (
    DOCS,
    Gate,
    WorkerProc,
    read_jsonl,
    start_qa,
    unshare_unavailable,
    wait_until,
    write_qa_input,
)
from rq.results import Result

from seqshare.jobqueue.client import Client
from seqshare.jobqueue.recovery import ProcEntry, local_verdict, proc_entry, recover_dead
from seqshare.jobqueue.routing import Keys
from seqshare.worker.params import SamplingParams

SHORT = SamplingParams(max_new_tokens=4)
# --kill-child: the worker (pid 1 of the namespace) must not outlive a test that fails half way.
UNSHARE = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")


# --- the local verdict ---------------------------------------------------------------------------------
def test_this_process_is_provably_alive_and_its_entry_round_trips() -> None:
    me = proc_entry()
    assert me.pid == os.getpid() and me.boot and me.pidns.startswith("pid:[") and me.start
    assert ProcEntry.parse(str(me)) == me
    assert local_verdict(me) is True


def test_a_pid_that_is_gone_is_provably_dead() -> None:
    child = subprocess.Popen(["true"])
    entry = proc_entry(child.pid)
    child.wait()
    assert local_verdict(entry) is False


def test_a_reused_pid_is_dead_an_unreadable_one_is_no_verdict() -> None:
    me = proc_entry()
    assert local_verdict(ProcEntry(me.host, me.boot, me.pidns, me.pid, str(int(me.start) + 1))) is False
    # As under ProtectProc=invisible: the pid exists, its start time cannot be read.
    assert local_verdict(ProcEntry(me.host, me.boot, me.pidns, me.pid, "")) is None


def test_another_pid_namespace_or_boot_gives_no_verdict() -> None:
    me = proc_entry()
    assert local_verdict(ProcEntry(me.host, me.boot, "pid:[1]", me.pid, me.start)) is None
    assert local_verdict(ProcEntry(me.host, "another-boot", me.pidns, me.pid, me.start)) is None
    assert ProcEntry.parse(f"{me.host} {me.pid} {me.start}") is None  # what an older version wrote


# --- workers that cannot see each other ------------------------------------------------------------------
def _namespace_init(wrapper: subprocess.Popen[bytes]) -> int:
    """The host pid of the process `unshare --fork` started (pid 1 of its namespace)."""
    children = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children")
    return int(wait_until(lambda: children.read_text().split(), what="unshare's child")[0])


def test_workers_in_separate_pid_namespaces_never_take_each_other_for_dead(redis_url: str, tiny_bundle: Path,
                                                                           tmp_path: Path) -> None:
    if (why := unshare_unavailable(*UNSHARE[1:])) is not None:
        pytest.skip(why)
    conn = redis.Redis.from_url(redis_url)
    host = WorkerProc(redis_url, tiny_bundle, tmp_path, "host-w").wait_ready()
    boxed = WorkerProc(redis_url, tiny_bundle, tmp_path, "boxed-w", wrap=UNSHARE).wait_ready()
    try:
        # Same host name, different PID namespaces: the boxed worker's pid means another process here.
        assert ProcEntry.parse(conn.hget("seqshare:procs", "boxed-w")).pidns != proc_entry().pidns  # type: ignore[arg-type, union-attr]
        assert recover_dead(conn, Keys(), "test-process", max_retries=3) == []
        # Each worker has looked for dead peers at least once while the other ran.
        since = time.time()
        for name in ("host-w", "boxed-w"):
            wait_until(lambda n=name: float(conn.hget(f"seqshare:worker:{n}", "peers_checked_at") or 0) > since,
                       what=f"{name} to look for dead peers")
        inp = tmp_path / "in.jsonl"
        docs = [f"{DOCS[i % len(DOCS)]} Part {i}." for i in range(4)]
        ids = write_qa_input(inp, docs, 5, max_new_tokens=6)
        qa = start_qa(redis_url, inp, tmp_path / "out.jsonl")
        _, err = qa.communicate(timeout=120)
        assert qa.returncode == 0, err
        rows = read_jsonl(tmp_path / "out.jsonl")
        assert sorted(r["custom_id"] for r in rows) == sorted(ids)
        for job_id in {r["job_id"] for r in rows}:  # nothing ran twice
            assert conn.xlen(Result.get_key(job_id)) == 1
        for w in (host, boxed):
            assert "is dead" not in w.log() and "already had a result" not in w.log(), w.log()
        assert {m.decode() for m in conn.smembers("seqshare:workers")} == {"host-w", "boxed-w"}

        # Killed with -9, the boxed worker cannot be proven dead from here: its heartbeat expires and the
        # host worker brings its held job back and answers it.
        gate = Gate(conn).close(after_questions=0)
        client = Client(redis_url)
        job = None
        for attempt in range(8):  # until the boxed worker is the one that takes a job
            h = client.submit(f"{DOCS[0]} Kill {attempt}.", [("k", "Who?")], params=SHORT)
            if gate.holder(h.id) == "boxed-w":
                job = h
                break
            gate.let_through(h.id)
            h.wait(30)
        assert job is not None, "the boxed worker never took a job"
        os.kill(_namespace_init(boxed.proc), signal.SIGKILL)
        boxed.proc.wait(10)
        gate.forget(job.id)
        gate.open()
        assert job.wait(60)["worker"] == "host-w"
        assert "worker boxed-w is dead" in host.log()
    finally:
        host.stop()
        if boxed.proc.poll() is None:  # unshare does not pass SIGTERM on: stop the worker itself
            os.kill(_namespace_init(boxed.proc), signal.SIGTERM)
        boxed.stop()


def test_a_restart_under_the_same_name_in_another_pid_namespace_takes_back_the_jobs(
        redis_url: str, tiny_bundle: Path, tmp_path: Path) -> None:
    """A restarted container: the new process cannot judge its predecessor's pid, so it waits out the
    liveness TTL instead of refusing to start (exit 78, which systemd would not restart)."""
    if (why := unshare_unavailable(*UNSHARE[1:])) is not None:
        pytest.skip(why)
    conn = redis.Redis.from_url(redis_url)
    gate = Gate(conn).close(after_questions=0)
    (tmp_path / "one").mkdir()
    first = WorkerProc(redis_url, tiny_bundle, tmp_path / "one", "same", wrap=UNSHARE).wait_ready()
    job = Client(redis_url).submit(DOCS[0], [("q", "Who?")], params=SHORT)
    assert gate.holder(job.id) == "same"
    os.kill(_namespace_init(first.proc), signal.SIGKILL)
    first.proc.wait(10)
    gate.forget(job.id)
    gate.open()
    (tmp_path / "two").mkdir()
    again = WorkerProc(redis_url, tiny_bundle, tmp_path / "two", "same").wait_ready(timeout=60)
    try:
        assert job.wait(60)["worker"] == "same"
        assert "an earlier worker named same died: requeued 1" in again.log()
        assert conn.xlen(Result.get_key(job.id)) == 1
    finally:
        again.stop()
