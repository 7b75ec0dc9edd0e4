"""Logging for the service: structured journald records under systemd, plain lines on stderr otherwise.

Under journald every record carries `SEQSHARE_WORKER` and, while a job runs, `SEQSHARE_JOB_ID` and
`SEQSHARE_ROUTE_KEY` (the producer's hash of model, document and cache salt that routes every job on
one document to the worker caching it). Each job logs one line when it starts and one when it ends;
the end line also carries `SEQSHARE_CONTEXT_HASH`, the engine's context hash that the job's result
(`seqshare submit --json`) shows. So an operator asks `journalctl -u seqshare-worker@a
SEQSHARE_JOB_ID=<id>` for one job and `journalctl SEQSHARE_CONTEXT_HASH=<hash>` for every job on a
document. The prefix keeps them apart from systemd's own fields (its JOB_ID numbers systemd jobs).
On a terminal the same values appear in brackets in the line.

Worker usage: `setup_logging(worker=name)` once at start; `with job_context(job.id, route_key): ...`
around each job (thread- and task-safe: it is a context variable).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from seqshare.jobqueue.payload import JobPayload

_job_id: ContextVar[str | None] = ContextVar("seqshare_job_id", default=None)
_route_key: ContextVar[str | None] = ContextVar("seqshare_route_key", default=None)
_context_hash: ContextVar[str | None] = ContextVar("seqshare_context_hash", default=None)

SYSLOG_IDENTIFIER = "seqshare"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ctx)s: %(message)s"


def stderr_is_journal(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when stderr is connected to journald.

    systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; comparing it with our
    stderr tells a journal apart from a redirect (`StandardError=file:...`, or a pipe to another tool
    that inherited the variable), where plain lines are what the reader expects.
    """
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    journal_stream = env.get("JOURNAL_STREAM")
    if not journal_stream:
        return False
    try:
        dev, ino = (int(x) for x in journal_stream.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _ContextFilter(logging.Filter):
    """Stamps every record with the worker name and the current job's id and context hash."""

    def __init__(self, worker: str | None):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        job, route, ctx = _job_id.get(), _route_key.get(), _context_hash.get()
        # Journal field names: upper case, exactly what `journalctl FIELD=value` matches.
        if self.worker:
            record.SEQSHARE_WORKER = self.worker
        if job:
            record.SEQSHARE_JOB_ID = job
        if route:
            record.SEQSHARE_ROUTE_KEY = route
        if ctx:
            record.SEQSHARE_CONTEXT_HASH = ctx
        shown = ctx or route
        parts = [p for p in (f"job={job}" if job else "", f"ctx={shown[:12]}" if shown else "") if p]
        record.ctx = f" [{' '.join(parts)}]" if parts else ""
        return True


def setup_logging(worker: str | None = None, level: int | str = logging.INFO,
                  journal: bool | None = None) -> logging.Handler:
    """Install one handler on the root logger (replacing earlier ones) and return it."""
    use_journal = stderr_is_journal() if journal is None else journal
    handler: logging.Handler
    if use_journal:
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        # journald stamps time and unit itself; the message stays the bare text.
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(_ContextFilter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


@contextmanager
def job_context(job_id: str | None, route_key: str | None = None,
                context_hash: str | None = None) -> Iterator[None]:
    """Records logged inside carry SEQSHARE_JOB_ID, SEQSHARE_ROUTE_KEY and SEQSHARE_CONTEXT_HASH."""
    t1, t2, t3 = _job_id.set(job_id), _route_key.set(route_key), _context_hash.set(context_hash)
    try:
        yield
    finally:
        _job_id.reset(t1)
        _route_key.reset(t2)
        _context_hash.reset(t3)


def job_started_line(job_id: str, payload: JobPayload, batched: int) -> str:
    together = f", batched with {batched - 1} other job(s)" if batched > 1 else ""
    return (f"job {job_id} started: model {payload.model or '(default)'}, "
            f"{len(payload.questions)} question(s){together}")


def job_finished_line(job_id: str, result: dict[str, Any] | None, error: dict[str, str] | None,
                      seconds: float) -> str:
    """The one line an operator reads per job: what ran, whether the prefix was reused, what it cost."""
    if result is None:
        reason = error or {"type": "?", "message": "?"}
        return f"job {job_id} failed after {seconds:.2f} s: {reason['type']}: {reason['message']}"
    answers = result["answers"]
    failed = sum(1 for a in answers if "error" in a)
    generated = sum(a.get("generated_tokens", 0) for a in answers)
    return (f"job {job_id} finished: model {result['model']}, {len(answers)} question(s)"
            f"{f' ({failed} failed)' if failed else ''}, prefix {result['prefix']} "
            f"({result['prefix_computed_tokens']} token(s) computed), {generated} token(s) generated, "
            f"{seconds:.2f} s")
