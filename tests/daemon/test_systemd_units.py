"""The systemd side, checked with the real tools: scripts/install-service.sh run into a scratch root,
every installed unit through `systemd-analyze verify` (any printed line fails, not only the exit code)
and `systemd-analyze security --offline=true`, and the queue's redis.conf + ACL file served by the
redis-server the unit names, with a real worker and producer going through the ACL user.

Why verify the installed copies: verify warns when an ExecStart= program is missing, and the units
name /opt/seqshare/bin/seqshare, which a test machine does not have. The installer writes the
repository's units with the seqshare prefix of the system they are for; installing them for this
machine (prefix = this venv) gives units whose programs exist, and the test below checks that they
differ from the repository's in those paths and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from queue_helpers import DOCS, WorkerProc
from service_helpers import REPO, NotifySocket, tiny_bundles

from seqshare.daemon.config import load_settings
from seqshare.jobqueue.client import Client

PREFIX = Path(sys.executable).parent.parent  # this venv: bin/seqshare exists
UNITS = ["seqshare-worker@.service", "seqshare-memory-setup.service", "seqshare-redis.service", "seqshare.slice"]
ANALYZE = shutil.which("systemd-analyze")


def _require_analyze() -> str:
    if ANALYZE is None:
        pytest.fail("systemd-analyze is missing: run scripts/sysdeps.sh (Debian package systemd)")
    return ANALYZE


def install(destdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts/install-service.sh"), "--destdir", str(destdir),
                           "--prefix", str(PREFIX)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("destdir")
    out = install(d)
    assert out.returncode == 0, out.stderr
    return d


def unit_dir(root: Path) -> Path:
    return root / "etc/systemd/system"


def test_installer_lays_out_units_users_directories_and_config(root: Path) -> None:
    for unit in UNITS:
        assert (unit_dir(root) / unit).is_file()
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    group = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()}
    gid = group["seqshare"][2]
    assert passwd["seqshare"][3] == gid and passwd["seqshare-redis"][3] == gid
    assert passwd["seqshare"][5] == "/var/lib/seqshare"
    for d, mode in (("etc/seqshare", 0o750), ("etc/credstore.encrypted", 0o700), ("var/lib/seqshare/models", 0o750)):
        assert (root / d).stat().st_mode & 0o777 == mode, d
    conf = root / "etc/seqshare"
    for name in ("worker.toml", "redis.conf", "redis-users.acl", "worker.env"):
        st = (conf / name).stat()
        assert st.st_mode & 0o777 == 0o640, name
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (0, int(gid)), name
    # The sample config is a valid config, and the queue password is in the URL and (hashed) in the ACL.
    settings = load_settings(conf / "worker.toml")
    assert [m.name for m in settings.models] == ["smollm2"] and settings.memory.workers == 1
    password = re.search(r"^SEQSHARE_REDIS_URL=unix://seqshare:(\w+)@/run/seqshare-redis/redis.sock\?db=0$",
                         (conf / "worker.env").read_text(), re.M)
    assert password and len(password[1]) >= 24
    assert f"#{hashlib.sha256(password[1].encode()).hexdigest()}" in (conf / "redis-users.acl").read_text()
    assert (root / "usr/share/doc/seqshare/README.md").read_text() == (REPO / "README.md").read_text()


def test_installer_is_idempotent_and_keeps_configuration(root: Path, tmp_path: Path) -> None:
    d = tmp_path / "again"
    assert install(d).returncode == 0
    conf = d / "etc/seqshare"
    (conf / "worker.toml").write_text("threads = 3\n")
    env_before, acl_before = (conf / "worker.env").read_text(), (conf / "redis-users.acl").read_text()
    out = install(d)
    assert out.returncode == 0, out.stderr
    assert (conf / "worker.toml").read_text() == "threads = 3\n"
    assert (conf / "worker.env").read_text() == env_before and (conf / "redis-users.acl").read_text() == acl_before
    assert "kept existing" in out.stdout
    for cmd in ("systemctl daemon-reload", "systemctl enable --now seqshare-worker@a.service",
                "systemd-creds encrypt --name=seqshare-model-key", "journalctl -u seqshare-worker@a"):
        assert cmd in out.stdout, cmd


def test_installed_units_are_the_repository_units_with_this_systems_paths(root: Path) -> None:
    redis_exec = _exec_start(unit_dir(root) / "seqshare-redis.service")[0]
    for unit in UNITS:
        ours = (REPO / "systemd" / unit).read_text().replace("/opt/seqshare/", f"{PREFIX}/")
        ours = ours.replace("ExecStart=/usr/bin/redis-server ", f"ExecStart={redis_exec} ")
        assert (unit_dir(root) / unit).read_text() == ours, unit


def _verify(directory: Path, unit: str) -> subprocess.CompletedProcess[str]:
    # Run from the unit directory: verify loads the named unit (and its template) from there and the
    # rest (sysinit.target, network-online.target) from this machine's systemd.
    return subprocess.run([_require_analyze(), "verify", "--man=no", unit], cwd=directory,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("unit", ["seqshare-worker@a.service", "seqshare-memory-setup.service",
                                  "seqshare-redis.service", "seqshare.slice"])
def test_unit_verifies_without_a_single_warning(root: Path, unit: str) -> None:
    out = _verify(unit_dir(root), unit)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stdout + out.stderr


def test_verify_check_catches_warnings(root: Path, tmp_path: Path) -> None:
    # The check above must be able to fail: a misspelt directive and a missing program both print
    # warnings that systemd-analyze's exit code alone would not report.
    broken = (unit_dir(root) / "seqshare-memory-setup.service").read_text()
    broken = broken.replace("Type=oneshot", "Type=oneshot\nRestartPreventExitStatuz=78")
    (tmp_path / "seqshare-memory-setup.service").write_text(broken)
    out = _verify(tmp_path, "seqshare-memory-setup.service")
    assert out.returncode == 0  # systemd-analyze calls this a success...
    assert "Unknown key 'RestartPreventExitStatuz'" in out.stderr  # ...and prints the warning
    (tmp_path / "seqshare-memory-setup.service").write_text(
        (REPO / "systemd/seqshare-memory-setup.service").read_text())  # names /opt/seqshare/bin/seqshare
    out = _verify(tmp_path, "seqshare-memory-setup.service")
    assert "/opt/seqshare/bin/seqshare is not executable" in out.stderr


def _exposure(directory: Path, unit: str) -> float:
    out = subprocess.run([_require_analyze(), "security", "--offline=true", "--no-pager", unit], cwd=directory,
                         capture_output=True, text=True, timeout=120)
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr
    return float(found[1])


def test_security_exposure(root: Path) -> None:
    assert _exposure(unit_dir(root), "seqshare-worker@a.service") <= 4.0
    assert _exposure(unit_dir(root), "seqshare-memory-setup.service") <= 4.0
    assert _exposure(unit_dir(root), "seqshare-redis.service") <= 4.0


def _directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _exec_start(path: Path) -> list[str]:
    return _directives(path)["ExecStart"][0].split()


def test_worker_unit_contract(root: Path) -> None:
    d = _directives(unit_dir(root) / "seqshare-worker@.service")
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) > 0 and one["KillMode"] == "mixed" and int(one["TimeoutStopSec"]) >= 600
    assert one["Restart"] == "on-failure" and "78" in one["RestartPreventExitStatus"].split()
    assert int(one["StartLimitBurst"]) > 0 and int(one["StartLimitIntervalSec"]) > 0
    # The reload's outcome reaches systemctl: the command waits for it in the RuntimeDirectory=.
    assert one["ExecReload"] == f"{PREFIX}/bin/seqshare reload --pid $MAINPID"
    assert one["RuntimeDirectory"] == "seqshare/%i" and one["RuntimeDirectoryMode"] == "0700"
    assert one["LoadCredentialEncrypted"] == "seqshare-model-key:/etc/credstore.encrypted/seqshare-model-key"
    assert one["MemorySwapMax"] == "0" and one["LimitMEMLOCK"] == "infinity"
    assert one["User"] == "seqshare" and one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["PrivateTmp"] == "yes" and one["StateDirectory"] == "seqshare"
    assert "seqshare-memory-setup.service" in one["Requires"] and "seqshare-memory-setup.service" in one["After"]
    assert _exec_start(unit_dir(root) / "seqshare-worker@.service")[:2] == [f"{PREFIX}/bin/seqshare", "worker"]
    setup = {k: v[-1] for k, v in _directives(unit_dir(root) / "seqshare-memory-setup.service").items()}
    assert setup["Type"] == "oneshot" and "RemainAfterExit" not in setup  # re-run at every worker start
    assert setup["ExecStart"].split()[1] == "memory-setup" and setup["StateDirectory"] == "seqshare"


# --- the queue: redis.conf and the ACL as installed, served by the unit's own redis-server ------------
@pytest.fixture
def queue(root: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The installed redis.conf with its three paths moved into tmp_path; yields (socket, password)."""
    conf = root / "etc/seqshare"
    text = (conf / "redis.conf").read_text()
    for old, new in (("/run/seqshare-redis", str(tmp_path)), ("/var/lib/seqshare-redis", str(tmp_path)),
                     ("/etc/seqshare/redis-users.acl", str(conf / "redis-users.acl"))):
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "redis.conf").write_text(text)
    server = _exec_start(unit_dir(root) / "seqshare-redis.service")[0]
    proc = subprocess.Popen([server, str(tmp_path / "redis.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sock = tmp_path / "redis.sock"
    password = re.search(r"seqshare:(\w+)@", (conf / "worker.env").read_text())[1]  # type: ignore[index]
    try:
        client = redis.Redis(unix_socket_path=str(sock), username="seqshare", password=password)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                if proc.poll() is not None:
                    pytest.fail(f"{server} exited: {proc.stdout.read().decode() if proc.stdout else ''}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{server} did not answer on {sock} within 30 s")
                time.sleep(0.05)
        yield str(sock), password
    finally:
        proc.terminate()
        proc.wait(10)


def test_queue_acl_lets_the_worker_and_producer_in_and_nothing_else(queue: tuple[str, str], tmp_path: Path,
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    sock, password = queue
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    with pytest.raises(redis.AuthenticationError):  # the default user is off: no anonymous access
        redis.Redis(unix_socket_path=sock).ping()
    user = redis.Redis(unix_socket_path=sock, username="seqshare", password=password)
    for cmd in (("FLUSHALL",), ("CONFIG", "GET", "dir"), ("KEYS", "*"), ("SET", "other:key", "1"),
                ("ACL", "LIST"), ("SHUTDOWN",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.execute_command(*cmd)
    url = f"unix://seqshare:{password}@{sock}?db=0"
    bundle = tiny_bundles(tmp_path_factory)["a"]
    worker = WorkerProc(url, bundle, tmp_path, "aclw").wait_ready()
    try:
        result = Client(url).submit(DOCS[0], [("q", "What jumps?")]).wait(60)
        assert result["worker"] == "aclw" and result["answers"][0]["generated_tokens"] > 0
        status = subprocess.run([str(PREFIX / "bin/seqshare"), "status", "--json", "--redis-url", url],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.log()
    assert "NOPERM" not in worker.log() and "Traceback" not in worker.log()
    assert "not supported" not in worker.log()  # rq's CLIENT SETNAME/LIST at registration are allowed


# --- the hardening, against what the worker really does -------------------------------------------------
def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run([_require_analyze(), "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def _expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(_expand(x, groups) for x in groups[name]))


def test_worker_stays_inside_the_units_seccomp_filter_families_and_wx_rule(root: Path, redis_url: str,
                                                                          tmp_path: Path,
                                                                          tmp_path_factory: pytest.TempPathFactory
                                                                          ) -> None:
    # systemd is not PID 1 here, so the unit cannot run. Instead the worker runs under strace through
    # load, a job, a reload and a stop, and every system call, socket family and memory mapping it made
    # is checked against the unit's SystemCallFilter=, RestrictAddressFamilies= and
    # MemoryDenyWriteExecute= (systemd 252 enforces the last with seccomp: no W+X mmap, no mprotect to X).
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    d = _directives(unit_dir(root) / "seqshare-worker@.service")
    groups = _syscall_groups()
    allowed: set[str] = set()
    for spec in d["SystemCallFilter"]:
        names = set().union(*(_expand(n, groups) for n in spec.lstrip("~").split()))
        allowed = allowed - names if spec.startswith("~") else allowed | names
    families = set(d["RestrictAddressFamilies"][-1].split())
    assert d["MemoryDenyWriteExecute"] == ["yes"]

    bundle = tiny_bundles(tmp_path_factory)["a"]
    trace = tmp_path / "trace"
    notify = NotifySocket()  # so the sd_notify calls (READY, STATUS, WATCHDOG) are traced too
    env = {**os.environ, "SEQSHARE_HEARTBEAT_S": "0.5", "SEQSHARE_HOME": str(tmp_path / "home"),
           "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    log = (tmp_path / "worker.log").open("wb")
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), str(PREFIX / "bin/seqshare"), "worker",
                               "--bundle", str(bundle), "--redis-url", redis_url, "--name", "traced",
                               "--threads", "2"], stdout=log, stderr=log, env=env)
    try:
        assert Client(redis_url).submit(DOCS[0], [("q", "What jumps?")]).wait(120)["prefix"] == "miss"
        worker_pid = int(Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()[0])
        os.kill(worker_pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload done" not in (tmp_path / "worker.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        os.kill(worker_pid, signal.SIGTERM)
        assert tracer.wait(60) == 0
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        log.close()
        notify.close()
    assert any(n.get("READY") for n in notify.snapshot()) and any(n.get("WATCHDOG") for n in notify.snapshot())
    text = trace.read_text()
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", text, re.M))
    assert {"mmap", "socket", "futex", "connect"} <= used  # the trace saw the work
    assert used - allowed == set()
    assert set(re.findall(r"socket\((AF_[A-Z0-9]+)", text)) <= families
    assert not re.search(r"mprotect\([^)]*PROT_EXEC", text)
    assert not re.search(r"mmap\([^)]*(PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE)", text)
