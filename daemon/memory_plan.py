"""The memory plan: what a worker will need, computed from the config and the bundle headers, and
whether the machine and the cgroup allow it. Derived sizes live here, never in the Settings.

Per worker process:
  weights       weight_bytes of each distinct weight digest (bundles sharing weights count once)
  KV arena      per model: share_length + max_batch slots of (seq_length - share_length) token rows
                (plus each slot's spare rows for any tile phase: worker/kv_arena.py, which allocates
                exactly these slots at load), i.e. the document being prefilled plus a private tail per
                batched sequence (the seed's three segments, batched), times kv_bytes_per_token (the
                rows, and on the avx512 and amx levels their BF16 pair tiles too)
  prefix cache  cache.memory_bytes (cached documents' KV)
  scratch       memory.scratch_bytes (activations, logits, sampler buffers)
  runtime       the interpreter and its libraries (RUNTIME_BYTES, measured)
The budget is the smaller of MemAvailable and the tightest cgroup memory limit.

`seqshare memory-setup` computes the plan for `memory.workers` workers and writes it (`write_plan`)
where the workers look for it. A worker calls `prepare_memory(settings)` before loading anything: it
computes its own plan against the budget it sees now (its own cgroup, the MemAvailable left by the
workers already running), refuses an over-budget config, and also refuses when memory-setup's plan
for this same configuration said the workers do not fit together. The refusal is a ConfigError, so
the worker exits 78 (EX_CONFIG, which the unit does not restart). Then it locks memory if asked.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seqshare.bundle.spec import ModelSpec
from seqshare.daemon.config import ModelConfig, Settings
from seqshare.daemon.memory_probe import CgroupLimit, cgroup_memory_limit, lock_memory, mem_available
from seqshare.daemon.paths import seqshare_home
from seqshare.worker.errors import ConfigError, MemoryBudgetError, SeqshareError
from seqshare.worker.kv_arena import kv_bytes_per_token, slot_allocated_rows, slot_rows

log = logging.getLogger(__name__)

EX_CONFIG = 78
MIB = 1 << 20
PLAN_FILE = "memory-plan.json"
PLAN_VERSION = 1
# An idle worker with numpy, tokenizers, transformers, redis/rq and the native module imported
# measured 77 MiB RSS; the rest covers the loaded tokenizer, thread stacks and allocator slack.
RUNTIME_BYTES = 192 * MIB


@dataclass(frozen=True)
class BundleFacts:
    """What the plan needs from one bundle's header (no weights are read)."""

    name: str
    path: Path
    spec: ModelSpec
    share_length: int
    unshare_length: int
    seq_length: int
    weight_bytes: int
    weight_digest: str

    def kv_arena_tokens(self, max_batch: int) -> int:
        return self.share_length + max_batch * slot_allocated_rows(slot_rows(self.seq_length, self.share_length))


@dataclass(frozen=True)
class PlanItem:
    kind: str  # weights | kv_arena | prefix_cache | scratch | runtime
    label: str
    bytes: int
    detail: str = ""


@dataclass(frozen=True)
class Budget:
    mem_available: int
    cgroup_limit: int | None
    cgroup_source: str | None

    @property
    def bytes(self) -> int:
        return self.mem_available if self.cgroup_limit is None else min(self.mem_available, self.cgroup_limit)

    @property
    def binding(self) -> str:
        if self.cgroup_limit is not None and self.cgroup_limit < self.mem_available:
            return f"the cgroup limit ({self.cgroup_source})"
        return "MemAvailable (/proc/meminfo)"

    @classmethod
    def measure(cls) -> Budget:
        cg: CgroupLimit = cgroup_memory_limit()
        return cls(mem_available(), cg.limit_bytes, str(cg.source) if cg.source else None)


