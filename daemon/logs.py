"""Logging for the service: structured journald records under systemd, plain lines on stderr otherwise.

Under journald every record carries `WORKER` and, while a job runs, `JOB_ID` and `CONTEXT_HASH`
as journal fields, so an operator can ask `journalctl -u seqshare-worker@a JOB_ID=...`. CONTEXT_HASH
is the job's context key (the hash of model, context and cache salt that routes every job on one
document to the worker caching it), so `journalctl CONTEXT_HASH=...` shows all the work on a document.
On a terminal the same values appear in brackets in the line.

Worker usage: `setup_logging(worker=name)` once at start; `with job_context(job.id, ctx_hash): ...`
around each job (thread- and task-safe: it is a context variable).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

_job_id: ContextVar[str | None] = ContextVar("seqshare_job_id", default=None)
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
        job, ctx = _job_id.get(), _context_hash.get()
        # Journal field names: upper case, exactly what `journalctl FIELD=value` matches.
        if self.worker:
            record.WORKER = self.worker
        if job:
            record.JOB_ID = job
        if ctx:
            record.CONTEXT_HASH = ctx
        parts = [p for p in (f"job={job}" if job else "", f"ctx={ctx[:12]}" if ctx else "") if p]
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
def job_context(job_id: str | None, context_hash: str | None = None) -> Iterator[None]:
    """Records logged inside carry JOB_ID and CONTEXT_HASH."""
    t1, t2 = _job_id.set(job_id), _context_hash.set(context_hash)
    try:
        yield
    finally:
        _job_id.reset(t1)
        _context_hash.reset(t2)


def set_context_hash(context_hash: str | None) -> None:
    """For when the hash is known only after tokenizing, inside an open job_context."""
    _context_hash.set(context_hash)
