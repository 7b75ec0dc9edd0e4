"""The resident worker on a real embedded Redis and a tiny real bundle: results, refusals, signals."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
from queue_helpers import DOCS, Gate, WorkerProc, wait_until
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from seqshare.jobqueue.client import Client, JobHandle
from seqshare.jobqueue.executor import JOB_FUNCTION
from seqshare.jobqueue.payload import Question
from seqshare.jobqueue.resident import unique_name
from seqshare.worker.errors import JobFailedError, LimitExceededError
from seqshare.worker.params import SamplingParams

LONG_TOKENS = 330  # the tiny random model never stops early


def long_job(client: Client, n: int = 24) -> str:
    """A job that takes a while; its questions finish one after another (staggered answer lengths)."""
    qs = [Question(custom_id=f"q{i}", text=f"Question {i} about the fox?",
                   params=SamplingParams(max_new_tokens=LONG_TOKENS - (i % 24) * 10)) for i in range(n)]
    return client.submit(DOCS[0], qs).id


def test_round_trip_cache_hit_progress_and_rq_bookkeeping(redis_url: str, worker: WorkerProc) -> None:
    client = Client(redis_url)
    first = client.submit(DOCS[0], [("a", "What jumps?"), ("b", "Who sleeps?"), ("c", "What is brown?")],
                          params=SamplingParams(max_new_tokens=8))
    res = first.wait(30)
    assert [a["custom_id"] for a in res["answers"]] == ["a", "b", "c"]
    assert res["prefix"] == "miss" and res["worker"] == "w1"
    for a in res["answers"]:
        assert a["generated_tokens"] == 8 and a["context_tokens"] > 10 and a["question_tokens"] > 0
        assert a["total_s"] >= a["first_token_s"] >= 0 and a["cache_hit"] is False and a["answer"]
    again = client.submit(DOCS[0], [("d", "What jumps?")], params=SamplingParams(max_new_tokens=8)).wait(30)
    assert again["prefix"] == "hit" and again["answers"][0]["cache_hit"] is True
    # greedy on the same prefix: the same question gives the same answer
    assert again["answers"][0]["answer"] == res["answers"][0]["answer"]

    # progress in the job's meta while it runs (held at the gate after one answer), final figures when done
    conn = client.connection
    gate = Gate(conn).close(after_questions=1)
    jid = long_job(client)
    gate.wait_held(jid)
    seen = Job.fetch(jid, connection=conn, serializer=JSONSerializer).get_meta()["progress"]
    assert client.statuses([jid]) == ["started"]
    assert 1 <= seen["questions_done"] < 24 and seen["questions"] == 24 and seen["tokens_generated"] > 0
    gate.open()
    JobHandle(jid, conn).wait(60)
    final = Job.fetch(jid, connection=conn, serializer=JSONSerializer).get_meta()["progress"]
    assert final == {"questions_done": 24, "questions": 24,
                     "tokens_generated": sum(LONG_TOKENS - i * 10 for i in range(24))}

    # rq's own tools see our jobs and our worker, and count the jobs it finished
    assert first.id in FinishedJobRegistry("seqshare", connection=conn).get_job_ids()
    (me,) = [w for w in Worker.all(connection=conn) if w.name == "w1"]
    assert me.successful_job_count == 3 and me.failed_job_count == 0 and me.total_working_time > 0
    assert len(StartedJobRegistry("seqshare", connection=conn)) == 0


def test_bad_jobs_fail_with_their_reason_and_the_worker_goes_on(redis_url: str, worker: WorkerProc,
                                                               tmp_path: Path) -> None:
    conn = redis.Redis.from_url(redis_url)
    q = Queue("seqshare", connection=conn, serializer=JSONSerializer)
    marker = tmp_path / "pwned"
    foreign = q.enqueue("os.system", f"touch {marker}")
    malformed = q.enqueue(JOB_FUNCTION, {"context": 7, "questions": [], "extra": "TOPSECRET"})
    pickled = Queue("seqshare", connection=conn).enqueue(JOB_FUNCTION, {"context": "x"})
    client = Client(redis_url)
    too_long = client.submit(DOCS[1], [("ok", "Who?"), ("long", "The quick brown fox? " * 20)],
                             params=SamplingParams(max_new_tokens=4))
    unknown = client.submit(DOCS[1], [("m", "Who?")], model="no-such-model")
    good = client.submit(DOCS[1], [("g", "Who?")], params=SamplingParams(max_new_tokens=4))

    assert good.wait(30)["answers"][0]["custom_id"] == "g"
    reasons = {}
    for name, job in [("foreign", foreign), ("malformed", malformed), ("pickled", pickled),
                      ("unknown", Job(unknown.id, connection=conn, serializer=JSONSerializer))]:
        job = Job.fetch(job.id, connection=conn, serializer=JSONSerializer) if name != "pickled" else job
        deadline = time.monotonic() + 10
        while conn.hget(Job.key_for(job.id), "status") != b"failed":
            assert time.monotonic() < deadline, f"{name} job did not fail"
            time.sleep(0.02)
        reasons[name] = conn.hget(Job.key_for(job.id), "meta") or b""
        assert job.id in FailedJobRegistry(conn.hget(Job.key_for(job.id), "origin").decode(),
                                           connection=conn)
    assert b"JobNotAllowedError" in reasons["foreign"] and not marker.exists()
    assert b"InvalidJobError" in reasons["malformed"] and b"TOPSECRET" not in reasons["malformed"]
    assert b"context" in reasons["malformed"] and b"questions" in reasons["malformed"]
    assert b"UnknownModelError" in reasons["unknown"]
    with pytest.raises(JobFailedError, match="UnknownModelError"):
        Client(redis_url).submit(DOCS[1], [("m", "Who?")], model="no-such-model").wait(10)
    # one question over unshare_length fails alone; its neighbour is answered
    answers = {a["custom_id"]: a for a in too_long.wait(30)["answers"]}
    assert answers["long"]["error"]["type"] == "LimitExceededError"
    assert "unshare_length" in answers["long"]["error"]["message"]
    assert answers["ok"]["generated_tokens"] == 4
    # what the producer can know (the answer budget alone exceeds seq_length) fails at submit
    with pytest.raises(LimitExceededError, match="seq_length"):
        client.submit(DOCS[1], [("x", "Who?")], params=SamplingParams(max_new_tokens=1000))
    assert worker.proc.poll() is None
    # rq's worker counters: five refused (the second unknown model too), `good` and `too_long` answered
    (me,) = [w for w in Worker.all(connection=conn) if w.name == "w1"]
    assert (me.failed_job_count, me.successful_job_count) == (5, 2)


def test_first_sigterm_finishes_the_batch_and_exits_0(redis_url: str, worker: WorkerProc) -> None:
    client = Client(redis_url)
    gate = Gate(client.connection).close(after_questions=1)
    jid = long_job(client)
    gate.wait_held(jid)
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "finishing the current batch" in worker.log(), what="the first SIGTERM to be handled")
    assert worker.proc.poll() is None  # still running: the batch is not done
    gate.open()
    assert worker.wait(60) == 0
    assert client.statuses([jid]) == ["finished"]
    assert len(client.outcome(jid)[1]["answers"]) == 24  # type: ignore[arg-type]
    assert not client.connection.sismember("seqshare:workers", "w1")


def test_second_sigterm_stops_early_and_requeues(redis_url: str, tiny_bundle: Path, worker: WorkerProc,
                                                 tmp_path: Path) -> None:
    client = Client(redis_url)
    gate = Gate(client.connection).close(after_questions=1)
    jid = long_job(client, n=64)
    gate.wait_held(jid)
    worker.signal(signal.SIGTERM)
    # Signals are not queued: the second is sent once the first was handled, or they would merge.
    wait_until(lambda: "finishing the current batch" in worker.log(), what="the first SIGTERM to be handled")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert "stopped mid-batch on a second signal" in worker.log()
    assert client.statuses([jid]) == ["queued"]
    assert jid in Queue("seqshare", connection=client.connection, serializer=JSONSerializer).job_ids
    assert len(StartedJobRegistry("seqshare", connection=client.connection)) == 0
    assert client.connection.xlen(Result.get_key(jid)) == 0  # nothing was stored by the stopped run
    # a fresh worker answers it, whole
    gate.open()
    w2 = WorkerProc(redis_url, tiny_bundle, tmp_path, "w2", "--burst")
    assert w2.wait(60) == 0
    assert client.statuses([jid]) == ["finished"]
    assert len(client.outcome(jid)[1]["answers"]) == 64  # type: ignore[arg-type]
    assert client.connection.xlen(Result.get_key(jid)) == 1


def test_worker_names_are_unique_and_a_live_name_is_not_taken_twice(redis_url: str, tiny_bundle: Path,
                                                                    worker: WorkerProc, tmp_path: Path) -> None:
    a, b = unique_name(), unique_name()
    assert a != b and f".{os.getpid()}." in a
    (tmp_path / "twin").mkdir()
    twin = WorkerProc(redis_url, tiny_bundle, tmp_path / "twin", "w1")
    assert twin.wait(60) == 78, twin.log()  # EX_CONFIG: systemd does not restart it in a loop
    assert "a worker named w1 is already running" in twin.log()
    assert worker.proc.poll() is None
    assert Client(redis_url).submit(DOCS[0], [("x", "Who?")], params=SamplingParams(max_new_tokens=2)).wait(30)


def test_a_bundle_that_cannot_be_loaded_exits_78_naming_why(redis_url: str, tiny_bundle: Path, tmp_path: Path) -> None:
    """A wrong key (or a tampered bundle) cannot be fixed by a restart: EX_CONFIG, with the reason."""
    from seqshare.bundle.crypto import encrypt_file, generate_key_file

    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    generate_key_file(right)
    generate_key_file(wrong)
    sealed = tmp_path / "sealed.bundle"
    encrypt_file(tiny_bundle, sealed, bytes.fromhex(right.read_text().strip()))
    w = WorkerProc(redis_url, sealed, tmp_path, "locked", "--key-file", str(wrong))
    assert w.wait(60) == 78, w.log()
    assert "the key does not open this bundle" in w.log()
