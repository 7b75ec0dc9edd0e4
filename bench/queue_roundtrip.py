"""Queue benchmarks: job round-trip overhead (p50, p99) and enqueue rate, against plain rq.

    .venv/bin/python bench/queue_roundtrip.py [--quick] [--round-trips N] [--enqueue N]

Everything runs against one private redis-server on a unix socket (the embedded one), on an empty DB.

Round trip: submit one tiny job (one question, one new token, on a tiny random model whose compute
takes about a millisecond) and wait for its result, one job at a time; a resident `seqshare worker`
answers. "Overhead" subtracts the engine's own wall time reported in the result. Peers: rq's
SimpleWorker (in-process, like ours) and rq's default Worker (a fork per job), both running a
trivial function with the same JSON serializer and a blocking wait on the result stream.

Enqueue rate: `Client.submit_many` (routing lookup, limits check, one pipeline) against rq's
`Queue.enqueue_many` (one pipeline) and one-by-one `enqueue` of both, nobody consuming.

Targets (issue 6): round trip <= 20 ms p50 for a tiny job; >= 2,000 enqueues/s with submit_many.
Nothing here asserts a time; the table is for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder leads sys.path and this file would shadow the standard library's
# `queue` module (which redis imports): take the folder out before anything else is imported.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from seqshare.daemon.redis_server import EmbeddedRedis
from seqshare.jobqueue.client import Client, make_payload
from seqshare.jobqueue.payload import JobPayload
from seqshare.worker.params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SEQSHARE = str(Path(sys.executable).with_name("seqshare"))
RQ = str(Path(sys.executable).with_name("rq"))
TINY = SamplingParams(max_new_tokens=1)
DOC = "The quick brown fox jumps over the lazy dog. The dog sleeps."


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, rq {version('rq')}"


def percentiles(ms: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return q[49], q[98]


def ms(samples: list[float]) -> str:
    p50, p99 = percentiles(samples)
    return f"{p50:.2f} / {p99:.2f}"


def tiny_bundle(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from queue_helpers import compile_tiny_bundle

    return compile_tiny_bundle(directory)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- round trips ----------------------------------------------------------------------------------
def seqshare_round_trips(url: str, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """(round-trip ms, engine ms) per job."""
    client = Client(url)
    rts, engine = [], []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        res = client.submit(DOC, [("q", "Who sleeps?")], params=TINY).wait(30)
        rt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            rts.append(rt)
            engine.append(res["wall_s"] * 1e3)
    return rts, engine


def rq_round_trips(url: str, n: int, warmup: int) -> list[float]:
    q = Queue("benchq", connection=redis.Redis.from_url(url), serializer=JSONSerializer)
    rts = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        job = q.enqueue("math.sqrt", 4.0)
        res = job.latest_result(timeout=30)
        rt = (time.perf_counter() - t0) * 1e3
        if res is None or res.return_value != 2.0:
            raise SystemExit(f"rq job {job.id} gave no result")
        if i >= warmup:
            rts.append(rt)
    return rts


def with_rq_worker(url: str, worker_class: str, fn: Callable[[], list[float]]) -> list[float]:
    proc = subprocess.Popen([RQ, "worker", "--url", url, "-w", worker_class, "-S", "json", "-q", "benchq"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = redis.Redis.from_url(url)
        wait_for(lambda: conn.scard("rq:workers:benchq"), f"rq worker {worker_class}")
        return fn()
    finally:
        proc.terminate()
        proc.wait(30)


# --- enqueue rates -----------------------------------------------------------------------------------
def rate(n: int, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def enqueue_rates(url: str, n: int) -> dict[str, float]:
    conn = redis.Redis.from_url(url)
    client = Client(url)
    payloads = [make_payload(f"{DOC} Copy {i % 50}.", [(f"q{i}", "Who sleeps?")], params=TINY) for i in range(n)]
    plain = [p.to_json() for p in payloads]
    q = Queue("benchq", connection=conn, serializer=JSONSerializer)
    out: dict[str, float] = {}
    cases: list[tuple[str, int, Callable[[], object]]] = [
        ("seqshare Client.submit_many", n, lambda: client.submit_many(payloads)),
        ("seqshare Client.submit_many (incl. building payloads)", n,
         lambda: client.submit_many([JobPayload.model_validate(p) for p in plain])),
        ("rq Queue.enqueue_many", n, lambda: q.enqueue_many(
            [Queue.prepare_data("seqshare.jobqueue.executor.answer", args=[p]) for p in plain])),
        ("seqshare Client.submit, one by one", n // 5, lambda: [client.submit(p) for p in payloads[: n // 5]]),
        ("rq Queue.enqueue, one by one", n // 5,
         lambda: [q.enqueue("seqshare.jobqueue.executor.answer", p) for p in plain[: n // 5]]),
    ]
    for name, count, fn in cases:
        conn.flushdb()
        out[name] = rate(count, fn)
    conn.flushdb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few iterations: checks that the benchmark runs")
    ap.add_argument("--round-trips", type=int, default=None)
    ap.add_argument("--enqueue", type=int, default=None)
    args = ap.parse_args()
    n_rt = args.round_trips or (30 if args.quick else 1000)
    n_enq = args.enqueue or (500 if args.quick else 20000)
    warmup = 5 if args.quick else 50

    with tempfile.TemporaryDirectory(prefix="seqshare-bench-queue-") as tmp, EmbeddedRedis(Path(tmp) / "r") as srv:
        url, conn = srv.url, redis.Redis.from_url(srv.url)
        rows: list[tuple[str, str, str]] = []
        print(f"machine: {machine()}; redis {conn.info('server')['redis_version']} on a unix socket", flush=True)

        bundle = tiny_bundle(Path(tmp))
        env = {**os.environ, "SEQSHARE_HOME": str(Path(tmp) / "home")}
        worker = subprocess.Popen([SEQSHARE, "worker", "--bundle", str(bundle), "--redis-url", url, "--name", "bench",
                                   "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_for(lambda: conn.exists("seqshare:worker:bench"), "the seqshare worker")
            rts, engine = seqshare_round_trips(url, n_rt, warmup)
        finally:
            worker.terminate()
            worker.wait(30)
        over = [r - e for r, e in zip(rts, engine, strict=True)]
        rows.append(("seqshare round trip, tiny job (ms)", ms(rts), "<= 20 p50"))
        rows.append(("  of which engine (ms)", ms(engine), ""))
        rows.append(("  overhead without engine (ms)", ms(over), ""))
        conn.flushdb()
        for cls in ("rq.worker.SimpleWorker", "rq.worker.Worker"):
            got = with_rq_worker(url, cls, lambda: rq_round_trips(url, n_rt, warmup))
            rows.append((f"rq {cls.rsplit('.', 1)[1]} round trip, math.sqrt (ms)", ms(got),
                         "peer"))
            conn.flushdb()

        for name, per_s in enqueue_rates(url, n_enq).items():
            target = ">= 2000" if name == "seqshare Client.submit_many" else ("peer" if name.startswith("rq") else "")
            rows.append((f"{name} (jobs/s)", f"{per_s:,.0f}", target))

    print(f"\nround trips: {n_rt} after {warmup} warm-up; enqueue: {n_enq} jobs per bulk case, {n_enq // 5} "
          "one by one" + ("  [--quick: indicative only]" if args.quick else ""))
    print("\n| measure | p50 / p99, or rate | target |\n|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
