"""The worker's side of Redis: take jobs, record them as started, finish them, give them back.

A job id moves from an rq queue list into the worker's `claimed` list in one atomic step (Lua), and
leaves it in the same transaction that stores its result. So at every instant a job is queued,
claimed, or done: a worker killed with -9 leaves its jobs in its claimed list, and recovery
(jobqueue/recovery.py) puts them back at the front of the shared queue. rq's bookkeeping (job status,
StartedJobRegistry executions, results, Finished/FailedJobRegistry) is kept as rq's workers keep
it, so rq's tools see our jobs; every call into rq is in jobqueue/rq_adapter.py.

Exactly one result per job: rq's own abandoned-job cleanup (run by `rq info`, dashboards, `seqshare
status`) may requeue a job that recovery also requeues, so a job id can sit in a queue twice. A
worker therefore skips a job that already has a result, and `finish` stores a result under WATCH
only if none was stored meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis.exceptions import WatchError

from seqshare.jobqueue import rq_adapter as rq
from seqshare.jobqueue.routing import Keys, ring, text
from seqshare.jobqueue.rq_adapter import Execution, Job
from seqshare.worker.errors import WorkerCrashedError

log = logging.getLogger(__name__)

CRASHES_FIELD = "seqshare_crashes"  # in the rq job hash: how often a worker died while running it
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

    def __init__(self, conn: Redis, keys: Keys, name: str, ttl_s: int, max_retries: int = 3,
                 rq_worker: rq.WorkerRecord | None = None):
        self.conn, self.keys, self.name, self.ttl_s, self.max_retries = conn, keys, name, ttl_s, max_retries
        self.rq_worker = rq_worker  # its counters (`rq info`: finished, failed, working time) count our jobs
        self._claim = conn.register_script(_CLAIM)
        self._take = conn.register_script(_TAKE_GROUP)

    # --- taking jobs ---
    def claim(self, queue_names: Sequence[str]) -> tuple[str, str] | None:
        keys = [rq.queue_key(q) for q in queue_names] + [self.keys.claimed(self.name)]
        got = self._claim(keys=keys)
        if not got:
            return None
        qkey, job_id = (text(x) for x in got)
        return rq.queue_name(qkey), job_id

    def take_group(self, ctx_key: str, queue_names: Sequence[str], limit: int) -> list[tuple[str, str]]:
        if limit <= 0:
            return []
        keys = [self.keys.group(ctx_key), self.keys.claimed(self.name)] + [rq.queue_key(q) for q in queue_names]
        got = self._take(keys=keys, args=[limit])
        return [(rq.queue_name(text(q)), text(i)) for q, i in got]

    def pending(self) -> list[str]:
        """Job ids in our claimed list (after a lost reply, some we do not know we took)."""
        return [text(j) for j in self.conn.lrange(self.keys.claimed(self.name), 0, -1)]

    def fetch(self, job_id: str) -> Job | None:
        """The job if it still needs running; else None and the claim is dropped.

        None for a job whose hash is gone or unreadable (marked failed) and for a duplicate entry of
        a job that already has its outcome.
        """
        try:
            job = rq.fetch_job(self.conn, job_id)
        except Exception as e:  # NoSuchJobError, or a hash rq cannot read (e.g. non-JSON meta)
            log.warning("job %s cannot be read (%s); dropping it", job_id, type(e).__name__)
            with self.conn.pipeline() as p:
                p.lrem(self.keys.claimed(self.name), 0, job_id)
                rq.mark_unreadable_failed(self.conn, p, job_id)
                p.execute()
            return None
        if _has_outcome(job):
            log.info("job %s already has its outcome; dropping a duplicate queue entry", job_id)
            self.conn.lrem(self.keys.claimed(self.name), 0, job_id)
            return None
        return job

    def start(self, jobs: Sequence[Job], ctx_key: str) -> dict[str, Execution]:
        """Mark jobs started the way rq does: status, worker name, an execution in StartedJobRegistry."""
        with self.conn.pipeline() as p:
            p.srem(self.keys.group(ctx_key), *[j.id for j in jobs])
            execs = rq.start_jobs(p, jobs, self.name, self.ttl_s)
            p.execute()
        return execs

    def heartbeat(self, running: Sequence[tuple[Job, Execution]]) -> None:
        if not running:
            return
        with self.conn.pipeline(transaction=False) as p:
            rq.beat_jobs(p, running, self.ttl_s)
            p.execute()

    # --- finishing jobs ---
    def finish(self, job: Job, execution: Execution | None, result: dict[str, Any] | None,
               error: dict[str, str] | None, result_ttl: int, counters: dict[str, int]) -> bool:
        """Store a result or a failure, release the claim and count it, in one transaction.

        False when the job got a result from another run meanwhile: then only the claim is released.
        """
        rq.mark_ended(job)
        with self.conn.pipeline() as p:
            while True:
                try:
                    duplicate = rq.watch_finished(p, job)  # the heartbeat thread touches it too: WatchError retries
                    p.multi()
                    if not duplicate:
                        self._outcome(p, job, execution, result, error, result_ttl)
                        _count(p, self.keys, self.name, counters)
                        if self.rq_worker is not None:
                            self.rq_worker.count(p, job, ok=error is None)
                    else:
                        rq.end_execution(p, job, execution)
                    p.lrem(self.keys.claimed(self.name), 0, job.id)
                    p.execute()
                    return not duplicate
                except WatchError:
                    continue

    def _outcome(self, p: Any, job: Job, execution: Execution | None, result: dict[str, Any] | None,
                 error: dict[str, str] | None, result_ttl: int) -> None:
        if error is None:
            answers = (result or {}).get("answers", [])
            job.meta["progress"] = {"questions_done": len(answers), "questions": len(answers),
                                    "tokens_generated": sum(a.get("generated_tokens", 0) for a in answers)}
            rq.save_meta(job, p)
            rq.store_success(p, job, execution, self.name, result, result_ttl)
        else:
            _record_failure(p, job, error, self.name, execution)
        rq.end_execution(p, job, execution)

    def forward(self, job: Job, to_queue: str, at_front: bool) -> None:
        """Move a claimed job to another worker's queue (its context lives there)."""
        with self.conn.pipeline() as p:
            p.multi()
            _push(p, self.keys, job, to_queue, at_front)
            p.lrem(self.keys.claimed(self.name), 0, job.id)
            p.execute()

    def give_back(self, job_ids: Sequence[str]) -> int:
        """Requeue our unfinished claimed jobs at the front of the shared queue (a stop, a lost reply)."""
        return give_back_jobs(self.conn, self.keys, self.name, job_ids, crashed=False, max_retries=self.max_retries)


