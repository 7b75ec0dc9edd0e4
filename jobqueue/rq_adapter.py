"""Every place where seqshare's job queue touches rq; the only module of the package that imports it.

seqshare keeps rq's data model (queues, job hashes, registries, results, the worker registry) so that
rq's tools (`rq info`, dashboards, rq's own abandoned-job cleanup) see our jobs and workers, but not
rq's worker loop (jobqueue/resident.py says why). So key names come from rq's own classes, and
outcomes are written with rq's public calls, inside the caller's transaction. Where rq has no public
call for what we need, the Redis command is here, with why: an rq upgrade is checked in one file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq.executions import Execution
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import as_text, now
from rq.worker import SimpleWorker, WorkerStatus

# --- key names: Lua scripts and cross-queue moves need them spelled out --------------------------
QUEUE_PREFIX = Queue.redis_queue_namespace_prefix
QUEUES_KEY = Queue.redis_queues_keys  # the set of queues `rq info` lists
JOB_PREFIX = Job.redis_job_namespace_prefix
FINISHED, FAILED = JobStatus.FINISHED, JobStatus.FAILED


def queue_key(name: str) -> str:
    return QUEUE_PREFIX + name


def queue_name(key: str) -> str:
    return key.removeprefix(QUEUE_PREFIX)


def job_key(job_id: str) -> str:
    return Job.key_for(job_id)


def result_key(job_id: str) -> str:
    """The stream that holds a job's results (a producer blocks on it)."""
    return Result.get_key(job_id)


def worker_key(name: str) -> str:
    return SimpleWorker.redis_worker_namespace_prefix + name


# --- queues and jobs -----------------------------------------------------------------------------
def queue(conn: Redis, name: str) -> Queue:
    # JSON everywhere: rq's default serializer (pickle) would run code from anyone who can write to Redis.
    return Queue(name, connection=conn, serializer=JSONSerializer)


def fetch_job(conn: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def enqueue(pipe: Pipeline, q: Queue, func: str, arg: Any, *, timeout: int, result_ttl: int, retries: int,
            description: str, meta: dict[str, Any], at_front: bool) -> str:
    """Create a job and enqueue it in the pipeline; its id."""
    job = q.create_job(func, args=[arg], timeout=timeout, result_ttl=result_ttl, failure_ttl=result_ttl,
                       retry=Retry(max=retries) if retries else None, description=description, meta=meta)
    q.enqueue_job(job, pipeline=pipe, at_front=at_front)
    return job.id


def known_queues(conn: Redis) -> list[str]:
    """Names of the queues in rq's set (Queue.all raises on a member that is not a queue key)."""
    keys = (as_text(k) for k in conn.smembers(QUEUES_KEY))
    return [queue_name(k) for k in keys if k.startswith(QUEUE_PREFIX)]


def queue_counts(conn: Redis, name: str) -> dict[str, int]:
    """Queued, started, finished and failed jobs of a queue, counted as `rq info` counts them."""
    # Counting runs rq's registry cleanup, which reads job hashes: they hold JSON, never pickle.
    regs = [r(name, connection=conn, serializer=JSONSerializer)
            for r in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry)]
    counts = {"queued": queue(conn, name).count}
    return counts | {s: len(r) for s, r in zip(("started", "finished", "failed"), regs, strict=True)}


def job_statuses(conn: Redis, job_ids: Sequence[str]) -> list[str]:
    """Each job's status, "missing" for a job whose hash is gone: one field read per job, one round trip
    (Job.fetch_many would deserialize whole hashes)."""
    with conn.pipeline(transaction=False) as p:
        for j in job_ids:
            p.hget(job_key(j), "status")
        return [as_text(s) if s else "missing" for s in p.execute()]


def save_meta(job: Job, pipeline: Pipeline | None = None) -> None:
    if pipeline is None:
        job.save_meta()
    else:  # Job.save_meta takes no pipeline: the same field write, inside the caller's transaction
        pipeline.hset(job.key, "meta", job.serializer.dumps(job.meta))


