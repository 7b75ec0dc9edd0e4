"""The producer side: put document-QA jobs on Redis and wait for their answers.

    client = Client("unix:///run/seqshare/redis.sock")
    handle = client.submit(document, [("q1", "Who signed it?")], params=SamplingParams(max_new_tokens=64))
    print(handle.wait(timeout=60)["answers"][0]["answer"])

Jobs are ordinary rq jobs (JSON-serialized, function `seqshare.jobqueue.executor.answer`), routed to the
per-worker queue of the worker that holds their context, else to the shared queue.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

from seqshare.daemon.redis_server import ENV_URL
from seqshare.jobqueue import rq_adapter as rq
from seqshare.jobqueue.executor import JOB_FUNCTION
from seqshare.jobqueue.payload import ChatMessage, JobPayload, Question
from seqshare.jobqueue.routing import GROUP_TTL_S, Keys, ring, route_queues, text
from seqshare.jobqueue.rq_adapter import Job, Queue
from seqshare.worker.errors import JobFailedError, LimitExceededError, QueueTimeoutError
from seqshare.worker.params import SamplingParams

DEFAULT_URL = "redis://127.0.0.1:6379/0"
BLOCK_S = 2.0  # longest blocking read: well under redis-py's default socket timeout (5 s)


def default_url() -> str:
    return os.environ.get(ENV_URL) or DEFAULT_URL


def connect(url: str | None = None, retry_s: float = 20.0) -> Redis:
    """A connection that rides out a Redis restart: commands retry with backoff for about `retry_s`."""
    attempts = max(1, int(retry_s / 0.5) + 4)
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), attempts)
    return Redis.from_url(url or default_url(), retry=retry, retry_on_error=[ConnectionError, TimeoutError],
                          health_check_interval=30)


@dataclass
class JobHandle:
    """A submitted job: its id, and `wait()` for its result (the worker's answer dict)."""

    id: str
    connection: Redis

    def job(self) -> Job:
        return rq.fetch_job(self.connection, self.id)

    def status(self) -> str:
        return rq.job_statuses(self.connection, [self.id])[0]

    def progress(self) -> dict[str, Any]:
        return dict(self.job().get_meta().get("progress", {}))

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job has a result; raise JobFailedError with the worker's reason if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        key = rq.result_key(self.id)
        while True:
            left = BLOCK_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise QueueTimeoutError(f"job {self.id} not finished after {timeout:.1f} s ({self.status()})")
            got: Any = self.connection.xread({key: "0-0"}, block=max(1, int(min(left, BLOCK_S) * 1000)))
            if got:
                entry_id, fields = got[0][1][-1]
                ok, value = rq.restore_result(self.connection, self.id, text(entry_id), fields)
                if ok:
                    return dict(value or {})
                raise JobFailedError(value or f"job {self.id} failed")


def make_payload(context: str | Sequence[dict[str, str]], questions: Iterable[tuple[str, str] | Question],
                 params: SamplingParams | None = None, model: str | None = None,
                 cache_salt: str | None = None, priority: str = "normal") -> JobPayload:
    qs = [q if isinstance(q, Question) else Question(custom_id=q[0], text=q[1]) for q in questions]
    ctx: Any = context if isinstance(context, str) else [ChatMessage(**m) for m in context]
    return JobPayload(model=model, context=ctx, questions=qs, params=params or SamplingParams(),
                      cache_salt=cache_salt, priority=priority)


class Client:
    """Submit jobs to seqshare workers through Redis."""

    def __init__(self, redis_url: str | None = None, shared: str = "seqshare", worker_prefix: str = "seqshare:w:",
                 job_timeout_s: int = 3600, result_ttl_s: int = 7 * 24 * 3600, retries: int = 3):
        self.connection = connect(redis_url)
        self.keys = Keys(shared, worker_prefix)
        self.job_timeout_s, self.result_ttl_s = job_timeout_s, result_ttl_s
        # rq's abandoned-job cleanup (`rq info`, dashboards) requeues a job with retries left instead of
        # failing it; seqshare workers recover abandoned jobs themselves as well (jobqueue/claims.py).
        self.retries = retries
        self._queues: dict[str, Queue] = {}  # rq queues by name: each asks the server's version once

    def _queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = rq.queue(self.connection, name)
        return self._queues[name]

    def model_limits(self) -> dict[str, dict[str, int]]:
        """Limits published by live workers, by model name."""
        import json

        return {text(k): json.loads(v) for k, v in self.connection.hgetall(self.keys.models()).items()}

    def check_known_limits(self, payloads: Sequence[JobPayload]) -> None:
        """Fail at submit time what the producer can know without a tokenizer: the answer budget alone."""
        limits = self.model_limits()
        if not limits:
            return
        default = next(iter(limits.values()))
        for p in payloads:
            lim = limits.get(p.model, default) if p.model else default
            seq = int(lim.get("seq_length", 0))
            for q in p.questions:
                need = p.params_for(q).max_new_tokens + 2  # at least one context and one question token
                if seq and need > seq:
                    raise LimitExceededError("seq_length", need, seq,
                                             f"max_new_tokens of {q.custom_id} plus one context and one "
                                             "question token")

    def submit(self, context: str | Sequence[dict[str, str]] | JobPayload,
               questions: Iterable[tuple[str, str] | Question] = (), **kw: Any) -> JobHandle:
        payload = context if isinstance(context, JobPayload) else make_payload(context, questions, **kw)
        return self.submit_many([payload])[0]

    def submit_many(self, payloads: Sequence[JobPayload]) -> list[JobHandle]:
        """Enqueue many jobs with one routing lookup and one pipeline round trip."""
        self.check_known_limits(payloads)
        ctx_keys = [p.context_key() for p in payloads]
        targets = route_queues(self.connection, self.keys, ctx_keys, [p.priority for p in payloads])
        handles = []
        with self.connection.pipeline(transaction=False) as pipe:
            for p, ctx, qname in zip(payloads, ctx_keys, targets, strict=True):
                job_id = rq.enqueue(pipe, self._queue(qname), JOB_FUNCTION, p.to_json(), timeout=self.job_timeout_s,
                                    result_ttl=self.result_ttl_s, retries=self.retries,
                                    description=f"seqshare qa: {len(p.questions)} question(s), ctx {ctx[:12]}",
                                    meta={"ctx": ctx, "questions": len(p.questions)},
                                    at_front=p.priority == "high")
                pipe.sadd(self.keys.group(ctx), job_id)
                pipe.expire(self.keys.group(ctx), GROUP_TTL_S)
                handles.append(JobHandle(job_id, self.connection))
            for qname in set(targets):
                ring(pipe, self.keys, qname)
            pipe.execute()
        return handles

    def statuses(self, job_ids: Sequence[str]) -> list[str]:
        return rq.job_statuses(self.connection, job_ids)

    def outcome(self, job_id: str) -> tuple[str, dict[str, Any] | str]:
        """('finished', result) or ('failed', reason) for a job known to be done."""
        got = rq.latest_result(self.connection, job_id)
        if got is None:
            return rq.FAILED.value, "no result stored"
        ok, value = got
        if ok:
            return rq.FINISHED.value, dict(value or {})
        return rq.FAILED.value, value or "failed"
