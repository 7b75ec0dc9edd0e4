"""SIGHUP: reread the configuration and reload the bundles whose files changed, keeping the others.

`systemctl reload seqshare-worker@a` (the unit's ExecReload= sends SIGHUP) ends here. The signal
handler only raises a flag; the worker's loop calls `maybe_reload()` between batches, so no job ever
sees its engine swapped underneath it. A reload:

  1. tells systemd RELOADING=1;
  2. reads the configuration again from the same file and flags (a bad file: logged, nothing changes);
  3. checks the memory plan of the new configuration (an over-budget one is refused the same way);
  4. loads the models that are new, whose settings changed, or whose bundle file changed (another
     inode, size or mtime), drops the models no longer configured, and keeps every other engine
     object as it is: its weights and its prefix cache with every cached document stay;
  5. tells systemd READY=1 with the new status, whatever happened.

Settings that shape the process itself (Redis, name, threads, batch size, KV dtype, queues, cache and
memory budgets) take effect at the next restart; a reload that changes them says so in the log. The
model key is read again for changed bundles, but a systemd credential is only renewed by a restart.

A changed bundle gets a fresh prefix cache even when it keeps its weight digest (its old cached
prefixes may still come back from the spill directory, which is keyed by that digest).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..worker import executor
from ..worker.errors import SeqshareError
from ..worker.executor import Engines
from .config import ModelConfig, reread_settings
from .memory_plan import Budget, check_worker_plan
from .memory_probe import own_rss
from .worker_stats import publish_models

if TYPE_CHECKING:
    from .worker_main import ResidentWorker

log = logging.getLogger(__name__)

RESTART_ONLY = ("redis_url", "name", "threads", "max_batch", "kv_dtype", "queue", "cache", "memory")


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
        try:
            outcome = self._apply()
            log.info("reload done: %s", outcome)
        except Exception as e:  # the boundary: a failed reload keeps the worker serving the old config
            # A named failure (bad config, over budget, bad bundle) needs no traceback; anything else does.
            log.error("reload failed; still serving the previous configuration: %s", e,
                      exc_info=not isinstance(e, SeqshareError))
            outcome = f"reload failed: {e}"
        finally:
            w.notifier.ready(w._status_text(f"idle (last reload: {outcome})"))
        return outcome

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
            from .engines import load_engines

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
