"""Debug-only fault injection for the service tests. Inert unless explicitly switched on.

`SEQSHARE_DEBUG=1` together with `SEQSHARE_DEBUG_HANG_MS=N` (both read once, at worker start) makes
the NEXT job hang for N ms inside a native call that releases the GIL (`_native.debug_sleep_ms`),
exactly like a stuck kernel: the worker's threads keep running but its main loop makes no progress,
so the systemd watchdog must fire. Without `SEQSHARE_DEBUG=1` the hang variable is ignored with a
warning, so a stray environment variable cannot stall a production worker.

Wiring: `Heartbeat.from_env` (daemon/notify.py) reads it at worker start and calls `maybe_hang()` when
the worker marks its first job in flight (`Heartbeat.busy()`), right before the engine call, so the
hang happens exactly where a stuck kernel would: with a job in flight and the GIL released.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_DEBUG = "SEQSHARE_DEBUG"
ENV_HANG_MS = "SEQSHARE_DEBUG_HANG_MS"


@dataclass
class DebugHang:
    ms: int
    armed: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DebugHang | None:
        env = os.environ if env is None else env
        raw = env.get(ENV_HANG_MS)
        if not raw:
            return None
        if env.get(ENV_DEBUG) != "1":
            log.warning("%s is set but %s is not 1: ignored", ENV_HANG_MS, ENV_DEBUG)
            return None
        if not raw.isdigit():
            log.warning("%s=%r is not a number of milliseconds: ignored", ENV_HANG_MS, raw)
            return None
        log.warning("debug mode: the next job will hang for %s ms in a native call", raw)
        return cls(int(raw))

    def maybe_hang(self) -> None:
        """Hang once (the first job after start), then never again."""
        if not self.armed:
            return
        self.armed = False
        from seqshare import _native  # absolute: the package is installed as seqshare

        log.warning("debug hang: blocking in native code for %d ms", self.ms)
        _native.debug_sleep_ms(self.ms)
