"""Recovery: what a dead worker left behind goes back to the shared queue.

Every worker runs `recover_own` at start (an earlier process of its name was killed) and
`recover_dead` at start and every few heartbeats (peers that died). A worker is dead when its
liveness hash expired, or when a process that shares its PID namespace proves its pid gone (see
`_alive`): workers in other containers, PID namespaces or sandboxes (ProtectProc=invisible) are
judged by their heartbeat alone.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from seqshare.jobqueue import rq_adapter as rq
from seqshare.jobqueue.claims import give_back_jobs
from seqshare.jobqueue.routing import Keys, ring, text
from seqshare.worker.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcEntry:
    """Where a worker process runs, as recorded in the procs hash: "host boot pidns pid start".

    A pid means something only inside its PID namespace of one kernel boot: `boot` (the kernel's
    boot id) and `pidns` (the inode of /proc/self/ns/pid, unique within a boot) say which. The host
    name is for people: containers and machines share host names, and the initial PID namespace has
    the same inode on every Linux box. `start` (clock ticks since boot) tells a reused pid apart.
    """

    host: str
    boot: str
    pidns: str
    pid: int
    start: str

    def __str__(self) -> str:
        return " ".join([self.host, self.boot or "-", self.pidns or "-", str(self.pid), self.start or "-"])

    @classmethod
    def parse(cls, raw: object) -> ProcEntry | None:
        """None for what this version did not write (an older worker's "host pid start")."""
        parts = text(raw).split(" ")
        if len(parts) != 5 or not parts[3].isdigit():
            return None
        host, boot, pidns, pid, start = (p if p != "-" else "" for p in parts)
        return cls(host, boot, pidns, int(pid), start)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""


def proc_entry(pid: int | None = None) -> ProcEntry:
    pid = os.getpid() if pid is None else pid
    return ProcEntry(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _pidns(), pid,
                     _start_time(pid))


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (clock ticks since boot), "" where this process cannot see it."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else ""


def local_verdict(entry: ProcEntry) -> bool | None:
    """True: the process provably runs; False: provably gone; None: this process cannot tell.

    Only a process in the same PID namespace of the same boot can judge a pid at all. Even there a
    peer may be invisible in /proc (ProtectProc=invisible, another user namespace): kill(pid, 0)
    still proves that no such pid exists, but a pid that exists and cannot be read may have been
    reused, so that is no verdict either. "Cannot see it" never means "dead".
    """
    me = proc_entry()
    if not (entry.boot and entry.pidns) or (entry.boot, entry.pidns) != (me.boot, me.pidns):
        return None
    try:
        os.kill(entry.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone we may not signal
    now = _start_time(entry.pid)
    if not now or not entry.start:
        return None
    return now == entry.start


def _alive(conn: Redis, keys: Keys, name: str, trust_expiry: bool = True) -> bool:
    """Alive while its liveness hash lives, unless this process can prove it gone.

    Every worker can prove it is alive through Redis (its heartbeat); the local check only speeds up
    the verdict (a worker killed with -9 is noticed at once by a peer in its PID namespace or by its
    own restart) and keeps a local peer alive whose hash expired in a Redis outage. Without a local
    verdict, an expired hash means dead only when `trust_expiry`: not while this worker is itself
    just back from an outage, when its peers have not had a heartbeat's chance to publish again.
    """
    live = bool(conn.exists(keys.info(name)))
    raw = conn.hget(keys.procs(), name)
    entry = ProcEntry.parse(raw) if raw is not None else None
    verdict = local_verdict(entry) if entry is not None else None
    if verdict is not None:
        return verdict
    return live or not trust_expiry


def recover_own(conn: Redis, keys: Keys, name: str, max_retries: int, ttl_s: float) -> int:
    """At start: take back what an earlier process of this name left (it was killed), or refuse to
    start when a process of this name still runs. Returns the number of jobs requeued.

    An earlier process this one cannot judge (another PID namespace: a restarted container) is
    given one liveness TTL to prove itself alive by its heartbeat before its jobs are taken back.
    """
    deadline = time.monotonic() + ttl_s + 1.0
    while _alive(conn, keys, name):
        raw = conn.hget(keys.procs(), name)
        entry = ProcEntry.parse(raw) if raw is not None else None
        if (entry is not None and local_verdict(entry)) or time.monotonic() > deadline:
            where = f" (host {entry.host}, pid {entry.pid})" if entry else ""
            raise ConfigError(f"a worker named {name} is already running{where}; worker names must be unique")
        time.sleep(0.1)  # its hash expires within the TTL unless it beats
    n = give_back_jobs(conn, keys, name, [text(j) for j in conn.lrange(keys.claimed(name), 0, -1)],
                   crashed=True, max_retries=max_retries)
    with conn.pipeline() as p:
        rq.forget_worker(p, name)  # rq refuses to register a name whose worker hash says it is alive
        p.delete(keys.info(name))
        p.execute()
    if n:
        log.warning("an earlier worker named %s died: requeued %d of its started jobs", name, n)
    return n


def recover_dead(conn: Redis, keys: Keys, me: str, max_retries: int, trust_expiry: bool = True) -> list[str]:
    """Give back the claimed jobs and per-worker queue of every dead worker; return their names.

    `trust_expiry=False` (this worker just had Redis back after an outage): only peers proven gone
    by a local process check are recovered, not those whose liveness hash merely expired.
    """
    recovered = []
    for raw in conn.smembers(keys.workers()):
        name = text(raw)
        if name == me or _alive(conn, keys, name, trust_expiry):
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
            rq.forget_worker(p, name)
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
    moved = int(script(keys=[rq.queue_key(queue_name), rq.queue_key(shared), rq.QUEUES_KEY],
                       args=[rq.JOB_PREFIX, shared]))
    if moved:
        with conn.pipeline() as p:
            ring(p, keys, shared)
            p.execute()
    return moved


def _drain_orphans(conn: Redis, keys: Keys, me: str) -> None:
    """A producer that routed a job just before its worker was recovered left it in a queue nobody
    reads: per-worker queues of unregistered workers are drained to the shared queue."""
    registered = {text(m) for m in conn.smembers(keys.workers())} | {me}
    for name in rq.known_queues(conn):
        if not name.startswith(keys.worker_prefix) or name.removeprefix(keys.worker_prefix) in registered:
            continue
        if n := drain_queue(conn, keys, name):
            log.warning("moved %d job(s) from the orphaned queue %s to the shared queue", n, rq.queue_key(name))
