"""The resident worker: load the bundles once, then answer jobs in this process, forever.

Why not rq's Worker: it forks a work horse per job (throwing away the model and the prefix cache)
and pops one job at a time. This loop keeps rq's data model (queues, job hashes, registries,
results, the worker registry: `rq info` shows us) but claims jobs atomically (jobqueue/claims.py),
batches queued jobs that share a context, runs them in-process, and brings back the jobs of workers
that died (jobqueue/recovery.py). A Redis outage is waited out: the connection retries, and jobs
claimed around a lost reply are given back.

Signals: the first SIGTERM/SIGINT finishes the current batch and exits 0; a second one stops at the
next safe point (the engine's progress callback, between decode steps) and gives the batch back to
the queue. A heartbeat thread (jobqueue/beat.py) keeps the worker's liveness key, the rq executions
and the routes of cached contexts alive while the main thread sits in a long native call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError, TimeoutError

from seqshare.daemon.config import Settings
from seqshare.daemon.logs import job_context, job_finished_line, job_started_line
from seqshare.daemon.notify import Heartbeat, Notifier, format_status
from seqshare.daemon.reload import Reloader
from seqshare.jobqueue import executor
from seqshare.jobqueue import rq_adapter as rq
from seqshare.jobqueue.beat import Beat
from seqshare.jobqueue.claims import Claims
from seqshare.jobqueue.executor import Engines, describe_error
from seqshare.jobqueue.hold import JobHold
from seqshare.jobqueue.payload import JobPayload
from seqshare.jobqueue.recovery import drain_queue, proc_entry, recover_dead, recover_own
from seqshare.jobqueue.routing import Keys, OwnedContexts, own_or_forward
from seqshare.jobqueue.rq_adapter import Execution, Job
from seqshare.jobqueue.stats import WorkerStats, publish_models
from seqshare.worker.errors import SeqshareError

log = logging.getLogger(__name__)

ENV_HEARTBEAT = "SEQSHARE_HEARTBEAT_S"  # tests shorten it so dead workers are noticed quickly
META_EVERY_S = 0.25


class StopNow(BaseException):
    """Second stop signal: leave the batch at the next safe point. BaseException so `except Exception`
    in engine code cannot swallow it."""


def unique_name(name: str | None = None) -> str:
    """`name` as given, else host.pid.random: unique per process even when pids repeat across hosts."""
    return name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


@dataclass
class Item:
    job: Job
    payload: JobPayload
    ctx: str


class ResidentWorker:
    def __init__(self, conn: Redis, settings: Settings, engines: Engines, name: str | None = None,
                 burst: bool = False, notifier: Notifier | None = None, heartbeat: Heartbeat | None = None):
        self.conn, self.settings, self.engines, self.burst = conn, settings, engines, burst
        self.name = unique_name(name or settings.name)
        self.keys = Keys(settings.queue.shared, settings.queue.worker_prefix)
        self.queues = self.keys.queues_for(self.name)
        self.beat_s = float(os.environ.get(ENV_HEARTBEAT, "2.0"))
        self.ttl_s = max(3, int(self.beat_s * 5))
        self.route_ttl_s = max(60, self.ttl_s * 4)
        self.max_retries = settings.queue.max_retries
        self.notifier = notifier or Notifier()
        self.hb = heartbeat or Heartbeat.from_env(self.notifier)
        self.stats = WorkerStats()
        self.hold = JobHold.from_env(conn, self.keys, self.name)  # test-only gate, off unless SEQSHARE_TEST_HOLD=1
        self.owned = OwnedContexts()  # context keys whose prefix we computed: we keep their routes
        self.running: list[tuple[Job, Execution]] = []
        self._lock = threading.Lock()
        self._stop = self._abort = False
        self._resync = False  # after a Redis error: jobs may sit in our claimed list unknown to us
        self.proc = str(proc_entry())  # identifies this process in the procs hash
        self.beat = Beat(self)
        self._last_meta: dict[str, tuple[float, int]] = {}  # job id -> (time, questions done) published
        self.rq = rq.WorkerRecord(conn, self.name, self.queues, self.ttl_s)
        self.claims = Claims(conn, self.keys, self.name, self.ttl_s, self.max_retries, rq_worker=self.rq)
        self.reloader = Reloader(self)  # SIGHUP: reread the config, reload changed bundles (daemon/reload.py)

    # --- lifecycle -------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        recover_own(self.conn, self.keys, self.name, self.max_retries, self.ttl_s)
        recover_dead(self.conn, self.keys, self.name, self.max_retries)
        self._register()
        executor.install(self.engines)
        self.beat.start()
        self.notifier.ready(self.status_text("idle"))
        self.hb.running()
        log.info("worker %s listening on %s", self.name, ", ".join(self.queues))
        try:
            self._loop()
        except StopNow:
            log.warning("worker %s: stopped mid-batch on a second signal; the batch was requeued", self.name)
        finally:
            self.notifier.stopping()
            self.beat.stop()
            executor.install(None)
            self._unregister()
            self.hb.stop()
        return 0

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self.reloader.request)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop:
            log.warning("second %s: stopping at the next safe point", signal.Signals(signum).name)
            self._abort = True
            return
        log.info("%s: finishing the current batch, then exiting", signal.Signals(signum).name)
        self._stop = True
        self.notifier.stopping()

    def _register(self) -> None:
        self.rq.born()
        with self.conn.pipeline() as p:
            self.beat.publish(p, "idle")
            publish_models(p, self.keys, self.engines)
            p.execute()

    def _unregister(self) -> None:
        try:
            self.conn.delete(self.keys.info(self.name))  # first: producers and peers stop routing to us
            self.claims.give_back(self.claims.pending())  # normally none: a stop gives its batch back
            drain_queue(self.conn, self.keys, self.queues[0])  # jobs routed to us: to the shared queue
            with self.conn.pipeline() as p:  # last: until here a peer would recover what we leave
                p.srem(self.keys.workers(), self.name)
                p.hdel(self.keys.procs(), self.name)
                p.delete(self.keys.claimed(self.name))
                p.execute()
            self.rq.died()
        except (ConnectionError, TimeoutError) as e:
            log.warning("could not unregister from Redis: %s", e)

    # --- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        wait = 0.5
        while not self._stop:
            self.hb.progress()
            self.reloader.maybe_reload()  # between batches only: no job sees its engine replaced
            try:
                if self._resync:
                    self.claims.give_back(self.claims.pending())
                    self._resync = False
                if not self._step():
                    if self.burst:
                        return
                    self.conn.blpop([self.keys.bell(self.queues[0]), self.keys.bell(self.queues[1])],
                                    timeout=1)
                wait = 0.5
            except (ConnectionError, TimeoutError) as e:
                log.warning("Redis unreachable (%s); retrying in %.1f s", e, wait)
                self._resync = True
                self.beat.outage()
                deadline = time.monotonic() + wait  # slept in slices: a stop signal is not kept waiting
                while not self._stop and time.monotonic() < deadline:
                    time.sleep(0.1)
                wait = min(wait * 2, 30.0)

    def _step(self) -> bool:
        got = self.claims.claim(self.queues)
        if got is None:
            return False
        first = self._admit(got[1])
        if first is None:
            return True
        items = [first]
        for _, job_id in self.claims.take_group(first.ctx, self.queues, self.settings.max_batch - 1):
            if (item := self._admit(job_id, forward=False)) is not None:
                items.append(item)
        groups: dict[str, list[Item]] = {}
        for it in items:  # the group set is a producer's hint: regroup by the key we computed
            groups.setdefault(it.ctx, []).append(it)
        for group in groups.values():
            self._run(group)
        return True

    def _admit(self, job_id: str, forward: bool = True) -> Item | None:
        """Fetch and decode a claimed job; fail it if malformed, forward it if another worker owns it."""
        job = self.claims.fetch(job_id)
        if job is None:
            return None
        try:
            payload = executor.decode_job(job.func_name, job.args, job.kwargs)
        except Exception as e:  # SeqshareError, or rq's DeserializationError on non-JSON data
            err = e if isinstance(e, SeqshareError) else SeqshareError("job data is not a JSON rq job")
            log.warning("job %s refused: %s", job.id, err)
            self._finish(job, None, None, describe_error(err), route=None, started=time.monotonic())
            return None
        ctx = payload.context_key()
        owner = own_or_forward(self.conn, self.keys, ctx, self.name, self.route_ttl_s) if forward else self.name
        if owner != self.name:
            log.info("job %s: context %s is cached by %s; forwarding", job.id, ctx[:12], owner)
            self.claims.forward(job, self.keys.worker_queue(owner), at_front=payload.priority == "high")
            return None
        return Item(job, payload, ctx)

    def _run(self, group: list[Item]) -> None:
        execs = self.claims.start([it.job for it in group], group[0].ctx)
        started = time.monotonic()
        for it in group:
            with job_context(it.job.id, it.ctx):
                log.info("%s", job_started_line(it.job.id, it.payload, len(group)))
        with self._lock:
            self.running = [(it.job, execs[it.job.id]) for it in group]
        try:
            self.rq.busy(group[0].job.id)
            outcomes = self._compute(group)
            for it, out in zip(group, outcomes, strict=True):
                if isinstance(out, BaseException):
                    self._finish(it.job, execs[it.job.id], None, describe_error(out), it.ctx, started)
                else:
                    self._finish(it.job, execs[it.job.id], out, None, it.ctx, started)
                    self.owned.add(it.ctx)
        finally:
            with self._lock:
                self.running = []
        self.rq.idle()

    def _compute(self, group: list[Item]) -> list[Any]:
        with job_context(group[0].job.id, group[0].ctx), self.hb.busy():
            try:
                return executor.run_group(self.engines, [it.payload for it in group], self.name,
                                          progress=self._progress_for(group))
            except StopNow:
                self.claims.give_back([it.job.id for it in group])
                raise
            except Exception as e:  # a bug in the engine: every job of the group fails with it
                log.exception("engine failed on a group of %d job(s)", len(group))
                return [SeqshareError(f"internal error: {type(e).__name__}: {e}")] * len(group)

    def _progress_for(self, group: list[Item]) -> Callable[[int, int, int], None]:
        def progress(i: int, done: int, tokens: int) -> None:
            self._alive()
            job = group[i].job
            t = time.monotonic()
            last_t, last_done = self._last_meta.get(job.id, (0.0, -1))
            # A finished question is published at once; token counts at most every META_EVERY_S.
            if done != last_done or t - last_t >= META_EVERY_S:
                self._last_meta[job.id] = (t, done)
                job.meta["progress"] = {"questions_done": done, "questions": len(group[i].payload.questions),
                                        "tokens_generated": tokens}
                with contextlib.suppress(ConnectionError, TimeoutError):  # advisory: an outage must not fail it
                    rq.save_meta(job)
            self.hold.wait(job.id, done, self._alive)  # after the meta: a held job shows where it is
        return progress

    def _alive(self) -> None:
        """At a safe point of a running job: stop on a second signal, else tell the watchdog we live."""
        if self._abort:
            raise StopNow()
        self.hb.progress()

    def _finish(self, job: Job, execution: Execution | None, result: dict[str, Any] | None,
                error: dict[str, str] | None, route: str | None, started: float) -> None:
        """Store the outcome; keep retrying through a Redis outage so a computed answer is not lost."""
        with job_context(job.id, route, result["context_hash"] if result else None):
            line = job_finished_line(job.id, result, error, time.monotonic() - started)
            log.log(logging.INFO if error is None else logging.WARNING, "%s", line)
        counters = self.stats.count(result, error)
        wait = 0.5
        while True:
            try:
                if not self.claims.finish(job, execution, result, error, self.settings.queue.result_ttl_s,
                                          counters):
                    log.warning("job %s already had a result from another run; this one is dropped", job.id)
                self._last_meta.pop(job.id, None)
                return
            except (ConnectionError, TimeoutError) as e:
                if self._abort:
                    raise StopNow() from e
                log.warning("storing the result of job %s failed (%s); retrying in %.1f s", job.id, e, wait)
                time.sleep(wait)
                wait = min(wait * 2, 30.0)

    # --- what the heartbeat and reload read ----------------------------------------------------------
    def state(self) -> str:
        with self._lock:
            busy = bool(self.running)
        return "stopping" if self._stop else ("busy" if busy else "idle")

    def running_jobs(self) -> list[tuple[Job, Execution]]:
        with self._lock:
            return list(self.running)

    def cached_prefixes(self) -> int:
        """Entries in the engines' prefix caches (bundles sharing weights share one cache)."""
        caches = {id(c): c for e in self.engines.by_name.values() if (c := getattr(e, "cache", None)) is not None}
        return sum(len(c) for c in caches.values()) if caches else len(self.owned)

    def status_text(self, state: str) -> str:
        status = format_status(state, list(self.engines.by_name), self.cached_prefixes(), self.stats.jobs_done,
                               self.stats.hit_rate())
        return self.reloader.status_prefix() + status
