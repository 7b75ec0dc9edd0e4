"""Faults with the worker in a real process: kill -9 mid-run, Redis restarting mid-run.

Each test runs `seqshare qa` on 30 questions (3 documents x 10, so 3 jobs; answers of staggered
lengths, so progress shows how far a job is) and checks that every answer arrives exactly once: 30
output lines with 30 distinct custom_ids, no errors, one stored result per job, and the job counters
counted once each. "Mid-run" is made by the worker's test gate (queue_helpers.Gate), not by the
jobs being slow: one job is let through to the end, the next is held after its first answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from queue_helpers import DOCS, SEQSHARE, Gate, WorkerProc, read_jsonl, start_qa, wait_until, write_qa_input
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from seqshare.daemon.redis_server import ENV_URL, EmbeddedRedis
from seqshare.jobqueue.claims import CRASHES_FIELD
from seqshare.jobqueue.client import Client, JobHandle
from seqshare.jobqueue.recovery import recover_dead
from seqshare.jobqueue.routing import Keys
from seqshare.worker.params import SamplingParams

# Answers of 64 down to 19 tokens: a job's questions finish one after another (the gate counts them).
N_DOCS, PER_DOC, TOKENS = 3, 10, 64
SHORT = SamplingParams(max_new_tokens=4)
EXEC_TTL_S = 3  # the workers' liveness and execution TTL with SEQSHARE_HEARTBEAT_S=0.5 (queue_helpers)


def thirty_questions(tmp_path: Path) -> tuple[Path, list[str]]:
    docs = [f"{DOCS[i % len(DOCS)]} Report {i}." for i in range(N_DOCS)]
    path = tmp_path / "in.jsonl"
    return path, write_qa_input(path, docs, PER_DOC, max_new_tokens=TOKENS, stagger=5)


def mid_run(conn: redis.Redis, gate: Gate) -> str:
    """With the gate closed after one answer: let the first job finish, hold the next one; its id."""
    first = gate.wait_held()
    gate.let_through(first)
    wait_until(lambda: conn.hget(Job.key_for(first), "status") == b"finished", what="the first job to finish")
    return wait_until(lambda: next((j for j in gate.held() if j != first), None), what="a second job held")


def assert_each_answer_once(conn: redis.Redis, out: Path, ids: list[str], qa_stderr: str) -> list[dict]:
    rows = read_jsonl(out)
    got = [r["custom_id"] for r in rows]
    assert sorted(got) == sorted(ids), f"missing {set(ids) - set(got)}, extra {len(got) - len(set(got))}"
    assert not read_jsonl(out.with_name(out.stem + ".errors.jsonl")), qa_stderr
    jobs = {r["job_id"] for r in rows}
    assert len(jobs) == N_DOCS
    for job_id in jobs:  # one stored result per job: no job's answers were stored twice
        assert conn.xlen(Result.get_key(job_id)) == 1
    totals = {k.decode(): int(v) for k, v in conn.hgetall("seqshare:totals").items()}
    assert totals["jobs_done"] == N_DOCS and totals["questions"] == len(ids)
    assert not conn.keys("seqshare:claimed:*")
    assert conn.llen("rq:queue:seqshare") == 0
    assert StartedJobRegistry("seqshare", connection=conn).get_job_ids(cleanup=False) == []
    return rows


@pytest.mark.parametrize("restart_as, rq_cleanup_first", [("w1", True), ("w2", False)],
                         ids=["same-name-after-rq-cleanup", "new-name"])
def test_kill9_mid_run_then_restart_every_answer_arrives_once(redis_url: str, tiny_bundle: Path, tmp_path: Path,
                                                              restart_as: str, rq_cleanup_first: bool) -> None:
    """Killed mid-job, the job is brought back and answered once.

    `same-name`: the restarted process (as under systemd with a configured name) takes back what its
    dead predecessor left; before it starts, an operator's rq tooling has run rq's own abandoned-job
    cleanup (here through `seqshare status`), which requeues the job too (it has retries left): it
    must still run, and be stored, once.
    `new-name`: a new process with another name recovers the dead worker's jobs as a peer.
    """
    conn = redis.Redis.from_url(redis_url)
    inp, ids = thirty_questions(tmp_path)
    out = tmp_path / "out.jsonl"
    gate = Gate(conn).close(after_questions=1)
    w1 = WorkerProc(redis_url, tiny_bundle, tmp_path, "w1").wait_ready()
    qa = start_qa(redis_url, inp, out)
    try:
        in_flight = mid_run(conn, gate)
        w1.kill9()
        gate.open()
        assert conn.hget(Job.key_for(in_flight), "status") == b"started"
        assert conn.lrange("seqshare:claimed:w1", 0, -1) == [in_flight.encode()]
        if rq_cleanup_first:
            time.sleep(EXEC_TTL_S + 0.5)  # the dead worker's execution expires
            seen = subprocess.run([SEQSHARE, "status", "--json", "--redis-url", redis_url], capture_output=True,
                                  text=True, timeout=60)  # counting runs rq's abandoned-job cleanup
            assert seen.returncode == 0, seen.stderr
            assert json.loads(seen.stdout)["queues"]["seqshare"]["started"] == 0
            assert conn.hget(Job.key_for(in_flight), "status") == b"queued"  # requeued by rq, not failed
            assert conn.lrange("rq:queue:seqshare", 0, -1).count(in_flight.encode()) == 1
        w2 = WorkerProc(redis_url, tiny_bundle, tmp_path, restart_as).wait_ready()
        try:
            _, err = qa.communicate(timeout=120)
            assert qa.returncode == 0, err
        finally:
            w2.stop()
    finally:
        if qa.poll() is None:
            qa.kill()
        w1.stop()
    rows = assert_each_answer_once(conn, out, ids, err)
    assert {r["worker"] for r in rows if r["job_id"] == in_flight} == {restart_as}
    assert conn.hget(Job.key_for(in_flight), CRASHES_FIELD) == b"1"
    assert conn.smembers("seqshare:workers") == set()  # both stopped or recovered


def test_a_job_that_kills_every_worker_fails_after_max_retries(redis_url: str, tiny_bundle: Path,
                                                               tmp_path: Path) -> None:
    """A poison job must not take workers down forever: after queue.max_retries crashes it fails by name."""
    conn = redis.Redis.from_url(redis_url)
    client = Client(redis_url)
    env = {"SEQSHARE_QUEUE__MAX_RETRIES": "1"}
    gate = Gate(conn).close(after_questions=0)
    jid = client.submit(DOCS[0], [(f"q{i}", "Why?") for i in range(8)], params=SHORT).id
    for attempt in range(2):
        name = f"c{attempt}"
        w = WorkerProc(redis_url, tiny_bundle, tmp_path, name, env=env).wait_ready()
        gate.wait_held(jid, worker=name)
        w.kill9()
        gate.forget(jid)
    gate.open()
    survivor = WorkerProc(redis_url, tiny_bundle, tmp_path, "c2", env=env).wait_ready()
    try:
        wait_until(lambda: conn.hget(Job.key_for(jid), "status") == b"failed", what="the job to fail")
        reason = Job.fetch(jid, connection=conn, serializer=JSONSerializer).meta["error"]
        assert reason["type"] == "WorkerCrashedError" and "died 2 times" in reason["message"]
        # and the survivor keeps serving
        assert client.submit(DOCS[1], [("ok", "Who?")], params=SHORT).wait(30)["answers"][0]["answer"]
    finally:
        survivor.stop()


def test_redis_restart_mid_run_worker_reconnects_and_nothing_is_lost(tiny_bundle: Path, tmp_path: Path) -> None:
    """Redis (persisting with AOF, as a production Redis would) goes away for longer than the workers'
    liveness TTL while jobs run; the worker process rides it out and every answer arrives once."""
    if os.environ.get(ENV_URL):
        pytest.skip(f"restarts its own embedded Redis; {ENV_URL} points elsewhere")
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()
    conn = redis.Redis.from_url(server.url)
    inp, ids = thirty_questions(tmp_path)
    out = tmp_path / "out.jsonl"
    gate = Gate(conn).close(after_questions=1)
    worker = WorkerProc(server.url, tiny_bundle, tmp_path, "w1").wait_ready()
    qa = start_qa(server.url, inp, out)
    try:
        mid_run(conn, gate)
        server.stop()  # the held job stays held through the outage (the hold key is in the AOF)
        time.sleep(EXEC_TTL_S + 1)  # the liveness hash expires during the outage
        server.start()
        gate.open()
        _, err = qa.communicate(timeout=120)
        assert qa.returncode == 0, err
        assert worker.proc.poll() is None, worker.log()  # the same process, still serving
        assert_each_answer_once(conn, out, ids, err)
        wait_until(lambda: conn.exists("seqshare:worker:w1"), timeout=10, what="the worker to publish again")
        assert conn.sismember("seqshare:workers", "w1")
        again = Client(server.url).submit(DOCS[0], [("after", "Who?")], params=SHORT).wait(30)
        assert again["worker"] == "w1"
    finally:
        if qa.poll() is None:
            qa.kill()
        worker.signal(signal.SIGTERM)
        worker.stop()
        server.stop()


def test_a_job_running_longer_than_the_liveness_ttl_is_not_taken_for_abandoned(redis_url: str, tiny_bundle: Path,
                                                                                tmp_path: Path) -> None:
    """The heartbeat thread keeps the execution, the liveness hash and the job alive while the main
    thread computes: rq's cleanup and a peer's recovery, run in the middle of it, leave it alone."""
    conn = redis.Redis.from_url(redis_url)
    client = Client(redis_url)
    gate = Gate(conn).close(after_questions=1)
    w = WorkerProc(redis_url, tiny_bundle, tmp_path, "w1").wait_ready()
    try:
        jid = client.submit(DOCS[0], [(f"q{i}", f"Question {i}?") for i in range(8)], params=SHORT).id
        gate.wait_held(jid)  # running, by construction, for as long as the test needs
        time.sleep(EXEC_TTL_S + 1)  # longer than the execution and liveness TTLs
        assert conn.hget(Job.key_for(jid), "status") == b"started"
        StartedJobRegistry("seqshare", connection=conn, serializer=JSONSerializer).cleanup()  # as `rq info` does
        recover_dead(conn, Keys(), "a-peer", max_retries=3)
        assert conn.hget(Job.key_for(jid), "status") == b"started"
        assert conn.llen("rq:queue:seqshare") == 0 and conn.sismember("seqshare:workers", "w1")
        res = client.submit(DOCS[1], [("after", "Who?")], params=SHORT)  # queued behind the held job
        gate.open()
        assert len(JobHandle(jid, conn).wait(120)["answers"]) == 8
        assert res.wait(30)["worker"] == "w1"
        assert conn.xlen(Result.get_key(jid)) == 1 and conn.hget(Job.key_for(jid), CRASHES_FIELD) is None
    finally:
        w.stop()


def test_sigterm_while_redis_is_down_exits_0_and_the_restarted_worker_answers(tiny_bundle: Path,
                                                                              tmp_path: Path) -> None:
    """An outage must not make the worker unstoppable: it exits 0 on SIGTERM without Redis (systemd
    would otherwise kill it), and a worker started when Redis is back finds the queued work."""
    if os.environ.get(ENV_URL):
        pytest.skip(f"stops its own embedded Redis; {ENV_URL} points elsewhere")
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()
    worker = WorkerProc(server.url, tiny_bundle, tmp_path, "w1").wait_ready()
    try:
        server.stop()
        wait_until(lambda: "Redis unreachable" in worker.log(), what="the worker to notice the outage")
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log()
        server.start()
        handle = Client(server.url).submit(DOCS[0], [("q", "Who?")], params=SHORT)
        w2 = WorkerProc(server.url, tiny_bundle, tmp_path, "w1").wait_ready()  # same name: nothing blocks it
        try:
            assert handle.wait(30)["worker"] == "w1"
        finally:
            w2.stop()
    finally:
        worker.stop()
        server.stop()