@dataclass(frozen=True)
class MemoryPlan:
    items: list[PlanItem]
    workers: int
    budget: Budget
    kv_dtype: str
    max_batch: int
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def per_worker_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def total_bytes(self) -> int:
        return self.per_worker_bytes * self.workers

    @property
    def device_bytes(self) -> int:
        """What an accelerator must hold: everything but the host-side runtime."""
        return sum(i.bytes for i in self.items if i.kind != "runtime") * self.workers

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget.bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(self.total_bytes - self.budget.bytes, 0)

    def verdict(self) -> str:
        if self.fits:
            return (f"fits: needs {_fmt(self.total_bytes)} of {_fmt(self.budget.bytes)} allowed by "
                    f"{self.budget.binding}; headroom {_fmt(self.budget.bytes - self.total_bytes)}")
        top = sorted(self.items, key=lambda i: i.bytes, reverse=True)[:2]
        parts = ", ".join(f"{i.label} {_fmt(i.bytes)}" for i in top)
        return (f"does not fit: needs {_fmt(self.total_bytes)} but {self.budget.binding} allows "
                f"{_fmt(self.budget.bytes)}; short by {_fmt(self.shortfall_bytes)} (largest: {parts}); "
                f"lower cache.memory_bytes, max_batch or the models' seq_length, or raise the limit")

    def table(self) -> str:
        rows = [(i.label, i.detail, _fmt(i.bytes)) for i in self.items]
        rows.append(("per worker", "", _fmt(self.per_worker_bytes)))
        if self.workers > 1:
            rows.append((f"total ({self.workers} workers)", "", _fmt(self.total_bytes)))
        cg = "unlimited" if self.budget.cgroup_limit is None else _fmt(self.budget.cgroup_limit)
        rows.append(("MemAvailable", "/proc/meminfo", _fmt(self.budget.mem_available)))
        rows.append(("cgroup memory limit", self.budget.cgroup_source or "no memory cgroup", cg))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c:>10}" for a, b, c in rows]
        return "\n".join([*lines, self.verdict()])

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fits": self.fits,
            "workers": self.workers,
            "kv_dtype": self.kv_dtype,
            "max_batch": self.max_batch,
            "items": [asdict(i) for i in self.items],
            "models": self.models,
            "per_worker_bytes": self.per_worker_bytes,
            "total_bytes": self.total_bytes,
            "device_bytes": self.device_bytes,
            "budget": {**asdict(self.budget), "bytes": self.budget.bytes, "binding": self.budget.binding},
            "shortfall_bytes": self.shortfall_bytes,
            "verdict": self.verdict(),
        }


def _fmt(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MIB:.1f} MiB"


def compute_plan(settings: Settings, bundles: Sequence[BundleFacts], budget: Budget,
                 workers: int = 1) -> MemoryPlan:
    items: list[PlanItem] = []
    by_digest: dict[str, list[BundleFacts]] = {}
    for b in bundles:
        by_digest.setdefault(b.weight_digest, []).append(b)
    for digest, group in by_digest.items():
        names = ", ".join(b.name for b in group)
        shared = f"shared by {len(group)} bundles" if len(group) > 1 else "1 bundle"
        items.append(PlanItem("weights", f"weights {names}", group[0].weight_bytes,
                              f"digest {digest[:12]}, {shared}"))
    for b in bundles:
        tokens = b.kv_arena_tokens(settings.max_batch)
        per_token = kv_bytes_per_token(b.spec, settings.kv_dtype, settings.kv_pair_tiles)
        pairs = " + BF16 pair tiles" if per_token > b.spec.kv_bytes_per_token(settings.kv_dtype) else ""
        items.append(PlanItem("kv_arena", f"KV arena {b.name}", tokens * per_token,
                              f"{b.share_length}+{settings.max_batch}x({b.seq_length}-{b.share_length}+spare) "
                              f"tokens x {per_token} B ({settings.kv_dtype}{pairs})"))
    items.append(PlanItem("prefix_cache", "prefix cache", settings.cache.memory_bytes, "cache.memory_bytes"))
    items.append(PlanItem("scratch", "scratch", settings.memory.scratch_bytes, "memory.scratch_bytes"))
    items.append(PlanItem("runtime", "runtime", RUNTIME_BYTES, "interpreter and libraries"))
    models = [{"name": b.name, "path": str(b.path), "weight_digest": b.weight_digest,
               "weight_bytes": b.weight_bytes, "share_length": b.share_length,
               "unshare_length": b.unshare_length, "seq_length": b.seq_length,
               "kv_arena_tokens": b.kv_arena_tokens(settings.max_batch)} for b in bundles]
    return MemoryPlan(items, workers, budget, settings.kv_dtype, settings.max_batch, models)