# --- results, as a producer reads them -----------------------------------------------------------
def _split(res: Result) -> tuple[bool, Any]:
    return (True, res.return_value) if res.type == Result.Type.SUCCESSFUL else (False, res.exc_string)


def restore_result(conn: Redis, job_id: str, entry_id: str, fields: dict[Any, Any]) -> tuple[bool, Any]:
    """A result stream entry as (True, return value) or (False, rq's exception string or None)."""
    return _split(Result.restore(job_id, entry_id, fields, connection=conn, serializer=JSONSerializer))


def latest_result(conn: Redis, job_id: str) -> tuple[bool, Any] | None:
    """The job's latest result as `restore_result` gives it; None when none is stored."""
    res = Result.fetch_latest(Job(job_id, connection=conn, serializer=JSONSerializer), serializer=JSONSerializer)
    return None if res is None else _split(res)


# --- a worker's side of a job's life: every write goes into the caller's transaction -------------
def start_jobs(p: Pipeline, jobs: Iterable[Job], worker_name: str, ttl_s: int) -> dict[str, Execution]:
    """Mark jobs started as rq's worker does: status, worker name, an execution in StartedJobRegistry."""
    execs: dict[str, Execution] = {}
    for job in jobs:
        execs[job.id] = Execution.create(job, ttl_s, pipeline=p, worker_name=worker_name)
        job.prepare_for_execution(worker_name, pipeline=p)
    return execs


def beat_jobs(p: Pipeline, running: Iterable[tuple[Job, Execution]], ttl_s: int) -> None:
    """Keep running jobs' executions from expiring (rq's cleanup would call them abandoned)."""
    for job, ex in running:
        ex.heartbeat(job.started_job_registry, ttl_s, pipeline=p)
        job.heartbeat(now(), ttl_s, pipeline=p)


def status(job: Job) -> JobStatus:
    """As fetched: no round trip."""
    return job.get_status(refresh=False)


def mark_ended(job: Job) -> None:
    job.ended_at = now()


def watch_finished(p: Pipeline, job: Job) -> bool:
    """WATCH the job's hash; whether it holds a result already. Read on the watching connection:
    Job.get_status reads on another and raises on a hash that expired meanwhile."""
    p.watch(job.key)
    return bool(p.hget(job.key, "status") == FINISHED.value.encode())


def _execution_fields(job: Job, execution: Execution | None, worker_name: str) -> dict[str, Any]:
    return {"worker_name": worker_name, "execution_id": execution.id if execution else None,
            "execution_started_at": execution.created_at if execution else None,
            "execution_ended_at": job.ended_at}


def store_success(p: Pipeline, job: Job, execution: Execution | None, worker_name: str, result: Any,
                  result_ttl: int) -> None:
    """What Worker.handle_job_success stores, in the caller's transaction: that method runs and commits
    its own, and our claim must leave in the same one."""
    job.set_status(FINISHED, pipeline=p)
    job.save(pipeline=p, include_meta=False, include_result=False)  # meta is the caller's: never clobbered
    Result.create(job, Result.Type.SUCCESSFUL, result_ttl, return_value=result, pipeline=p,
                  **_execution_fields(job, execution, worker_name))
    if result_ttl != 0:
        job.finished_job_registry.add(job, result_ttl, pipeline=p)
    job.cleanup(result_ttl, pipeline=p, remove_from_queue=False)


def store_failure(p: Pipeline, job: Job, exc_string: str, worker_name: str,
                  execution: Execution | None = None) -> None:
    """What Worker.handle_job_failure stores for a failure it does not retry, in the caller's transaction."""
    job.ended_at = job.ended_at or now()
    job.set_status(FAILED, pipeline=p)
    job.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=exc_string, pipeline=p)
    Result.create_failure(job, job.failure_ttl, exc_string, pipeline=p,
                          **_execution_fields(job, execution, worker_name))


