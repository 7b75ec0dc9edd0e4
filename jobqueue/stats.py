"""Queue and cache figures: what workers count, what `seqshare status` shows, what Prometheus scrapes.

Workers add to three Redis hashes in the same transaction that stores a result: global totals,
their own totals, and a per-minute bucket (for throughput). Nothing here is needed to answer jobs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from seqshare.jobqueue import rq_adapter as rq
from seqshare.jobqueue.executor import Engines
from seqshare.jobqueue.routing import Keys, text

COUNTERS = ("jobs_done", "jobs_failed", "questions", "tokens_generated", "prefix_hits", "prefix_misses",
            "context_tokens_prefilled", "tokens_saved")


@dataclass
class WorkerStats:
    """This process's counters (also sent to Redis, see `count`)."""

    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def jobs_done(self) -> int:
        return self.totals["jobs_done"]

    def hit_rate(self) -> float | None:
        n = self.totals["prefix_hits"] + self.totals["prefix_misses"]
        return None if n == 0 else self.totals["prefix_hits"] / n

    def count(self, result: dict[str, Any] | None, error: dict[str, str] | None) -> dict[str, int]:
        """Counters for one finished job; added here and returned for the Redis transaction."""
        c = dict.fromkeys(COUNTERS, 0)
        if error is not None or result is None:
            c["jobs_failed"] = 1
        else:
            answers = [a for a in result.get("answers", []) if "error" not in a]
            c["jobs_done"] = 1
            c["questions"] = len(answers)
            c["tokens_generated"] = sum(int(a["generated_tokens"]) for a in answers)
            if answers:
                ctx = int(answers[0]["context_tokens"])
                computed = int(result.get("prefix_computed_tokens", 0))
                c["prefix_hits" if result.get("prefix") in ("hit", "restored") else "prefix_misses"] = 1
                c["context_tokens_prefilled"] = computed
                # versus answering every question on its full prompt
                c["tokens_saved"] = len(answers) * ctx - computed
        for k, v in c.items():
            self.totals[k] += v
        return c


def publish_models(p: Any, keys: Keys, engines: Engines) -> None:
    """Limits of each loaded model, so producers can refuse what can never fit before enqueueing."""
    for name, engine in engines.by_name.items():
        limits = getattr(engine, "limits", None)
        if limits is None:
            continue
        p.hset(keys.models(), name, json.dumps({k: int(getattr(limits, k)) for k in
                                                ("share_length", "unshare_length", "seq_length")}))


def _ints(raw: dict[Any, Any]) -> dict[str, int]:
    return {text(k): int(v) for k, v in raw.items()}


def snapshot(conn: Redis, keys: Keys) -> dict[str, Any]:
    """Everything `seqshare status` shows, as one JSON-able dict."""
    queues = {name: rq.queue_counts(conn, name) for name in keys.shared_queues()}
    workers = []
    for raw in sorted(conn.smembers(keys.workers())):
        name = text(raw)
        info = {text(k): text(v) for k, v in conn.hgetall(keys.info(name)).items()}
        own = keys.worker_queue(name)
        workers.append({"name": name, "alive": bool(info), "state": info.get("state", "dead"),
                        "host": info.get("hostname"), "pid": int(info.get("pid", 0) or 0),
                        "models": [m for m in info.get("models", "").split(",") if m],
                        "cached_prefixes": int(info.get("cached_prefixes", 0) or 0),
                        "queued": rq.queue(conn, own).count,
                        **_ints(conn.hgetall(keys.stats(name)))})
    totals = dict.fromkeys(COUNTERS, 0) | _ints(conn.hgetall(keys.totals()))
    lookups = totals["prefix_hits"] + totals["prefix_misses"]
    now_min = int(time.time()) // 60
    window = [_ints(conn.hgetall(keys.minute(m))) for m in range(now_min - 4, now_min + 1)]
    return {
        "queues": queues,
        "workers": workers,
        "totals": totals,
        "hit_rate": None if lookups == 0 else totals["prefix_hits"] / lookups,
        "throughput_per_min": {  # mean over the last five minutes
            "questions": sum(w.get("questions", 0) for w in window) / 5,
            "tokens_generated": sum(w.get("tokens_generated", 0) for w in window) / 5,
        },
    }


def _esc(label: str) -> str:
    """A label value as the text format wants it (worker and queue names come from configuration)."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(snap: dict[str, Any]) -> str:
    """The same figures in the Prometheus text exposition format."""
    out = []

    def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
        out.append(f"# HELP seqshare_{name} {help_}")
        out.append(f"# TYPE seqshare_{name} {kind}")
        out.extend(f"seqshare_{name}{labels} {value}" for labels, value in rows)

    for c in COUNTERS:
        metric(f"{c}_total", "counter", c.replace("_", " "), [("", snap["totals"][c])])
    metric("prefix_hit_ratio", "gauge", "prefix cache hit rate over all jobs",
           [("", snap["hit_rate"] if snap["hit_rate"] is not None else float("nan"))])
    metric("queue_jobs", "gauge", "jobs by queue and state",
           [(f'{{queue="{_esc(q)}",state="{s}"}}', n) for q, v in snap["queues"].items() for s, n in v.items()])
    metric("worker_up", "gauge", "1 if the worker's liveness key is current",
           [(f'{{worker="{_esc(w["name"])}"}}', int(w["alive"])) for w in snap["workers"]])
    metric("worker_cached_prefixes", "gauge", "contexts whose prefix a worker holds",
           [(f'{{worker="{_esc(w["name"])}"}}', w["cached_prefixes"]) for w in snap["workers"]])
    metric("worker_queued_jobs", "gauge", "jobs routed to a worker's own queue",
           [(f'{{worker="{_esc(w["name"])}"}}', w["queued"]) for w in snap["workers"]])
    metric("questions_per_minute", "gauge", "answered questions per minute, last 5 minutes",
           [("", snap["throughput_per_min"]["questions"])])
    return "\n".join(out) + "\n"


def write_metrics(conn: Redis, keys: Keys, path: Path) -> None:
    """Write the Prometheus text file atomically (node_exporter's textfile collector reads it)."""
    text = prometheus_text(snapshot(conn, keys))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
