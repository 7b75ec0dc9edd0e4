"""`seqshare status` (human, --json, --prometheus) and the worker's metrics file, against a live worker.

Every figure is checked against what the jobs' own results say, not against constants.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import redis
from queue_helpers import DOCS, SEQSHARE, WorkerProc, wait_until

from seqshare.jobqueue.client import Client
from seqshare.worker.params import SamplingParams

# One sample line of the Prometheus text format: name, optional {label="value",...}, a float.
SAMPLE = re.compile(r'^(seqshare_[a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\S+)$')


def status(url: str, *flags: str) -> str:
    res = subprocess.run([SEQSHARE, "status", "--redis-url", url, *flags], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples by `name{labels}`; every line must be a HELP/TYPE comment or a valid sample."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for ln in text.splitlines():
        if ln.startswith("# HELP "):
            continue
        if ln.startswith("# TYPE "):
            name, kind = ln.split()[2:4]
            assert kind in ("counter", "gauge")
            typed.add(name)
            continue
        m = SAMPLE.match(ln)
        assert m, f"not a Prometheus sample: {ln!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no TYPE line"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return samples


def test_status_shows_queues_workers_cache_figures_and_prometheus(redis_url: str, tiny_bundle: Path,
                                                                   tmp_path: Path) -> None:
    client = Client(redis_url)
    params = SamplingParams(max_new_tokens=5)
    jobs = [(DOCS[0], ["What jumps?", "Who sleeps?"]), (DOCS[1], ["Who?"]), (DOCS[0], ["What is brown?"])]
    handles = [client.submit(doc, [(f"j{i}q{k}", q) for k, q in enumerate(qs)], params=params)
               for i, (doc, qs) in enumerate(jobs)]

    # No worker yet: the jobs wait in the shared queue.
    idle = json.loads(status(redis_url, "--json"))
    assert idle["queues"]["seqshare"]["queued"] == 3 and idle["workers"] == []
    assert idle["hit_rate"] is None and idle["totals"]["jobs_done"] == 0
    assert "workers: none" in status(redis_url)

    metrics = tmp_path / "metrics.prom"
    config = tmp_path / "worker.toml"  # the file and the flags (--bundle, --redis-url, ...) combine
    config.write_text(f'metrics_file = "{metrics}"\nmax_batch = 8\n\n[queue]\nresult_ttl_s = 600\n')
    w = WorkerProc(redis_url, tiny_bundle, tmp_path, "w1", "--config", str(config))
    try:
        w.wait_ready()
        results = [h.wait(30) for h in handles]
        answers = [a for r in results for a in r["answers"]]
        hits = sum(r["prefix"] in ("hit", "restored") for r in results)
        prefilled = sum(r["prefix_computed_tokens"] for r in results)
        saved = sum(len(r["answers"]) * r["answers"][0]["context_tokens"] for r in results) - prefilled
        assert hits >= 1  # the third job reuses the first's document

        conn = redis.Redis.from_url(redis_url)
        assert 0 < conn.ttl(f"rq:results:{handles[0].id}") <= 600  # from the file
        # The worker's hash is written by its heartbeat: wait for the beat after the last job.
        wait_until(lambda: conn.hmget("seqshare:worker:w1", ["state", "cached_prefixes"]) == [b"idle", b"2"],
                   timeout=10, what="the heartbeat after the last job")
        snap = json.loads(status(redis_url, "--json"))
        t = snap["totals"]
        assert t["jobs_done"] == 3 and t["jobs_failed"] == 0 and t["questions"] == len(answers) == 4
        assert t["tokens_generated"] == sum(a["generated_tokens"] for a in answers) == 20
        assert (t["prefix_hits"], t["prefix_misses"]) == (hits, 3 - hits)
        assert t["context_tokens_prefilled"] == prefilled and t["tokens_saved"] == saved > 0
        assert snap["hit_rate"] == pytest.approx(hits / 3)
        assert snap["throughput_per_min"]["questions"] == pytest.approx(4 / 5)  # mean over five minutes
        assert snap["queues"]["seqshare"] == {"queued": 0, "started": 0, "finished": 3, "failed": 0}
        (me,) = snap["workers"]
        assert me["name"] == "w1" and me["alive"] and me["state"] == "idle" and me["models"] == ["tiny"]
        assert me["cached_prefixes"] == 2 and me["jobs_done"] == 3 and me["queued"] == 0

        human = status(redis_url)
        assert re.search(r"w1\s+idle\s+models tiny\s+cached prefixes\s+2", human), human
        assert f"prefix hit rate {hits / 3:.1%}" in human and f"saved {saved}" in human

        prom = parse_prometheus(status(redis_url, "--prometheus"))
        for name in ("jobs_done", "questions", "tokens_generated", "prefix_hits", "context_tokens_prefilled",
                     "tokens_saved"):
            assert prom[f"seqshare_{name}_total"] == t[name]
        assert prom['seqshare_worker_up{worker="w1"}'] == 1
        assert prom['seqshare_worker_cached_prefixes{worker="w1"}'] == 2
        assert prom['seqshare_queue_jobs{queue="seqshare",state="finished"}'] == 3
        assert math.isclose(prom["seqshare_prefix_hit_ratio"], hits / 3)

        # The worker's heartbeat writes the same text for node_exporter's textfile collector.
        def current() -> dict[str, float] | None:
            got = parse_prometheus(metrics.read_text()) if metrics.exists() else {}
            return got if got.get("seqshare_jobs_done_total") == 3 else None
        from_file = wait_until(current, timeout=10, what="the metrics file")
        assert {k: v for k, v in from_file.items() if k.endswith("_total")} == \
            {k: v for k, v in prom.items() if k.endswith("_total")}
    finally:
        w.stop()
    gone = json.loads(status(redis_url, "--json"))
    assert gone["workers"] == [] and gone["totals"]["jobs_done"] == 3  # counters outlive the worker
