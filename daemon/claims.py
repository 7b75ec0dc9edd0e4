"""The worker's side of Redis: take jobs, record them as started, finish them, give them back.

A job id moves from an rq queue list into the worker's `claimed` list in one atomic step (Lua), and
leaves it in the same transaction that stores its result. So at every instant a job is queued,
claimed by exactly one worker, or done: a worker killed with -9 leaves its jobs in its claimed list,
and `recover_dead` (run by every worker at start and periodically by live peers) puts them back at
the front of the shared queue. rq's own bookkeeping (job status, StartedJobRegistry executions,
results, Finished/FailedJobRegistry) is kept as rq's workers keep it, so rq's tools see our jobs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from redis import Redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now

from ..worker.routing import Keys, ring

log = logging.getLogger(__name__)

# KEYS: queue lists in order, then the claimed list. Returns {queue key, job id} or nil.
_CLAIM = """
local n = #KEYS - 1
for i = 1, n do
  local id = redis.call('LPOP', KEYS[i])
  if id then redis.call('RPUSH', KEYS[#KEYS], id); return {KEYS[i], id} end
end
return false
"""
# KEYS: group set, claimed list, then queue lists. ARGV[1]: max jobs. Takes queued members of the group.
_TAKE_GROUP = """
local taken = {}
local limit = tonumber(ARGV[1])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if #taken >= limit then break end
  for i = 3, #KEYS do
    if redis.call('LREM', KEYS[i], 1, id) == 1 then
      redis.call('RPUSH', KEYS[2], id); redis.call('SREM', KEYS[1], id)
      table.insert(taken, {KEYS[i], id}); break
    end
  end
end
return taken
"""


class Claims:
    """One worker's claim/finish/recover operations. All writes are pipelined transactions."""

    def __init__(self, conn: Redis, keys: Keys, name: str, ttl_s: int):
        self.conn, self.keys, self.name, self.ttl_s = conn, keys, name, ttl_s
        self._claim = conn.register_script(_CLAIM)
        self._take = conn.register_script(_TAKE_GROUP)

    def queue(self, name: str) -> Queue:
        return Queue(name, connection=self.conn, serializer=JSONSerializer)

    # --- taking jobs ---
    def claim(self, queue_names: Sequence[str]) -> tuple[str, str] | None:
        keys = [Keys.rq_queue(q) for q in queue_names] + [self.keys.claimed(self.name)]
        got = self._claim(keys=keys)
        if not got:
            return None
        qkey, job_id = (x.decode() for x in got)
        return qkey.removeprefix("rq:queue:"), job_id

    def take_group(self, ctx_key: str, queue_names: Sequence[str], limit: int) -> list[tuple[str, str]]:
        if limit <= 0:
            return []
        keys = [self.keys.group(ctx_key), self.keys.claimed(self.name)] + [Keys.rq_queue(q) for q in queue_names]
        got = self._take(keys=keys, args=[limit])
        return [(q.decode().removeprefix("rq:queue:"), i.decode()) for q, i in got]

    def fetch(self, job_id: str) -> Job | None:
        """The job, or None if its hash is gone (then it is dropped from the claimed list)."""
        try:
            return Job.fetch(job_id, connection=self.conn, serializer=JSONSerializer)
        except Exception as e:  # NoSuchJobError, or a hash rq cannot read (e.g. non-JSON meta)
            log.warning("job %s cannot be read (%s); dropping it", job_id, type(e).__name__)
            with self.conn.pipeline() as p:
                p.lrem(self.keys.claimed(self.name), 0, job_id)
                p.hset(Job.key_for(job_id), "status", JobStatus.FAILED)
                p.execute()
            return None

    def start(self, jobs: Sequence[Job], ctx_key: str) -> dict[str, Execution]:
        """Mark jobs started the way rq does: status, worker name, an execution in StartedJobRegistry."""
        execs: dict[str, Execution] = {}
        with self.conn.pipeline() as p:
            p.srem(self.keys.group(ctx_key), *[j.id for j in jobs])
            for job in jobs:
                execs[job.id] = Execution.create(job, self.ttl_s, pipeline=p, worker_name=self.name)
                job.prepare_for_execution(self.name, pipeline=p)
            p.execute()
        return execs

    def heartbeat(self, running: Sequence[tuple[Job, Execution]]) -> None:
        if not running:
            return
        with self.conn.pipeline(transaction=False) as p:
            for job, ex in running:
                ex.heartbeat(job.started_job_registry, self.ttl_s, pipeline=p)
                p.hset(job.key, "last_heartbeat", now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            p.execute()

    # --- finishing jobs ---
    def finish(self, job: Job, execution: Execution | None, result: dict[str, Any] | None,
               error: dict[str, str] | None, result_ttl: int, counters: dict[str, int]) -> None:
        """Store a result or a failure, release the claim and count it, in one transaction."""
        job.ended_at = now()
        with self.conn.pipeline() as p:
            p.multi()
            if error is None:
                answers = (result or {}).get("answers", [])
                job.meta["progress"] = {"questions_done": len(answers), "questions": len(answers),
                                        "tokens_generated": sum(a.get("generated_tokens", 0) for a in answers)}
                p.hset(job.key, "meta", job.serializer.dumps(job.meta))
                job._result = result
                job._handle_success(result_ttl, pipeline=p, worker_name=self.name,
                                    execution_id=execution.id if execution else None,
                                    execution_started_at=execution.created_at if execution else None,
                                    execution_ended_at=job.ended_at)
                job.cleanup(result_ttl, pipeline=p, remove_from_queue=False)
            else:
                job.meta["error"] = error
                p.hset(job.key, "meta", job.serializer.dumps(job.meta))
                job.set_status(JobStatus.FAILED, pipeline=p)
                job._handle_failure(f"{error['type']}: {error['message']}", pipeline=p, worker_name=self.name,
                                    execution_id=execution.id if execution else None,
                                    execution_started_at=execution.created_at if execution else None,
                                    execution_ended_at=job.ended_at)
            if execution is not None:
                execution.delete(job=job, pipeline=p)
            p.lrem(self.keys.claimed(self.name), 0, job.id)
            _count(p, self.keys, self.name, counters)
            p.execute()

    def forward(self, job: Job, to_queue: str, at_front: bool) -> None:
        """Move a claimed job to another worker's queue (its context lives there)."""
        with self.conn.pipeline() as p:
            p.multi()
            _push(p, self.keys, job.id, to_queue, at_front)
            p.lrem(self.keys.claimed(self.name), 0, job.id)
            p.execute()

    def give_back(self, job_ids: Sequence[str], worker: str | None = None) -> int:
        """Requeue unfinished claimed jobs at the front of the shared queue (stop, or a dead worker)."""
        return _give_back(self.conn, self.keys, worker or self.name, job_ids)


def _push(p: Any, keys: Keys, job_id: str, queue_name: str, at_front: bool) -> None:
    p.hset(Job.key_for(job_id), mapping={"origin": queue_name, "status": JobStatus.QUEUED})
    p.sadd(Queue.redis_queues_keys, Keys.rq_queue(queue_name))
    (p.lpush if at_front else p.rpush)(Keys.rq_queue(queue_name), job_id)
    ring(p, keys, queue_name)


def _count(p: Any, keys: Keys, worker: str, counters: dict[str, int]) -> None:
    minute = int(now().timestamp()) // 60
    for field, n in counters.items():
        if n:
            p.hincrby(keys.totals(), field, n)
            p.hincrby(keys.stats(worker), field, n)
            p.hincrby(keys.minute(minute), field, n)
    p.expire(keys.minute(minute), 3600)
    p.expire(keys.stats(worker), 24 * 3600)


def _give_back(conn: Redis, keys: Keys, worker: str, job_ids: Sequence[str]) -> int:
    """Jobs not finished go back to the front of the shared queue, with stale executions removed."""
    n = 0
    for job_id in reversed(list(job_ids)):  # reversed + LPUSH keeps their order
        raw = conn.hmget(Job.key_for(job_id), ["status", "origin", "meta"])
        status, origin = (x.decode() if x else None for x in raw[:2])
        if status is None or status == JobStatus.FINISHED or (status == JobStatus.FAILED and raw[2]
                                                               and b'"error"' in raw[2]):
            conn.lrem(keys.claimed(worker), 0, job_id)
            continue
        with conn.pipeline() as p:
            p.multi()
            if origin:
                wip = f"rq:wip:{origin}"
                for entry in conn.zrange(wip, 0, -1):
                    if entry.decode().startswith(job_id + ":"):
                        p.zrem(wip, entry)
                p.zrem(f"rq:failed:{origin}", job_id)
            _push(p, keys, job_id, keys.shared_queue("normal"), at_front=True)
            p.lrem(keys.claimed(worker), 0, job_id)
            p.execute()
        n += 1
    return n


def _is_dead(info: dict[bytes, bytes]) -> bool:
    """A worker is dead when its liveness hash expired, or it ran on this host and its pid is gone."""
    if not info:
        return True
    if info.get(b"hostname", b"").decode() != socket.gethostname():
        return False
    try:
        os.kill(int(info.get(b"pid", b"0")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def recover_dead(conn: Redis, keys: Keys, me: str) -> list[str]:
    """Give back the claimed jobs and per-worker queue of every dead worker; return their names."""
    recovered = []
    for raw in conn.smembers(keys.workers()):
        name = raw.decode()
        if name == me or not _is_dead(conn.hgetall(keys.info(name))):
            continue
        if not conn.set(keys.recovering(name), me, nx=True, ex=60):
            continue  # a peer is on it
        jobs = [j.decode() for j in conn.lrange(keys.claimed(name), 0, -1)]
        n = _give_back(conn, keys, name, jobs)
        own = keys.worker_queue(name)
        moved = 0
        while (job_id := conn.lpop(Keys.rq_queue(own))) is not None:
            with conn.pipeline() as p:
                _push(p, keys, job_id.decode(), keys.shared_queue("normal"), at_front=False)
                p.execute()
            moved += 1
        with conn.pipeline() as p:
            p.srem(keys.workers(), name)
            p.delete(keys.info(name), keys.claimed(name), Keys.rq_queue(own), keys.recovering(name))
            p.srem(Queue.redis_queues_keys, Keys.rq_queue(own))
            p.srem("rq:workers", f"rq:worker:{name}")
            p.delete(f"rq:worker:{name}")
            p.execute()
        log.warning("worker %s is dead: requeued %d started and %d routed jobs", name, n, moved)
        recovered.append(name)
    return recovered