# --- bundle headers ---------------------------------------------------------------------------------
def read_header(path: Path, key_file: Path | None = None) -> dict[str, Any]:
    """A bundle's JSON header (spec, limits, weight bytes and digest); no weights are read.

    An encrypted bundle's header is inside the ciphertext: it needs the key, from the same sources
    the worker uses (key_file, $SEQSHARE_MODEL_KEY, the systemd credential seqshare-model-key).
    """
    from seqshare.bundle import crypto
    from seqshare.bundle import format as bundle

    if not crypto.is_encrypted(path):
        with path.open("rb") as f:
            head = f.read(bundle.PREAMBLE.size)
            hlen, _, _ = bundle.parse_preamble(head, str(path))
            head += f.read(hlen)
        return bundle.parse_bundle(head, path.stat().st_size, str(path)).header
    ef = crypto.open_encrypted(path)
    found = crypto.resolve_key(key_file)
    if found is None:
        raise ConfigError(f"{path} is encrypted: its header (model shape, limits) needs the key; give "
                          f"key_file, ${crypto.KEY_ENV} or the systemd credential {crypto.CREDENTIAL!r}")
    head = crypto.decrypt_prefix(ef, found[0], bundle.PREAMBLE.size, verify_rest=False)
    hlen, _, _ = bundle.parse_preamble(head, str(path))
    head = crypto.decrypt_prefix(ef, found[0], bundle.PREAMBLE.size + hlen, verify_rest=False)
    return bundle.parse_bundle(head, ef.plaintext_bytes, str(path)).header


def bundle_facts(model: ModelConfig, key_file: Path | None = None) -> BundleFacts:
    """Facts of one configured model: its bundle's header, limits lowered by the config's overrides."""
    if not model.path.is_file():
        raise ConfigError(f"model {model.name!r}: bundle {model.path} does not exist")
    try:
        header = read_header(model.path, key_file)
    except ConfigError:
        raise
    except (SeqshareError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model {model.name!r}: cannot read the header of {model.path}: {e}") from e

    def lowered(name: str) -> int:
        own = int(header["limits"][name])
        override = getattr(model, name)
        return own if override is None else min(own, override)

    return BundleFacts(model.name, model.path, ModelSpec.from_dict(header["spec"]), lowered("share_length"),
                       lowered("unshare_length"), lowered("seq_length"), int(header["weight_bytes"]),
                       str(header["weight_digest"]))


def plan_for(settings: Settings, budget: Budget | None = None, workers: int | None = None) -> MemoryPlan:
    facts = [bundle_facts(m, settings.key_file) for m in settings.models]
    return compute_plan(settings, facts, budget or Budget.measure(), workers or settings.memory.workers)


# --- where the plan lives ---------------------------------------------------------------------------
def plan_path(settings: Settings) -> Path:
    """memory.plan_path, else the first of $STATE_DIRECTORY (systemd), else $SEQSHARE_HOME."""
    if settings.memory.plan_path is not None:
        return settings.memory.plan_path
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0]) / PLAN_FILE
    return seqshare_home() / PLAN_FILE


def write_plan(plan: MemoryPlan, path: Path) -> None:
    """Atomically (temp file + rename), so a starting worker never reads half a plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".memory-plan.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(plan.to_json(), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_plan(path: Path) -> dict[str, Any] | None:
    """memory-setup's plan, or None when there is none (a worker started by hand) or it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the memory plan at %s: %s", path, e)
        return None
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        log.warning("ignoring the memory plan at %s: not a version-%d plan", path, PLAN_VERSION)
        return None
    return data


# --- the worker's side -------------------------------------------------------------------------------
def check_worker_plan(settings: Settings, budget: Budget | None = None) -> MemoryPlan:
    """This worker's plan against the budget it sees now, and memory-setup's verdict for all workers.

    Raises MemoryBudgetError (a ConfigError) when either says the configuration does not fit.
    """
    plan = plan_for(settings, budget, workers=1)
    where = plan_path(settings)
    setup = read_plan(where)
    if setup is not None and setup.get("items") == [asdict(i) for i in plan.items]:
        if not setup.get("fits"):
            raise MemoryBudgetError(f"memory-setup's plan ({where}, {setup.get('workers')} workers) "
                                    f"{setup.get('verdict')}")
        log.info("memory plan %s matches this configuration: %s", where, setup.get("verdict"))
    elif setup is not None:
        log.warning("the memory plan at %s was made for another configuration (run `seqshare memory-setup` "
                    "again); checking this worker alone", where)
    if not plan.fits:
        raise MemoryBudgetError(f"memory plan {plan.verdict()}")
    return plan


def prepare_memory(settings: Settings) -> MemoryPlan:
    """At worker start, before any bundle is loaded: refuse an over-budget config; lock if asked."""
    plan = check_worker_plan(settings)
    log.info("memory plan for this worker %s", plan.verdict())
    if settings.memory.lock_memory:
        lock_memory(plan.per_worker_bytes)
        log.info("memory locked (mlockall): weights and KV stay in RAM")
    return plan
