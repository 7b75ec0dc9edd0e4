"""Batch document QA from a JSONL file: the engine behind `seqshare qa`.

Input lines (like the OpenAI Batch format, flattened):
    {"custom_id": "r1", "document": "...text..." | "document_path": "docs/a.txt",
     "question": "...", "params": {...SamplingParams...}, "model": "...", "cache_salt": "..."}
Lines with the same document (and model and salt) become one job. Answers are appended to the output
as their job completes, one line per custom_id; failed lines go to the errors file with the reason.
Running again skips custom_ids already in the output (idempotent resume); a bad line fails alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from redis.exceptions import ConnectionError, TimeoutError

from seqshare.jobqueue.client import Client
from seqshare.jobqueue.payload import MAX_QUESTIONS, JobPayload, Question, violations
from seqshare.worker.errors import SeqshareError
from seqshare.worker.params import SamplingParams

POLL_S = 0.1


class QaLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")
    document: str | None = None
    document_path: str | None = None
    question: str = Field(min_length=1)
    params: SamplingParams | None = None
    model: str | None = None
    cache_salt: str | None = None

    @model_validator(mode="after")
    def _one_document(self) -> QaLine:
        if (self.document is None) == (self.document_path is None):
            raise ValueError("give exactly one of document and document_path")
        return self


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    cached: int = 0
    skipped: int = 0
    total: int = 0


@dataclass
class _Pending:
    custom_ids: list[str]
    payload: JobPayload
    submitted: float = field(default_factory=time.monotonic)


def answered_ids(path: Path) -> set[str]:
    """custom_ids already in the output (a torn last line from a crash is ignored)."""
    ids: set[str] = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                ids.add(json.loads(line)["custom_id"])
            except (ValueError, KeyError, TypeError):
                continue
    return ids


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-write), so appended answers start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("rb+") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, object) per non-blank line, or (line number, why it is unusable)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield n, f"line {n}: not UTF-8 (byte {e.start + 1})"
                continue
            except json.JSONDecodeError as e:
                yield n, f"line {n}: not JSON ({e.msg} at column {e.colno})"
                continue
            except RecursionError:
                yield n, f"line {n}: JSON nested too deeply"
                continue
            yield n, obj if isinstance(obj, dict) else f"line {n}: not a JSON object"


def _document(line: QaLine, base: Path, cache: dict[str, str]) -> str:
    if line.document is not None:
        return line.document
    assert line.document_path is not None
    p = Path(line.document_path)
    p = p if p.is_absolute() else base / p
    key = str(p)
    if key not in cache:
        try:
            cache[key] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SeqshareError(f"document_path {line.document_path}: {e.__class__.__name__}") from None
    return cache[key]


def plan_jobs(input_path: Path, skip: set[str], model: str | None,
              error: Callable[[str | None, str, str], None]) -> tuple[list[_Pending], int, int]:
    """Parse the input into payloads (one per document, chunked); report bad lines through `error`."""
    groups: dict[tuple[str, str | None, str | None], list[Question]] = {}
    seen: dict[str, int] = {}
    docs: dict[str, str] = {}
    total = skipped = 0
    for n, obj in _read_lines(input_path):
        total += 1
        cid = obj.get("custom_id") if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str) else None
        if isinstance(obj, str):
            error(None, "InvalidLineError", obj)
            continue
        try:
            line = QaLine.model_validate(obj)
            if line.custom_id in seen:
                raise SeqshareError(f"custom_id repeats line {seen[line.custom_id]}")
            seen[line.custom_id] = n
            if line.custom_id in skip:
                skipped += 1
                continue
            doc = _document(line, input_path.parent, docs)
            q = Question(custom_id=line.custom_id, text=line.question, params=line.params)
        except ValidationError as e:
            error(cid, "InvalidLineError", f"line {n}: " + "; ".join(violations(e)))
            continue
        except SeqshareError as e:
            error(cid, type(e).__name__, f"line {n}: {e}")
            continue
        groups.setdefault((doc, line.model or model, line.cache_salt), []).append(q)
    jobs = []
    for (doc, mdl, salt), qs in groups.items():
        for i in range(0, len(qs), MAX_QUESTIONS):
            chunk = qs[i:i + MAX_QUESTIONS]
            try:
                payload = JobPayload(model=mdl, context=doc, questions=chunk, cache_salt=salt)
            except ValidationError as e:
                for q in chunk:
                    error(q.custom_id, "InvalidJobError", "; ".join(violations(e)))
                continue
            jobs.append(_Pending([q.custom_id for q in chunk], payload))
    return jobs, total, skipped


def _write(f: TextIO, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()


def run_qa(input_path: Path, out: Path, errors: Path | None = None, redis_url: str | None = None,
           model: str | None = None, timeout_s: float | None = None,
           on_update: Callable[[Tally], None] | None = None) -> Tally:
    """Enqueue, wait, write. Returns the tally; raises nothing for bad lines (they go to `errors`)."""
    errors = errors or out.with_name(out.stem + ".errors.jsonl")
    tally = Tally()
    client = Client(redis_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(out)
    with out.open("a", encoding="utf-8") as fout, errors.open("w", encoding="utf-8") as ferr:
        def error(cid: str | None, kind: str, message: str) -> None:
            tally.failed += 1
            _write(ferr, [{"custom_id": cid, "error": {"type": kind, "message": message}}])

        jobs, tally.total, tally.skipped = plan_jobs(input_path, answered_ids(out), model, error)
        try:
            client.check_known_limits([j.payload for j in jobs])
        except SeqshareError as e:
            for j in jobs:
                for cid in j.custom_ids:
                    error(cid, type(e).__name__, str(e))
            jobs = []
        handles = client.submit_many([j.payload for j in jobs]) if jobs else []
        pending = {h.id: j for h, j in zip(handles, jobs, strict=True)}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if on_update:
            on_update(tally)
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                for j in pending.values():
                    for cid in j.custom_ids:
                        error(cid, "QueueTimeoutError", f"no answer within {timeout_s} s")
                break
            try:
                _collect(client, pending, fout, error, tally)
            except (ConnectionError, TimeoutError):
                time.sleep(1.0)  # Redis restarting: the jobs are still there when it is back
                continue
            if on_update:
                on_update(tally)
            if pending:
                time.sleep(POLL_S)
    return tally


def _collect(client: Client, pending: dict[str, _Pending], fout: TextIO,
             error: Callable[[str | None, str, str], None], tally: Tally) -> None:
    ids = list(pending)
    for job_id, status in zip(ids, client.statuses(ids), strict=True):
        if status not in ("finished", "failed", "missing"):
            continue
        job = pending.pop(job_id)
        kind, outcome = client.outcome(job_id) if status != "missing" else ("failed", "job vanished from Redis")
        if kind == "finished" and isinstance(outcome, dict):
            rows = [{**a, "job_id": job_id, "worker": outcome.get("worker")} for a in outcome["answers"]]
            _write(fout, [r for r in rows if "error" not in r])
            for r in rows:
                if "error" in r:
                    error(r["custom_id"], r["error"]["type"], r["error"]["message"])
                else:
                    tally.done += 1
                    tally.cached += bool(r.get("cache_hit"))
        else:
            reason = str(outcome)
            kind_name = reason.split(":", 1)[0] if ":" in reason[:60] else "JobFailedError"
            for cid in job.custom_ids:
                error(cid, kind_name, reason)
