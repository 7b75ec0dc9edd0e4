"""A gate for tests: pause a running job at a known point until the test lets it go.

A test that needs a job still running (to kill its worker, restart Redis under it, outlive a TTL)
cannot rely on the job being long: a faster CPU finishes it first. With SEQSHARE_TEST_HOLD=1 in the
worker's environment, the worker checks the gate at every progress point of a job (prefill chunks,
decode steps): while the key `seqshare:test:hold` holds N, a job that has answered at least N of its
questions and is not in the set `seqshare:test:pass` waits there, listed in the hash
`seqshare:test:held` (job id -> worker name).
Deleting the key, or adding the job id to the pass set, lets it go on. While it waits, the heartbeat
thread keeps the worker and the job alive, a second stop signal still stops it, and a Redis outage is
waited out (the hold stays). Without the variable none of this runs: no Redis call, no pause.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import ConnectionError, TimeoutError

from seqshare.jobqueue.routing import Keys

ENV_HOLD = "SEQSHARE_TEST_HOLD"
POLL_S = 0.01


class JobHold:
    def __init__(self, conn: Redis, keys: Keys, worker: str, enabled: bool):
        self.conn, self.keys, self.worker, self.enabled = conn, keys, worker, enabled

    @classmethod
    def from_env(cls, conn: Redis, keys: Keys, worker: str) -> JobHold:
        return cls(conn, keys, worker, os.environ.get(ENV_HOLD) == "1")

    def _holds(self, job_id: str, questions_done: int) -> bool | None:
        """Whether the gate holds this job now; None while Redis cannot say."""
        try:
            raw = self.conn.get(self.keys.test_hold())
            if raw is None or questions_done < int(raw):
                return False
            return not self.conn.sismember(self.keys.test_pass(), job_id)
        except (ConnectionError, TimeoutError):
            return None

    def wait(self, job_id: str, questions_done: int, alive: Callable[[], None]) -> None:
        """Return once the gate lets the job go. `alive` runs every poll: it tells the watchdog the
        worker is well and raises to stop (a second stop signal)."""
        if not self.enabled or not self._holds(job_id, questions_done):
            return
        listed = False
        try:
            while (holds := self._holds(job_id, questions_done)) is not False:
                if holds and not listed:
                    with contextlib.suppress(ConnectionError, TimeoutError):
                        self.conn.hset(self.keys.test_held(), job_id, self.worker)
                        listed = True
                alive()
                time.sleep(POLL_S)
        finally:
            with contextlib.suppress(ConnectionError, TimeoutError):
                self.conn.hdel(self.keys.test_held(), job_id)
