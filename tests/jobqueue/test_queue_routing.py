"""Cache-aware routing and grouping with real worker processes on a real Redis.

The proof of "prefilled once" comes from three independent places: each job's result (`prefix`,
`prefix_computed_tokens`, per-answer `cache_hit`), the counters each worker publishes in Redis
(`seqshare:wstats:<name>`), and the global totals.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from queue_helpers import DOCS, Gate, WorkerProc, wait_until
from rq import Queue
from rq.serializers import JSONSerializer

from seqshare.jobqueue.client import Client, JobHandle, make_payload
from seqshare.jobqueue.executor import JOB_FUNCTION
from seqshare.worker.params import SamplingParams

SHORT = SamplingParams(max_new_tokens=8)


@pytest.fixture
def two_workers(redis_url: str, tiny_bundle: Path, tmp_path: Path) -> Iterator[list[WorkerProc]]:
    ws = [WorkerProc(redis_url, tiny_bundle, tmp_path, n) for n in ("wa", "wb")]
    try:
        for w in ws:
            w.wait_ready()
        yield ws
    finally:
        for w in ws:
            w.stop()


def wstats(conn: redis.Redis, worker: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in conn.hgetall(f"seqshare:wstats:{worker}").items()}


def test_two_workers_two_documents_interleaved_each_prefilled_once(redis_url: str,
                                                                    two_workers: list[WorkerProc]) -> None:
    conn = redis.Redis.from_url(redis_url)
    client = Client(redis_url)
    docs = [DOCS[0], DOCS[2]]
    handles: dict[str, tuple[int, JobHandle]] = {}
    # The first question of each document is held at the gate, so its owner is still busy when the
    # other document's first question arrives: the idle worker takes that one, and both workers serve.
    gate = Gate(conn).close(after_questions=0)
    owners = []
    for d in (0, 1):
        h = client.submit(docs[d], [(f"d{d}-q0", "What jumps over the dog?")], params=SHORT)
        handles[h.id] = (d, h)
        owners.append(gate.holder(h.id))
    assert sorted(owners) == ["wa", "wb"]
    for q in range(1, 10):  # the other 18 questions, interleaved, one job each
        for d in (0, 1):
            h = client.submit(docs[d], [(f"d{d}-q{q}", f"What jumps over the dog {q}?")], params=SHORT)
            handles[h.id] = (d, h)
    gate.open()

    results = {jid: (d, h.wait(60)) for jid, (d, h) in handles.items()}
    for d in (0, 1):
        mine = [r for dd, r in results.values() if dd == d]
        assert len(mine) == 10
        assert {r["worker"] for r in mine} == {owners[d]}  # every question went to the document's owner
        computed = [r["prefix_computed_tokens"] for r in mine]
        ctx = mine[0]["answers"][0]["context_tokens"]
        assert sorted(computed) == [0] * 9 + [ctx]  # exactly one prefill of this document ...
        assert sum(r["prefix"] == "miss" for r in mine) == 1
        assert sum(a["cache_hit"] for r in mine for a in r["answers"]) == 9  # ... and nine cache hits
        stats = wstats(conn, owners[d])  # ... as the owner's published counters say too
        assert stats["prefix_misses"] == 1 and stats["context_tokens_prefilled"] == ctx
        assert stats["questions"] == 10 and stats["tokens_saved"] == 9 * ctx
    totals = {k.decode(): int(v) for k, v in conn.hgetall("seqshare:totals").items()}
    assert totals["prefix_misses"] == 2 and totals["prefix_hits"] == 18
    assert totals["context_tokens_prefilled"] == sum(wstats(conn, w)["context_tokens_prefilled"] for w in owners)
    # the routes producers used: each document's context key belongs to its owner
    for d in (0, 1):
        key = make_payload(docs[d], [("x", "y")]).context_key()
        assert conn.get(f"seqshare:route:{key}") == owners[d].encode()


def test_a_job_taken_by_the_wrong_worker_is_forwarded_to_the_owner(redis_url: str,
                                                                  two_workers: list[WorkerProc]) -> None:
    """A plain rq producer (no routing) puts a job on the shared queue while the context's owner is
    busy: the idle worker that takes it forwards it instead of prefilling the document a second time."""
    conn = redis.Redis.from_url(redis_url)
    client = Client(redis_url)
    # The owner is held at the gate; idle workers look at the shared queue at least once a second even
    # when no bell rings (a plain rq producer rings none), so the other worker takes the plain job.
    gate = Gate(conn).close(after_questions=0)
    first = client.submit(DOCS[1], [(f"q{i}", "What jumps?") for i in range(4)], params=SHORT)
    owner = gate.holder(first.id)
    other = {"wa": "wb", "wb": "wa"}[owner]
    payload = make_payload(DOCS[1], [("plain", "Who sleeps?")], params=SHORT)
    plain = Queue("seqshare", connection=conn, serializer=JSONSerializer).enqueue(JOB_FUNCTION, payload.to_json())
    other_worker = {w.name: w for w in two_workers}[other]
    wait_until(lambda: f"is cached by {owner}; forwarding" in other_worker.log(), what="the forward")
    gate.open()
    res = JobHandle(plain.id, conn).wait(60)
    assert res["worker"] == owner and res["prefix"] == "hit" and res["prefix_computed_tokens"] == 0
    assert first.wait(60)["prefix"] == "miss"
    assert wstats(conn, other).get("jobs_done", 0) == 0


def test_jobs_queued_together_with_one_context_are_decoded_together(redis_url: str, tiny_bundle: Path,
                                                                    tmp_path: Path) -> None:
    """Six jobs on one document (and one on another) wait in the queue; the worker that starts takes the
    six as one group: one engine call, one prefill, and the other document separately."""
    client = Client(redis_url)
    same = [make_payload(DOCS[0], [(f"j{i}", f"Question {i}?")], params=SHORT) for i in range(6)]
    other = make_payload(DOCS[1], [("o", "Other?")], params=SHORT)
    handles = client.submit_many([same[0], other, *same[1:]])
    w = WorkerProc(redis_url, tiny_bundle, tmp_path, "solo", "--burst")
    assert w.wait(60) == 0, w.log()
    results = [h.wait(5) for h in handles]
    grouped = [results[0], *results[2:]]
    assert all(r["batched_jobs"] == 6 for r in grouped)
    assert sum(r["prefix_computed_tokens"] > 0 for r in grouped) == 1
    assert len({r["wall_s"] for r in grouped}) == 1  # one engine call timed them all
    assert results[1]["batched_jobs"] == 1 and results[1]["prefix"] == "miss"


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_jobs_routed_to_an_owner_that_goes_away_are_answered_by_the_other(redis_url: str, how: str,
                                                                          two_workers: list[WorkerProc]) -> None:
    """Jobs wait in the owner's own queue while it is busy; it stops (its queue is handed to the shared
    queue as it leaves) or dies (the other worker recovers the queue and the running job)."""
    conn = redis.Redis.from_url(redis_url)
    client = Client(redis_url)
    gate = Gate(conn).close(after_questions=0)
    first = client.submit(DOCS[0], [(f"q{i}", "What jumps?") for i in range(4)], params=SHORT)
    owner = gate.holder(first.id)
    other = {"wa": "wb", "wb": "wa"}[owner]
    routed = [client.submit(DOCS[0], [(f"r{i}", "Who sleeps?")], params=SHORT) for i in range(3)]
    assert conn.llen(f"rq:queue:seqshare:w:{owner}") == 3  # the producer routed them to the owner
    w = {w.name: w for w in two_workers}[owner]
    if how == "sigterm":
        w.signal(signal.SIGTERM)
        wait_until(lambda: "finishing the current batch" in w.log(), what="the SIGTERM to be handled")
        gate.open()
        assert w.wait(60) == 0
        assert first.wait(5)["worker"] == owner  # it finished its batch before leaving
    else:
        w.kill9()
        gate.forget(first.id)
        gate.open()
        assert first.wait(60)["worker"] == other  # recovered and run again by the other worker
    results = [h.wait(60) for h in routed]
    assert {r["worker"] for r in results} == {other}
    assert not conn.exists(f"rq:queue:seqshare:w:{owner}")
    assert conn.xlen(f"rq:results:{first.id}") == 1


def test_a_job_left_in_the_queue_of_a_worker_that_is_gone_is_rescued(redis_url: str,
                                                                    two_workers: list[WorkerProc]) -> None:
    """A producer routed a job to a worker just as that worker left (or was recovered): the queue has no
    reader any more. Live workers' periodic recovery moves such orphaned queues to the shared queue."""
    conn = redis.Redis.from_url(redis_url)
    payload = make_payload(DOCS[2], [("lost", "Who?")], params=SHORT)
    ghost = Queue("seqshare:w:ghost", connection=conn, serializer=JSONSerializer)
    job = ghost.enqueue(JOB_FUNCTION, payload.to_json())
    res = JobHandle(job.id, conn).wait(30)
    assert res["worker"] in ("wa", "wb") and res["answers"][0]["custom_id"] == "lost"
    assert not conn.exists("rq:queue:seqshare:w:ghost")
    assert not conn.sismember("rq:queues", "rq:queue:seqshare:w:ghost")
