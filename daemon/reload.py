"""SIGHUP: reread the configuration and reload the bundles whose files changed, keeping the others.

`systemctl reload seqshare-worker@a` ends here. The unit's ExecReload= runs `seqshare reload --pid
$MAINPID` (`request_reload`), which sends SIGHUP and waits for this reload's outcome in the worker's
state file (`reload.json` in $RUNTIME_DIRECTORY), so systemctl returns when the reload is done and
fails when it failed. (Type=notify-reload would wait for READY=1 but has no way to report a failure.)
The signal handler only raises a flag; the worker's loop calls `maybe_reload()` between batches, so
no job ever sees its engine swapped underneath it. A reload:

  1. tells systemd RELOADING=1;
  2. reads the configuration again from the same file and flags (a bad file: logged, nothing changes);
  3. checks the memory plan of the new configuration (an over-budget one is refused the same way);
  4. loads the models that are new, whose settings changed, or whose bundle file changed (another
     inode, size or mtime), drops the models no longer configured, and keeps every other engine
     object as it is: its weights and its prefix cache with every cached document stay;
  5. tells systemd READY=1 with the new status, whatever happened (a failed reload stays at the front
     of the STATUS line until a reload succeeds), then writes the outcome to the state file.

Settings that shape the process itself (Redis, name, threads, batch size, KV dtype, queues, cache and
memory budgets) take effect at the next restart; a reload that changes them says so in the log. The
model key is read again for changed bundles, but a systemd credential is only renewed by a restart.

A changed bundle gets a fresh prefix cache even when it keeps its weight digest (its old cached
prefixes may still come back from the spill directory, which is keyed by that digest).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from seqshare.daemon.config import ModelConfig, reread_settings
from seqshare.daemon.memory_plan import Budget, check_worker_plan
from seqshare.daemon.memory_probe import own_rss
from seqshare.jobqueue import executor
from seqshare.jobqueue.executor import Engines
from seqshare.jobqueue.stats import publish_models
from seqshare.worker.errors import SeqshareError

if TYPE_CHECKING:
    from seqshare.jobqueue.resident import ResidentWorker

log = logging.getLogger(__name__)

STATE_FILE = "reload.json"
ENV_RUNTIME_DIR = "RUNTIME_DIRECTORY"  # set by systemd from the unit's RuntimeDirectory=
RESTART_ONLY = ("redis_url", "name", "threads", "max_batch", "kv_dtype", "kv_pair_tiles", "queue", "cache", "memory")


@dataclass(frozen=True)
class FileStamp:
    """Enough of a file's identity to tell that it was replaced or rewritten."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Reloader:
    """Owned by the worker: `request` is the SIGHUP handler, `maybe_reload` runs at a safe point."""

    def __init__(self, worker: ResidentWorker):
        self.worker = worker
        self.pending = False
        self.loaded = self._stamps(worker.settings.models)
        self.failed: str | None = None  # the last reload's error, until one succeeds
        self.seq = 0  # reloads done by this process: what `request_reload` waits to see grow
        self.state_dir = runtime_dir()  # where `seqshare reload` reads the outcome; None outside systemd

    @staticmethod
    def _stamps(models: list[ModelConfig]) -> dict[str, tuple[ModelConfig, FileStamp | None]]:
        return {m.name: (m, FileStamp.of(m.path)) for m in models}

    def request(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True  # a signal handler does no work: the loop reloads between batches

    def maybe_reload(self) -> None:
        if self.pending:
            self.pending = False
            self.reload()

    def reload(self) -> str:
        """Apply the configuration on disk now; returns what happened (also logged)."""
        w = self.worker
        w.notifier.reloading()
        log.info("SIGHUP: reloading the configuration")
        ok = False
        try:
            outcome = self._apply()
            ok, self.failed = True, None
            log.info("reload done: %s", outcome)
        except Exception as e:  # the boundary: a failed reload keeps the worker serving the old config
            # A named failure (bad config, over budget, bad bundle) needs no traceback; anything else does.
            log.error("reload failed; still serving the previous configuration: %s", e,
                      exc_info=not isinstance(e, SeqshareError))
            self.failed = str(e)
            outcome = f"reload failed: {e}"
        finally:
            self.seq += 1
            w.notifier.ready(w.status_text(f"idle (last reload: {outcome})" if ok else "idle"))
            self._write_state(ok, outcome)  # last: `seqshare reload` returns once systemd has READY=1
        return outcome

    def status_prefix(self) -> str:
        """Put in front of the STATUS line while the last reload failed."""
        return f"reload failed, serving the previous configuration: {self.failed}; " if self.failed else ""

    def _write_state(self, ok: bool, outcome: str) -> None:
        if self.state_dir is None:
            return
        state = {"pid": os.getpid(), "seq": self.seq, "ok": ok, "outcome": outcome, "time": time.time()}
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            tmp.replace(path)  # atomic: the waiting `seqshare reload` never reads half a file
        except OSError as e:
            log.warning("cannot write the reload outcome to %s: %s", path, e)

    def _changed(self, m: ModelConfig) -> bool:
        before = self.loaded.get(m.name)
        return before is None or before[0] != m or before[1] != FileStamp.of(m.path)

    def _apply(self) -> str:
        w = self.worker
        old = w.settings
        new = reread_settings(old)
        later = [f for f in RESTART_ONLY if getattr(new, f) != getattr(old, f)]
        if later:
            log.warning("reload: %s changed; that takes effect at the next restart", ", ".join(later))
        settings = new.model_copy(update={f: getattr(old, f) for f in RESTART_ONLY})
        # Would this configuration fit if the worker started afresh now? What it holds comes back.
        measured = Budget.measure()
        check_worker_plan(settings, Budget(measured.mem_available + own_rss(), measured.cgroup_limit,
                                           measured.cgroup_source))
        to_load = [m for m in settings.models if self._changed(m)]
        names = [m.name for m in settings.models]
        dropped = [n for n in w.engines.by_name if n not in names]
        loaded: dict[str, Any] = {}
        if to_load:
            from seqshare.daemon.engines import load_engines

            subset = settings.model_copy(update={"models": to_load})
            loaded = dict(load_engines(subset, progress=w.hb.progress, check_memory=False).by_name)
        w.engines = Engines({n: loaded[n] if n in loaded else w.engines.by_name[n] for n in names})
        executor.install(w.engines)
        w.settings = settings
        self.loaded = self._stamps(settings.models)
        if loaded:
            with w.conn.pipeline() as p:
                publish_models(p, w.keys, w.engines)
                p.execute()
        kept = [n for n in names if n not in loaded]
        return (f"loaded {', '.join(loaded) or 'none'}; kept {', '.join(kept) or 'none'}; "
                f"dropped {', '.join(dropped) or 'none'}")


def runtime_dir() -> Path | None:
    """The unit's RuntimeDirectory= (the first, if several), where the reload outcome is written."""
    raw = os.environ.get(ENV_RUNTIME_DIR, "")
    return Path(raw.split(":")[0]) if raw else None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def request_reload(pid: int, state_dir: Path, timeout_s: float, poll_s: float = 0.05) -> tuple[bool, str]:
    """SIGHUP the worker `pid` and wait for the outcome of the reload it causes: (ok, what happened).

    The worker counts its reloads in the state file; the one after our signal is the first with a
    higher count from the same pid. Two requests at once may share one reload: both see it.
    """
    path = state_dir / STATE_FILE
    before = _read_state(path)
    seen = int(before.get("seq", 0)) if before.get("pid") == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False, f"no worker process {pid}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _read_state(path)
        if state.get("pid") == pid and int(state.get("seq", 0)) > seen:
            return bool(state.get("ok")), str(state.get("outcome", ""))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, f"worker process {pid} exited before it reloaded"
        except PermissionError:
            pass
        time.sleep(poll_s)
    return False, (f"no reload outcome from worker {pid} in {path} after {timeout_s:.0f} s "
                   "(it reloads between batches: is a long batch running?)")
