"""rq's own monitor, `rq info`, reads our queues and our worker as it reads rq's.

seqshare keeps rq's data model without rq's worker loop (jobqueue/rq_adapter.py): this runs the real
CLI against a real worker and checks every figure it prints. The worker is held mid-job by the test
gate, so "executing" and "busy" are seen for certain, not by luck of timing.
"""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
from pathlib import Path

import redis
from queue_helpers import DOCS, Gate, WorkerProc, wait_until
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from seqshare.jobqueue.client import Client
from seqshare.jobqueue.executor import JOB_FUNCTION
from seqshare.worker.params import SamplingParams

RQ = str(Path(sys.executable).with_name("rq"))
SHORT = SamplingParams(max_new_tokens=2)
OUR_QUEUES = "seqshare:w:w1, seqshare:high, seqshare, seqshare:low"  # what w1 listens to, in order
# What show_queues and show_workers print (rq/cli/helpers.py), with --raw and without.
QUEUE_LINE = {True: re.compile(r"queue (\S+) (\d+), (\d+) executing, (\d+) finished, (\d+) failed"),
              False: re.compile(r"(\S+) +\|█* (\d+), (\d+) executing, (\d+) finished, (\d+) failed")}
WORKER_LINE = {True: re.compile(r"worker (\S+) \((\S+) (.*) (\d+)\) (\S+) (.+)\. jobs: (\d+) finished, (\d+) failed"),
               False: re.compile(r"(\S+) \((\S+) (.*) (\d+)\): (\S+) (.+)\. jobs: (\d+) finished, (\d+) failed")}


def rq_info(url: str, *options: str) -> list[str]:
    got = subprocess.run([RQ, "info", "--url", url, *options], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    return got.stdout.splitlines()


def queues_shown(lines: list[str], raw: bool) -> dict[str, tuple[int, ...]]:
    """Queue name -> (queued, executing, finished, failed)."""
    found = (QUEUE_LINE[raw].fullmatch(line) for line in lines)
    return {m[1]: tuple(int(n) for n in m.groups()[1:]) for m in found if m}


def workers_shown(lines: list[str], raw: bool) -> dict[str, tuple[object, ...]]:
    """Worker name -> (host, pid, state, queues, finished, failed)."""
    found = (WORKER_LINE[raw].fullmatch(line) for line in lines)
    return {m[1]: (m[2], int(m[4]), m[5], m[6], int(m[7]), int(m[8])) for m in found if m}


def rq_state(conn: redis.Redis, name: str) -> str | None:
    return next((w.get_state() for w in Worker.all(connection=conn) if w.name == name), None)


def test_rq_info_shows_our_queues_jobs_and_worker(redis_url: str, worker: WorkerProc) -> None:
    conn = redis.Redis.from_url(redis_url)
    client = Client(redis_url)
    # Two answers (the second routed to w1's own queue: its context is cached there) and one refusal.
    client.submit(DOCS[0], [("a", "Who?")], params=SHORT).wait(30)
    routed = client.submit(DOCS[0], [("b", "What?")], params=SHORT)
    assert routed.job().origin == "seqshare:w:w1"
    routed.wait(30)
    malformed = Queue("seqshare", connection=conn, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, {"context": 7, "questions": []})
    wait_until(lambda: client.statuses([malformed.id]) == ["failed"], what="the malformed job to fail")
    # One job held mid-run, one waiting behind it on the low-priority queue.
    gate = Gate(conn).close(after_questions=0)
    held = client.submit(DOCS[1], [("h", "Who?")], params=SHORT)
    gate.wait_held(held.id)
    waiting = client.submit(DOCS[2], [("l", "Who?")], params=SHORT, priority="low")
    assert client.statuses([held.id, waiting.id]) == ["started", "queued"]

    lines = rq_info(redis_url, "--raw")
    assert queues_shown(lines, raw=True) == {"seqshare": (0, 1, 1, 1), "seqshare:w:w1": (0, 0, 1, 0),
                                             "seqshare:low": (1, 0, 0, 0)}, lines
    host = socket.gethostname()
    assert workers_shown(lines, raw=True) == {"w1": (host, worker.proc.pid, "busy", OUR_QUEUES, 2, 1)}, lines
    by_queue = rq_info(redis_url, "--only-workers", "--by-queue")
    for q in ("seqshare", "seqshare:w:w1", "seqshare:low"):
        assert any(re.fullmatch(rf"{re.escape(q)}: +w1 \(busy\)", line) for line in by_queue), by_queue

    gate.open()
    held.wait(30)
    waiting.wait(30)
    wait_until(lambda: rq_state(conn, "w1") == "idle", what="rq's record of w1 to be idle")
    lines = rq_info(redis_url)  # the bar-chart form, as people read it
    assert queues_shown(lines, raw=False) == {"seqshare": (0, 0, 2, 1), "seqshare:w:w1": (0, 0, 1, 0),
                                              "seqshare:low": (0, 0, 1, 0)}, lines
    assert workers_shown(lines, raw=False) == {"w1": (host, worker.proc.pid, "idle", OUR_QUEUES, 4, 1)}, lines
    assert "3 queues, 0 jobs total" in lines and "1 workers, 3 queues" in lines


def test_only_the_adapter_imports_rq_or_spells_its_keys() -> None:
    """Every rq touchpoint of the package is in jobqueue/rq_adapter.py: an rq upgrade is checked there."""
    package = Path(__file__).parents[2] / "jobqueue"
    touching = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            key = isinstance(node, ast.Constant) and isinstance(node.value, str) and "rq:" in node.value
            if key or any(n == "rq" or n.startswith("rq.") for n in names):
                touching.add(path.name)
    assert touching == {"rq_adapter.py"}