def end_execution(p: Pipeline, job: Job, execution: Execution | None) -> None:
    if execution is not None:
        execution.delete(job=job, pipeline=p)


def mark_unreadable_failed(conn: Redis, p: Pipeline, job_id: str) -> None:
    """Fail a job whose hash rq cannot read: there is no Job to call set_status on, so the field is
    written directly (and only if the hash still exists)."""
    if conn.exists(job_key(job_id)):
        p.hset(job_key(job_id), "status", FAILED)


def forget_run(p: Pipeline, job: Job) -> None:
    """Drop a job's stale executions from StartedJobRegistry (expired ones too: no cleanup, which would
    fail or requeue the job itself) and the job from FailedJobRegistry (rq's cleanup may have put it there)."""
    started = job.started_job_registry
    for job_id, ex_id in started.get_job_and_execution_ids(cleanup=False):
        if job_id == job.id:
            started.remove_execution(Execution(ex_id, job_id, job.connection), pipeline=p)
    job.failed_job_registry.remove(job, pipeline=p)


def unqueue(p: Pipeline, queue_name: str, job_id: str) -> None:
    """Remove every entry of the job from the queue (Queue.remove takes only the first)."""
    p.lrem(queue_key(queue_name), 0, job_id)


def requeue(p: Pipeline, job: Job, queue_name: str, at_front: bool) -> None:
    """Put an already-enqueued job on a queue, possibly another one than it came from.

    Queue.enqueue_job would rewrite the whole hash and its enqueue time; only `origin` (no rq call sets
    it alone) and the status change.
    """
    p.hset(job.key, "origin", queue_name)
    job.set_status(JobStatus.QUEUED, pipeline=p)
    p.sadd(QUEUES_KEY, queue_key(queue_name))  # what enqueue_job adds: `rq info` lists the queue
    queue(job.connection, queue_name).push_job_id(job.id, pipeline=p, at_front=at_front)


# --- rq's worker registry ------------------------------------------------------------------------
class WorkerRecord:
    """rq's record of one seqshare worker, which `rq info` and dashboards read: state, current job,
    counters. An rq SimpleWorker that never runs rq's loop; seqshare's loop keeps it up to date."""

    def __init__(self, conn: Redis, name: str, queue_names: Sequence[str], ttl_s: int):
        self.ttl_s = ttl_s
        self.worker = SimpleWorker([queue(conn, q) for q in queue_names], name=name, connection=conn,
                                   serializer=JSONSerializer, worker_ttl=ttl_s)

    def born(self) -> None:
        self.worker.register_birth()
        self.worker.set_state(WorkerStatus.IDLE)

    def busy(self, job_id: str) -> None:
        self.worker.set_state(WorkerStatus.BUSY)
        self.worker.set_current_job_id(job_id)

    def idle(self) -> None:
        self.worker.set_current_job_id(None)
        self.worker.set_state(WorkerStatus.IDLE)

    def beat(self, p: Pipeline) -> None:
        self.worker.heartbeat(self.ttl_s, pipeline=p)

    def died(self) -> None:
        self.worker.register_death()

    def count(self, p: Pipeline, job: Job, ok: bool) -> None:
        """Count a finished or failed job as rq's worker does (`rq info`: finished, failed, working time)."""
        if ok:
            self.worker.increment_successful_job_count(pipeline=p)
        else:
            self.worker.increment_failed_job_count(pipeline=p)
        if job.started_at is not None and job.ended_at is not None:
            self.worker.increment_total_working_time(job.ended_at - job.started_at, p)


def forget_worker(p: Pipeline, name: str) -> None:
    """Unregister a dead worker: register_death needs its Worker object, whose hash may have expired
    already. rq will not register a live worker under a name whose hash has no death date."""
    p.srem(SimpleWorker.redis_workers_keys, worker_key(name))
    p.delete(worker_key(name))
