"""Logging: structured journald records (WORKER, JOB_ID, CONTEXT_HASH) when stderr is the journal,
plain lines on stderr otherwise.

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
import time
from pathlib import Path

import pytest
from queue_helpers import DOCS, WORKER_ENV
from seqshare.daemon.client import Client, make_payload
from seqshare.daemon.logs import job_context, setup_logging, stderr_is_journal
from service_helpers import SEQSHARE, tiny_bundles


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


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private mount namespace"
    if shutil.which("unshare") is None:
        return "unshare(1) is missing"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -m fails here: {probe.stderr.strip()}"


def test_worker_logs_structured_records_to_the_journal(redis_url: str, tmp_path: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    if (why := _can_unshare()) is not None:
        pytest.skip(why)
    bundle = tiny_bundles(tmp_path_factory)["a"]
    fake_run = Path(tempfile.mkdtemp(prefix="sqjournal-"))  # stands for /run/systemd inside the namespace
    (fake_run / "journal").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(fake_run / "journal/socket"))
    sock.settimeout(0.2)
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
                handle.wait(90)
            finally:
                proc.terminate()
                proc.wait(30)
        records = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                records.append(parse_journal_datagram(sock.recv(1 << 20)))
            except TimeoutError:
                if records and records[-1].get("MESSAGE", "").startswith("SIGTERM"):
                    break
    finally:
        sock.close()
        shutil.rmtree(fake_run)
    assert proc.returncode == 0, stderr_path.read_text()
    assert records, "nothing reached the journal socket"
    assert all(r["SYSLOG_IDENTIFIER"] == "seqshare" and r["WORKER"] == "jw" for r in records)
    in_job = [r for r in records if r.get("JOB_ID")]
    assert in_job, [r["MESSAGE"] for r in records]
    hang = next(r for r in in_job if "debug hang" in r["MESSAGE"])
    assert hang["JOB_ID"] == handle.id and hang["PRIORITY"] == "4"  # a warning
    assert hang["CONTEXT_HASH"] == make_payload(DOCS[0], [("q", "What jumps?")]).context_key()
    assert not any(r.get("JOB_ID") for r in records if "listening on" in r["MESSAGE"])
    # journald gets the records; stderr (the journal stream) carries no duplicate plain lines.
    assert "debug hang" not in stderr_path.read_text()
