"""A throw-away container that boots a real systemd (PID 1) over this machine's root, for service tests.

`systemd-nspawn --volatile=overlay` lays a tmpfs over a read-only bind of `/`: the container sees
this machine's files (the venv, the checkout) and writes nothing back. `--private-network` gives it
its own loopback, so its Redis is not the host's. Used where the host itself runs no systemd (CI
machines, containers): nspawn then cannot register with a manager, so it runs with
`--register=no --keep-unit` in a cgroup of its own, which `close()` removes again with the bind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# Services this machine image starts that a seqshare test does not need; redis-server in particular
# hangs a poweroff here (it cannot save its RDB in the overlay) and the host's would be confused with ours.
MASKED = ("postgresql.service", "postgresql@15-main.service", "mariadb.service", "redis-server.service",
          "rabbitmq-server.service", "epmd.service", "epmd.socket", "mosquitto.service", "nats-server.service",
          "e2scrub_reap.service", "systemd-timesyncd.service", "systemd-pstore.service", "console-getty.service",
          "getty@tty1.service", "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
          "e2scrub_all.timer", "fstrim.timer", "logrotate.timer", "man-db.timer")
CGROUP = Path("/sys/fs/cgroup")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a systemd container needs root"
    for tool in ("systemd-nspawn", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install systemd-container util-linux)"
    if Path("/run/systemd/system").exists():
        return "the host runs systemd itself: this harness is for hosts without a service manager"
    if not _cgroup_dirs("probe"):
        return "no cgroup hierarchy to give the container"
    return None


def _cgroup_dirs(name: str) -> list[Path]:
    if (CGROUP / "cgroup.controllers").exists():  # pure cgroup v2
        return [CGROUP / f"nspawn-{name}"]
    return [CGROUP / h / f"nspawn-{name}" for h in ("systemd", "unified") if (CGROUP / h).is_dir()]


class Container:
    def __init__(self, name: str, binds: tuple[Path, ...] = ()):
        """`binds`: host folders to show at the same place inside, read-only (the container's /tmp
        is its own: a checkout or venv there would be missing otherwise)."""
        self.name = name
        self.binds = binds
        self.state = Path(tempfile.mkdtemp(prefix=f"nspawn-{name}-"))
        self.root = self.state / "root"
        self.console = self.state / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._bound = False

    # --- life ------------------------------------------------------------------------------------
    def boot(self, timeout: float = 90) -> Container:
        self.root.mkdir()
        for cmd in (["mount", "--bind", "/", str(self.root)], ["mount", "--make-private", str(self.root)],
                    ["mount", "-o", "remount,bind,ro", str(self.root)]):
            subprocess.run(cmd, check=True, capture_output=True)
            self._bound = True
        cgroups = _cgroup_dirs(self.name)
        for d in cgroups:
            d.mkdir(exist_ok=True)

        def enter_cgroup() -> None:  # nspawn makes its supervisor/payload groups below its own
            for d in cgroups:
                (d / "cgroup.procs").write_text(str(os.getpid()))

        cmd = ["systemd-nspawn", "--quiet", f"--directory={self.root}", "--volatile=overlay", "--private-network",
               "--boot", f"--machine={self.name}", "--register=no", "--keep-unit", "--link-journal=no",
               "--console=read-only", "--kill-signal=SIGRTMIN+4", *[f"--bind-ro={b}" for b in self.binds],
               *[f"systemd.mask={u}" for u in MASKED]]
        with self.console.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=enter_cgroup, start_new_session=True)
        deadline = time.monotonic() + timeout
        while (leader := self.leader()) is None or not (self.path("/run/systemd/private")).exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container's systemd did not start in {timeout} s:\n{self.console_tail()}")
            time.sleep(0.05)
        state = self.run("systemctl", "is-system-running", "--wait", timeout=max(1.0, deadline - time.monotonic()),
                         check=False).stdout.strip()
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RuntimeError(f"the container's systemd is {state!r}; failed units:\n{failed}")
        assert leader
        return self

    def leader(self) -> int | None:
        """The host pid of the container's systemd (its PID 1)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return next((int(c) for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "systemd"), None)
        except OSError:
            return None

    def close(self, timeout: float = 30) -> None:
        """Power off (SIGKILL after `timeout`), then remove the bind and the cgroups. Safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # nspawn turns it into SIGRTMIN+4 for PID 1: an orderly poweroff
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if (leader := self.leader()) is not None:
                    os.kill(leader, 9)  # PID 1 of the namespace: takes every process in it along
                self.proc.kill()
                self.proc.wait(10)
        if self._bound:
            subprocess.run(["umount", str(self.root)], check=False, capture_output=True)
            self._bound = False
        for d in _cgroup_dirs(self.name):
            for sub in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True) if d.exists() else []:
                if sub.is_dir():
                    sub.rmdir()
            if d.exists():
                d.rmdir()
        if self.root.exists() and not os.path.ismount(self.root):
            self.root.rmdir()  # never rm -r: it was a bind of /
        self.console.unlink(missing_ok=True)
        if self.state.exists():
            self.state.rmdir()

    # --- inside ----------------------------------------------------------------------------------
    def path(self, inside: str) -> Path:
        """A path in the container's file system, as this process can reach it."""
        leader = self.leader()
        assert leader is not None, "the container is not running"
        return Path(f"/proc/{leader}/root") / inside.lstrip("/")

    def run(self, *cmd: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A command inside, in every namespace of the container, with a clean environment."""
        leader = self.leader()
        assert leader is not None, "the container is not running"
        variables = [f"{k}={v}" for k, v in {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                                             "SYSTEMD_COLORS": "0", **(env or {})}.items()]
        out = subprocess.run(["nsenter", "-t", str(leader), "-a", "-r", "-w", "env", "-i", *variables, *cmd],
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def console_tail(self) -> str:
        return self.console.read_text(errors="replace")[-3000:] if self.console.exists() else ""
