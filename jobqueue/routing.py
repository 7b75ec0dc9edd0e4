"""Cache-aware routing: every Redis key seqshare uses, and where a job should go.

Workers own the contexts they serve: when a worker takes a job it records itself as the owner of the
job's context key (with a TTL, refreshed while the prefix stays in its cache). Producers send a job
to the per-worker queue of a live owner, otherwise to the shared queue, which idle workers drain.
A worker that takes a shared job whose context another live worker owns forwards it there, so a
document is prefilled by one worker even when its questions arrive interleaved with others.

rq keeps its own keys (queues, registries, job hashes: jobqueue/rq_adapter.py names them); these are
seqshare's beside them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline

NS = "seqshare:"
# Lua: the route's owner if it is another live worker, else take the route for ARGV[1].
_OWN_OR_FORWARD = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. owner) == 1 then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return ARGV[1]
"""
_RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""


@dataclass(frozen=True)
class Keys:
    """All key names in one place. `shared` and `worker_prefix` come from the queue config."""

    shared: str = "seqshare"
    worker_prefix: str = "seqshare:w:"

    # --- queues (rq queue names; the Redis list is rq_adapter.queue_key(name)) ---
    def shared_queue(self, priority: str = "normal") -> str:
        return self.shared if priority == "normal" else f"{self.shared}:{priority}"

    def shared_queues(self) -> list[str]:
        return [self.shared_queue("high"), self.shared_queue("normal"), self.shared_queue("low")]

    def worker_queue(self, worker: str) -> str:
        return f"{self.worker_prefix}{worker}"

    def queues_for(self, worker: str) -> list[str]:
        """What a worker listens to, in order: its own queue, then the shared ones by priority."""
        return [self.worker_queue(worker), *self.shared_queues()]

    # --- wake-ups: producers push a token, idle workers block on them ---
    def bell(self, queue_name: str) -> str:
        shared = queue_name in self.shared_queues()
        return f"{NS}bell:{'shared' if shared else queue_name}"

    # --- routing and grouping ---
    @staticmethod
    def route(ctx_key: str) -> str:
        return f"{NS}route:{ctx_key}"

    @staticmethod
    def group(ctx_key: str) -> str:
        """Set of queued job ids with this context key (for batching jobs that arrive together)."""
        return f"{NS}group:{ctx_key}"

    # --- workers ---
    @staticmethod
    def workers() -> str:
        return f"{NS}workers"

    @staticmethod
    def procs() -> str:
        """Hash name -> "host pid" without a TTL: tells a live process from a dead one after the
        liveness hash expired during a Redis outage."""
        return f"{NS}procs"

    @staticmethod
    def info_prefix() -> str:
        return f"{NS}worker:"

    def info(self, worker: str) -> str:
        """Hash with the worker's state and counters; its TTL is the liveness signal."""
        return self.info_prefix() + worker

    @staticmethod
    def stats(worker: str) -> str:
        """Hash of a worker's counters (kept a day after it stops, for status and metrics)."""
        return f"{NS}wstats:{worker}"

    @staticmethod
    def claimed(worker: str) -> str:
        """List of job ids a worker took and has not finished (what recovery gives back)."""
        return f"{NS}claimed:{worker}"

    @staticmethod
    def recovering(worker: str) -> str:
        return f"{NS}recovering:{worker}"

    # --- the test-only job gate (jobqueue/hold.py; honoured only with SEQSHARE_TEST_HOLD=1) ---
    @staticmethod
    def test_hold() -> str:
        """String N: a running job that has answered N questions pauses before its next step."""
        return f"{NS}test:hold"

    @staticmethod
    def test_pass() -> str:
        """Set of job ids the hold lets through."""
        return f"{NS}test:pass"

    @staticmethod
    def test_held() -> str:
        """Hash job id -> worker name of the jobs paused by the hold right now."""
        return f"{NS}test:held"

    # --- figures ---
    @staticmethod
    def models() -> str:
        return f"{NS}models"

    @staticmethod
    def totals() -> str:
        return f"{NS}totals"

    @staticmethod
    def minute(epoch_minute: int) -> str:
        return f"{NS}minute:{epoch_minute}"


def text(raw: object) -> str:
    """A Redis reply as str (redis-py returns bytes unless the connection decodes responses)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


GROUP_TTL_S = 24 * 3600
BELL_MAX = 64


def live_workers(conn: Redis, keys: Keys, names: Sequence[str]) -> set[str]:
    """The subset of `names` whose liveness key has not expired."""
    names = list(dict.fromkeys(names))
    if not names:
        return set()
    with conn.pipeline(transaction=False) as p:
        for n in names:
            p.exists(keys.info(n))
        alive = p.execute()
    return {n for n, a in zip(names, alive, strict=True) if a}


def route_queues(conn: Redis, keys: Keys, ctx_keys: Sequence[str], priorities: Sequence[str]) -> list[str]:
    """Producer side: the queue name for each job (owner's queue if the owner is alive, else shared)."""
    if not ctx_keys:
        return []
    owners = [text(o) if o else None for o in conn.mget([keys.route(k) for k in ctx_keys])]
    alive = live_workers(conn, keys, [o for o in owners if o])
    return [keys.worker_queue(o) if o in alive else keys.shared_queue(p)
            for o, p in zip(owners, priorities, strict=True)]


def ring(pipe: Pipeline, keys: Keys, queue_name: str) -> None:
    """Wake a worker blocked on this queue's bell (bounded: tokens only say 'look again')."""
    bell = keys.bell(queue_name)
    pipe.lpush(bell, 1)
    pipe.ltrim(bell, 0, BELL_MAX - 1)


def own_or_forward(conn: Redis, keys: Keys, ctx_key: str, me: str, ttl_s: int) -> str:
    """Worker side: take ownership of a context unless another live worker holds it; return the owner."""
    script = conn.register_script(_OWN_OR_FORWARD)
    owner = script(keys=[keys.route(ctx_key)], args=[me, ttl_s, keys.info_prefix()])
    return owner.decode() if isinstance(owner, bytes) else str(owner)


def refresh_routes(conn: Redis, keys: Keys, ctx_keys: Sequence[str], me: str, ttl_s: int) -> None:
    """Renew ownership of contexts still cached, unless another worker took one over meanwhile."""
    if not ctx_keys:
        return
    script = conn.register_script(_RENEW)
    with conn.pipeline(transaction=False) as p:
        for k in ctx_keys:
            script(keys=[keys.route(k)], args=[me, ttl_s], client=p)
        p.execute()


def drop_routes(conn: Redis, keys: Keys, ctx_keys: Sequence[str], me: str) -> None:
    """Give up contexts that are no longer cached, where we are still the recorded owner."""
    if not ctx_keys:
        return
    route_keys = [keys.route(k) for k in ctx_keys]
    owners = conn.mget(route_keys)
    mine = [rk for rk, o in zip(route_keys, owners, strict=True) if o and text(o) == me]
    if mine:
        conn.delete(*mine)


class OwnedContexts:
    """The context keys whose prefix this worker computed, most recent last, at most `limit`: the
    heartbeat renews their routes. Shared by the main thread (add) and the heartbeat (keys)."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, ctx: str) -> None:
        with self._lock:
            self._keys[ctx] = None
            self._keys.move_to_end(ctx)
            while len(self._keys) > self.limit:
                self._keys.popitem(last=False)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
