"""Recovery: what a dead worker left behind goes back to the shared queue.

Every worker runs `recover_own` at start (an earlier process of its name was killed) and
`recover_dead` at start and every few heartbeats (peers that died). A worker is dead when its
liveness hash expired or, on this host, when its pid is gone: so a worker killed with -9 is noticed
at once by a peer or by its own restart, and a live one is not taken for dead while a Redis outage
longer than the liveness TTL lets its hash expire.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from redis import Redis
from rq.job import Job
from rq.queue import Queue

from ..worker.errors import ConfigError
from ..worker.routing import Keys, ring, text
from .claims import give_back_jobs

log = logging.getLogger(__name__)


def proc_entry(pid: int | None = None) -> str:
    """"host pid start" for the procs hash; the start time tells a reused pid from the worker's."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {pid} {_start_time(pid)}"


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (clock ticks since boot), "" where there is no /proc or no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(conn: Redis, keys: Keys, name: str) -> bool:
    """Alive while its liveness hash has not expired, unless it ran on this host and its process is gone.

    After the hash expired (a Redis outage longer than the TTL), a process on this host still counts
    as alive while it runs: it will publish again at its next heartbeat.
    """
    live = bool(conn.exists(keys.info(name)))
    raw = conn.hget(keys.procs(), name)
    if raw is None:
        return live
    host, pid, start = [*text(raw).split(" "), "", ""][:3]
    if host != socket.gethostname() or not pid.isdigit():
        return live
    if not Path("/proc").is_dir():  # no start times to compare: the pid alone
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    now = _start_time(int(pid))
    return bool(now) and (not start or now == start)


def recover_own(conn: Redis, keys: Keys, name: str, max_retries: int) -> int:
    """At start: take back what an earlier process of this name left (it was killed), or refuse to
    start when a process of this name still runs. Returns the number of jobs requeued."""
    if _alive(conn, keys, name):
        host, pid, _ = (text(conn.hget(keys.procs(), name) or "? ?") + " ").split(" ", 2)
        raise ConfigError(f"a worker named {name} is already running (host {host}, pid {pid}); "
                          "worker names must be unique")
    n = give_back_jobs(conn, keys, name, [text(j) for j in conn.lrange(keys.claimed(name), 0, -1)],
                   crashed=True, max_retries=max_retries)
    with conn.pipeline() as p:  # rq refuses to register a name whose worker hash says it is alive
        p.srem("rq:workers", f"rq:worker:{name}")
        p.delete(f"rq:worker:{name}", keys.info(name))
        p.execute()
    if n:
        log.warning("an earlier worker named %s died: requeued %d of its started jobs", name, n)
    return n


def recover_dead(conn: Redis, keys: Keys, me: str, max_retries: int) -> list[str]:
    """Give back the claimed jobs and per-worker queue of every dead worker; return their names."""
    recovered = []
    for raw in conn.smembers(keys.workers()):
        name = text(raw)
        if name == me or _alive(conn, keys, name):
            continue
        if not conn.set(keys.recovering(name), me, nx=True, ex=60):
            continue  # a peer is on it
        conn.delete(keys.info(name))  # first: nobody routes or forwards to it any more
        jobs = [text(j) for j in conn.lrange(keys.claimed(name), 0, -1)]
        n = give_back_jobs(conn, keys, name, jobs, crashed=True, max_retries=max_retries)
        moved = drain_queue(conn, keys, keys.worker_queue(name))
        with conn.pipeline() as p:
            p.srem(keys.workers(), name)
            p.hdel(keys.procs(), name)
            p.delete(keys.claimed(name), keys.recovering(name))
            p.srem("rq:workers", f"rq:worker:{name}")
            p.delete(f"rq:worker:{name}")
            p.execute()
        log.warning("worker %s is dead: requeued %d started and %d routed jobs", name, n, moved)
        recovered.append(name)
    _drain_orphans(conn, keys, me)
    return recovered


# KEYS: the per-worker queue, the shared queue, rq's set of queues. ARGV: job key prefix, shared queue name.
_DRAIN = """
local n = 0
while true do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  redis.call('HSET', ARGV[1] .. id, 'origin', ARGV[2])
  n = n + 1
end
redis.call('SREM', KEYS[3], KEYS[1])
if n > 0 then redis.call('SADD', KEYS[3], KEYS[2]) end
return n
"""


def drain_queue(conn: Redis, keys: Keys, queue_name: str) -> int:
    """Move every job of a per-worker queue to the shared queue, in one atomic step.

    A job forwarded there a moment later re-creates the queue; `_drain_orphans` finds it then.
    """
    shared = keys.shared_queue("normal")
    script = conn.register_script(_DRAIN)
    moved = int(script(keys=[Keys.rq_queue(queue_name), Keys.rq_queue(shared), Queue.redis_queues_keys],
                       args=[Job.redis_job_namespace_prefix, shared]))
    if moved:
        with conn.pipeline() as p:
            ring(p, keys, shared)
            p.execute()
    return moved


def _drain_orphans(conn: Redis, keys: Keys, me: str) -> None:
    """A producer that routed a job just before its worker was recovered left it in a queue nobody
    reads: per-worker queues of unregistered workers are drained to the shared queue."""
    prefix = Keys.rq_queue(keys.worker_prefix)
    registered = {text(m) for m in conn.smembers(keys.workers())} | {me}
    for raw in conn.smembers(Queue.redis_queues_keys):
        qkey = text(raw)
        if not qkey.startswith(prefix) or qkey.removeprefix(prefix) in registered:
            continue
        if n := drain_queue(conn, keys, qkey.removeprefix("rq:queue:")):
            log.warning("moved %d job(s) from the orphaned queue %s to the shared queue", n, qkey)
