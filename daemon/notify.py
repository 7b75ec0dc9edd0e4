"""Telling systemd how the worker is doing: readiness, status, stopping, reloading, and a watchdog.

Everything here is a no-op unless systemd started us with `NOTIFY_SOCKET` (Type=notify), so the
worker calls it unconditionally. Messages go through systemd-python's `systemd.daemon.notify`
(sd_notify(3)).

The watchdog is the point of this module. A thread sends `WATCHDOG=1` every WATCHDOG_USEC/2, but
only while the worker proves it is alive by calling `Heartbeat.progress()`: from its queue-polling
loop when idle, and from the engine's progress callback (between prefill chunks and decode steps)
while a job runs. A native call that hangs (with the GIL released, so this thread keeps running)
stops the ticks; after `stall_s` without one the thread withholds `WATCHDOG=1` and systemd kills
and restarts the worker. Pinging from a thread unconditionally would hide exactly that hang.

Use from the worker:

    hb = Heartbeat.from_env(notifier)         # reads WATCHDOG_USEC, SEQSHARE_WATCHDOG_STALL_S
    hb.start()                                # while loading: EXTEND_TIMEOUT_USEC as long as it progresses
    ... load bundles, calling hb.progress() between steps ...
    notifier.ready(status)                    # READY=1, only after load + warm-up
    hb.running()
    loop: hb.progress(); with hb.busy(): run_job(on_progress=hb.progress)
    SIGHUP (daemon/reload.py): notifier.reloading(); reload; notifier.ready(status)
    SIGTERM: notifier.stopping(); drain; hb.stop()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from seqshare.daemon.debug import DebugHang

log = logging.getLogger(__name__)

ENV_STALL = "SEQSHARE_WATCHDOG_STALL_S"
DEFAULT_STALL_S = 60.0
# While starting, each extension asks for this much more time; it is renewed as long as the load
# progresses, so a slow but healthy load never hits TimeoutStartSec= and a stuck one still does.
START_EXTEND_S = 30.0


class Notifier:
    """sd_notify messages; disabled (every call returns False) without NOTIFY_SOCKET."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._last_status: str | None = None
        # Put in front of every STATUS= while set (the watchdog's "stalled ..."), so the worker's
        # periodic status line cannot hide it from `systemctl status`.
        self.alert: str | None = None
        self._lock = threading.Lock()

    def send(self, *fields: str) -> bool:
        if not self.enabled:
            return False
        from systemd.daemon import notify  # imported lazily: a plain CLI run never needs libsystemd

        with self._lock:
            ok = bool(notify("\n".join(fields)))
        if not ok:
            log.warning("sd_notify(%s) failed", fields[0].split("=")[0])
        return ok

    def ready(self, status: str | None = None) -> bool:
        """READY=1: bundles loaded and warmed up (also ends a reload)."""
        return self.send("READY=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """STATUS=..., shown by `systemctl status`; unchanged text is not resent."""
        fields = self._status_field(text)
        return self.send(*fields) if fields else False

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *self._status_field(status or "stopping: draining current batch"))

    def reloading(self, status: str | None = None) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to its reload request.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                         *self._status_field(status or "reloading configuration"))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: the current start/stop timeout is at least `seconds` from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def _status_field(self, text: str | None) -> list[str]:
        if text is None:
            return []
        if self.alert:
            text = f"{self.alert}; {text}"
        text = " ".join(text.split())  # one line: a newline would start a new notify field
        if text == self._last_status:
            return []
        self._last_status = text
        return [f"STATUS={text}"]


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if no watchdog is for us."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # inherited from a parent: the watchdog is not ours
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


def format_status(state: str, models: list[str], prefixes: int, jobs_done: int,
                  hit_rate: float | None) -> str:
    """The STATUS= line: what an operator wants from `systemctl status` at a glance."""
    rate = "n/a" if hit_rate is None else f"{hit_rate:.0%}"
    return (f"{state}; models: {', '.join(models) or 'none'}; cached prefixes: {prefixes}; "
            f"jobs done: {jobs_done}; prefix hit rate: {rate}")


class Heartbeat:
    """Sends WATCHDOG=1 (and EXTEND_TIMEOUT_USEC while starting) only while progress() keeps ticking."""

    def __init__(self, notifier: Notifier, interval_s: float | None, stall_s: float = DEFAULT_STALL_S,
                 idle_stall_s: float | None = None, on_busy: Callable[[], None] | None = None):
        self.notifier = notifier
        self.on_busy = on_busy  # the debug hang (daemon/debug.py), run as a job starts
        self.interval_s = interval_s
        self.stall_s = stall_s
        self.idle_stall_s = stall_s if idle_stall_s is None else idle_stall_s
        self._last_progress = time.monotonic()
        self._in_flight = 0
        self._starting = True
        self._stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, notifier: Notifier, env: Mapping[str, str] | None = None,
                 stall_s: float | None = None) -> Heartbeat:
        env = os.environ if env is None else env
        if stall_s is None:
            raw = env.get(ENV_STALL)
            try:
                stall_s = float(raw) if raw else DEFAULT_STALL_S
            except ValueError:
                log.warning("ignoring %s=%r: not a number", ENV_STALL, raw)
                stall_s = DEFAULT_STALL_S
        hang = DebugHang.from_env(env)
        return cls(notifier, watchdog_interval(env), stall_s=stall_s, on_busy=hang.maybe_hang if hang else None)

    # --- called by the worker -------------------------------------------------------------------
    def progress(self) -> None:
        """The worker is alive and moving: a poll returned, a chunk was prefilled, a token decoded."""
        self._last_progress = time.monotonic()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """A job is in flight for the duration (the stricter stall threshold applies)."""
        with self._lock:
            self._in_flight += 1
        self.progress()
        try:
            if self.on_busy is not None:
                self.on_busy()
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
            self.progress()

    def running(self) -> None:
        """Start-up is over (call right after READY=1): no more start-timeout extensions."""
        self._starting = False

    def start(self) -> Heartbeat:
        if self.notifier.enabled and self._thread is None:
            # The first tick here, not in the thread: a start that has begun loading has asked for
            # more time before anything else can happen, however fast the load.
            self.beat()
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # --- the thread -----------------------------------------------------------------------------
    def is_progressing(self) -> bool:
        limit = self.stall_s if self._in_flight else self.idle_stall_s
        return time.monotonic() - self._last_progress <= limit

    def _period(self) -> float:
        if self.interval_s is not None:
            return self.interval_s
        return START_EXTEND_S / 3

    def _run(self) -> None:
        while not self._stop.wait(self._period()):
            self.beat()

    def beat(self) -> None:
        """One tick of the thread: ping if progressing, otherwise say (once) why we went silent."""
        if not self.is_progressing():
            if not self._stalled:
                self._stalled = True
                idle = time.monotonic() - self._last_progress
                log.error("no progress for %.1f s%s; withholding WATCHDOG=1 so systemd restarts the worker",
                          idle, " while a job is in flight" if self._in_flight else "")
                self.notifier.alert = f"stalled: no progress for {idle:.0f} s"
                self.notifier.status("watchdog pings withheld")
            return
        if self._starting:
            self.notifier.extend_timeout(START_EXTEND_S)
        if self.interval_s is not None:
            self.notifier.watchdog()
        if self._stalled:  # after the ping: no STATUS without "stalled" comes before it
            self._stalled = False
            self.notifier.alert = None
            log.warning("progress resumed; watchdog pings resume")
