"""The resident worker's heartbeat thread.

The main thread may sit for minutes in one native call (the GIL released), so liveness cannot come
from it. Every `beat_s` this thread proves the worker alive to its peers and to rq (its info hash,
the procs entry, rq's worker key, the running jobs' executions), keeps the routes of the contexts it
holds, and refreshes systemd's STATUS and the metrics file. Every second beat it looks for dead
peers (jobqueue/recovery.py) -- trusting an expired hash only once our own Redis link has been up
for a whole TTL, since a peer cannot beat through an outage either.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError, TimeoutError

from seqshare.jobqueue.recovery import recover_dead
from seqshare.jobqueue.routing import refresh_routes
from seqshare.jobqueue.stats import write_metrics

if TYPE_CHECKING:
    from seqshare.jobqueue.resident import ResidentWorker

log = logging.getLogger(__name__)


class Beat:
    def __init__(self, worker: ResidentWorker):
        self.w = worker
        self.outage_at = -float("inf")  # when Redis last failed us (either thread)
        self.peers_checked_at = 0.0  # wall time of the last look for dead peers (published: operators, tests)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="seqshare-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def outage(self) -> None:
        self.outage_at = time.monotonic()

    def publish(self, p: Any, state: str) -> None:
        """Queue the worker's liveness records on pipeline `p`."""
        w = self.w
        # Re-added every beat: a peer that took us for dead (our hash expired in a Redis outage) removed us.
        p.sadd(w.keys.workers(), w.name)
        p.hset(w.keys.procs(), w.name, w.proc)
        info = w.keys.info(w.name)
        p.hset(info, mapping={"hostname": socket.gethostname(), "pid": os.getpid(), "state": state,
                              "models": ",".join(w.engines.by_name), "cached_prefixes": w.cached_prefixes(),
                              "queue": w.queues[0], "last_heartbeat": time.time(),
                              "peers_checked_at": self.peers_checked_at})
        p.expire(info, w.ttl_s)

    def _loop(self) -> None:
        last_recover = 0.0
        while not self._stop.wait(self.w.beat_s):
            try:
                state = self.w.state()
                self._beat(state)
                if time.monotonic() - last_recover > self.w.beat_s * 2:
                    last_recover = time.monotonic()
                    self._check_peers()
                self.w.notifier.status(self.w.status_text(state))
                if self.w.settings.metrics_file is not None:
                    write_metrics(self.w.conn, self.w.keys, self.w.settings.metrics_file)
            except (ConnectionError, TimeoutError) as e:
                self.outage()
                log.debug("heartbeat skipped: %s", e)
            except Exception:
                log.exception("heartbeat failed")

    def _beat(self, state: str) -> None:
        w = self.w
        running = w.running_jobs()
        with w.conn.pipeline(transaction=False) as p:
            self.publish(p, state)
            w.rq.beat(p)
            p.execute()
        w.claims.heartbeat(running)
        refresh_routes(w.conn, w.keys, w.owned.keys(), w.name, w.route_ttl_s)

    def _check_peers(self) -> None:
        w = self.w
        trust_expiry = time.monotonic() - self.outage_at > w.ttl_s
        recover_dead(w.conn, w.keys, w.name, w.max_retries, trust_expiry)
        self.peers_checked_at = time.time()