def _has_outcome(job: Job) -> bool:
    """A result, or a failure a seqshare worker recorded (rq's 'abandoned' failure is no outcome)."""
    status = rq.status(job)
    return status == rq.FINISHED or (status == rq.FAILED and "error" in job.meta)


def _record_failure(p: Any, job: Job, error: dict[str, str], worker: str, execution: Execution | None = None) -> None:
    job.meta["error"] = error
    rq.save_meta(job, p)
    rq.store_failure(p, job, f"{error['type']}: {error['message']}", worker, execution)


def _push(p: Any, keys: Keys, job: Job, queue_name: str, at_front: bool) -> None:
    rq.requeue(p, job, queue_name, at_front)
    ring(p, keys, queue_name)


def _count(p: Any, keys: Keys, worker: str, counters: dict[str, int]) -> None:
    minute = int(time.time()) // 60
    for field, n in counters.items():
        if n:
            p.hincrby(keys.totals(), field, n)
            p.hincrby(keys.stats(worker), field, n)
            p.hincrby(keys.minute(minute), field, n)
    p.expire(keys.minute(minute), 3600)
    p.expire(keys.stats(worker), 24 * 3600)


def give_back_jobs(conn: Redis, keys: Keys, worker: str, job_ids: Sequence[str], crashed: bool,
               max_retries: int) -> int:
    """Jobs without an outcome go back to the front of the shared queue, stale executions removed.

    `crashed`: the worker died running them; a job whose workers died more than `max_retries` times
    fails with WorkerCrashedError instead (a job that kills every worker must not kill them forever).
    """
    n = 0
    shared = keys.shared_queue("normal")
    for job_id in reversed(list(job_ids)):  # reversed + LPUSH keeps their order
        try:
            job: Job | None = rq.fetch_job(conn, job_id)
        except Exception:  # gone, or unreadable: nothing to run
            job = None
        if job is None or _has_outcome(job):
            conn.lrem(keys.claimed(worker), 0, job_id)
            continue
        crashes = int(conn.hget(job.key, CRASHES_FIELD) or 0) + int(crashed)
        with conn.pipeline() as p:
            p.multi()
            rq.forget_run(p, job)
            for q in {job.origin, shared}:  # rq's cleanup may have requeued it already: never twice
                rq.unqueue(p, q, job_id)
            p.hset(job.key, CRASHES_FIELD, crashes)
            if crashed and crashes > max_retries:
                msg = f"the worker running this job died {crashes} times (queue.max_retries = {max_retries})"
                _record_failure(p, job, {"type": WorkerCrashedError.__name__, "message": msg}, worker)
                _count(p, keys, worker, {"jobs_failed": 1})
                log.error("job %s: %s; failing it", job_id, msg)
            else:
                _push(p, keys, job, shared, at_front=True)
                n += 1
            p.lrem(keys.claimed(worker), 0, job_id)
            p.execute()
    return n
