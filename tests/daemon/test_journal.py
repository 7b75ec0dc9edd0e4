"""Logging: structured journald records (SEQSHARE_WORKER, SEQSHARE_JOB_ID, SEQSHARE_ROUTE_KEY,
SEQSHARE_CONTEXT_HASH) when stderr is the journal, plain lines on stderr otherwise.

The journal test is real on both ends: the worker runs in its own mount namespace where
/run/systemd/journal/socket is a datagram socket of the test, so systemd-python's JournalHandler sends
the same native-protocol datagrams journald would receive, and the test decodes them. It needs root
(a mount namespace); elsewhere it is skipped and says why.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from queue_helpers import DOCS, WORKER_ENV, unshare_unavailable, wait_until
from service_helpers import SEQSHARE, tiny_bundles

from seqshare.daemon.logs import job_context, setup_logging, stderr_is_journal
from seqshare.jobqueue.client import Client, make_payload
from seqshare.worker.errors import JobFailedError


def parse_journal_datagram(data: bytes) -> dict[str, str]:
    """journald's native protocol: FIELD=value lines, or FIELD\\n<le64 length><bytes>\\n for binary values."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key, (n,) = line, struct.unpack_from("<Q", data, nl + 1)
            value = data[nl + 9: nl + 9 + n]
            i = nl + 9 + n + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


def test_stderr_is_journal_only_when_journal_stream_names_our_stderr(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, a)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, b)  # a redirect
        assert not stderr_is_journal({"INVOCATION_ID": "x"}, a) and not stderr_is_journal({}, a)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, a)


def test_plain_lines_carry_job_and_context_in_brackets() -> None:
    stream = io.StringIO()
    handler = setup_logging(worker="w1", journal=False)
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        with job_context("job-42", "c0ffee" * 8):
            logging.getLogger("seqshare.test").warning("inside a job")
        logging.getLogger("seqshare.test").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("WARNING seqshare.test [job=job-42 ctx=c0ffeec0ffee]: inside a job")
    assert outside.endswith("WARNING seqshare.test: outside")


def test_worker_logs_structured_records_to_the_journal(redis_url: str, tmp_path: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    if (why := unshare_unavailable("-m")) is not None:
        pytest.skip(why)
    bundle = tiny_bundles(tmp_path_factory)["a"]
    fake_run = Path(tempfile.mkdtemp(prefix="sqjournal-"))  # stands for /run/systemd inside the namespace
    (fake_run / "journal").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(fake_run / "journal/socket"))
    sock.settimeout(0.2)
    # Read while the worker runs: a datagram socket queues only a few records (net.unix.max_dgram_qlen),
    # and the sender blocks on a full one as it would on a stalled journald.
    records: list[dict[str, str]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                records.append(parse_journal_datagram(sock.recv(1 << 20)))
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stderr_path = tmp_path / "stderr"
    try:
        with stderr_path.open("wb") as err:
            st = os.fstat(err.fileno())
            env = {**os.environ, **WORKER_ENV, "SEQSHARE_HOME": str(tmp_path / "home"),
                   "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",  # as systemd sets it for StandardError=journal
                   "SEQSHARE_DEBUG": "1", "SEQSHARE_DEBUG_HANG_MS": "10"}  # logs a warning inside the job
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount --bind "{fake_run}" /run/systemd && exec "$@"', "sh",
                   SEQSHARE, "worker", "--bundle", str(bundle), "--redis-url", redis_url, "--name", "jw",
                   "--threads", "1"]
            proc = subprocess.Popen(cmd, stdout=err, stderr=err, env=env)
            try:
                handle = Client(redis_url).submit(DOCS[0], [("q", "What jumps?")])
                result = handle.wait(90)
                bad = Client(redis_url).submit(DOCS[1], [("m", "Who?")], model="no-such-model")
                with pytest.raises(JobFailedError):
                    bad.wait(30)
            finally:
                proc.terminate()
                proc.wait(30)
        wait_until(lambda: any(r["MESSAGE"].startswith("SIGTERM") for r in records), timeout=10,
                   what="the worker's last record")
    finally:
        done.set()
        reader.join(5)
        sock.close()
        shutil.rmtree(fake_run)
    assert proc.returncode == 0, stderr_path.read_text()
    assert records, "nothing reached the journal socket"
    assert all(r["SYSLOG_IDENTIFIER"] == "seqshare" and r["SEQSHARE_WORKER"] == "jw" for r in records)
    assert not any("JOB_ID" in r or "CONTEXT_HASH" in r for r in records)  # systemd's own field names stay its own
    in_job = [r for r in records if r.get("SEQSHARE_JOB_ID") == handle.id]
    route = make_payload(DOCS[0], [("q", "What jumps?")]).context_key()
    assert in_job and all(r["SEQSHARE_ROUTE_KEY"] == route for r in in_job), [r["MESSAGE"] for r in records]
    hang = next(r for r in in_job if "debug hang" in r["MESSAGE"])
    assert hang["PRIORITY"] == "4"  # a warning
    # One line as the job starts and one as it ends; the end carries the hash `submit --json` shows.
    started = [r for r in in_job if r["MESSAGE"].startswith(f"job {handle.id} started")]
    finished = [r for r in in_job if r["MESSAGE"].startswith(f"job {handle.id} finished")]
    assert len(started) == 1 and len(finished) == 1, [r["MESSAGE"] for r in in_job]
    assert "1 question(s)" in started[0]["MESSAGE"]
    assert finished[0]["SEQSHARE_CONTEXT_HASH"] == result["context_hash"] and len(result["context_hash"]) == 64
    assert "prefix miss" in finished[0]["MESSAGE"] and "token(s) generated" in finished[0]["MESSAGE"]
    failed = [r for r in records if r.get("SEQSHARE_JOB_ID") == bad.id and "failed" in r["MESSAGE"]]
    assert len(failed) == 1 and "UnknownModelError" in failed[0]["MESSAGE"] and failed[0]["PRIORITY"] == "4"
    assert not any(r.get("SEQSHARE_JOB_ID") for r in records if "listening on" in r["MESSAGE"])
    # journald gets the records; stderr (the journal stream) carries no duplicate plain lines.
    assert "debug hang" not in stderr_path.read_text()
