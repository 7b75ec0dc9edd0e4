"""What memory this process may use, read from the kernel's own files, and how to lock it.

- `mem_available()`: MemAvailable from /proc/meminfo (the kernel's estimate of what can be
  allocated without swapping, page cache included).
- `cgroup_memory_limit()`: the tightest `memory.max` on the path from our cgroup (cgroup v2, read from
  /proc/self/cgroup and the cgroup2 mount in /proc/self/mountinfo) up to the root; cgroup v1's
  `memory.limit_in_bytes` on hosts still on the legacy hierarchy. A systemd unit's MemoryMax= lands here.
- `lock_memory()`: mlockall via ctypes, after checking RLIMIT_MEMLOCK (unless CAP_IPC_LOCK lifts it).

Every reader takes its paths as arguments so tests can run it on real files of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seqshare.worker.errors import MemoryLockError

# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large means unlimited.
_V1_UNLIMITED = 1 << 62
CAP_IPC_LOCK = 14
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable in bytes."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"{meminfo}: unexpected unit {unit!r} for MemAvailable")
            return int(value) * 1024
    raise ValueError(f"{meminfo} has no MemAvailable line (kernel older than 3.14?)")


def own_rss(status: Path = Path("/proc/self/status")) -> int:
    """This process's resident set (VmRSS) in bytes: what a reload may reuse of what it holds."""
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class CgroupLimit:
    limit_bytes: int | None  # None: no limit anywhere on the path
    source: Path | None  # the file that set the limit (or our cgroup's directory when unlimited)
    version: int  # 2, 1, or 0 when no memory cgroup was found


@dataclass(frozen=True)
class _Mount:
    root: str  # the part of the hierarchy this mount shows (not "/" inside some containers)
    point: Path
    fstype: str
    super_options: str


def _mounts(mountinfo: Path) -> list[_Mount]:
    mounts = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        mounts.append(_Mount(fields[3], Path(point), tail[0], tail[2]))
    return mounts


def _cgroup_dir(root: Path, mount: _Mount, cgroup_path: str) -> Path:
    """Where `cgroup_path` (as /proc/self/cgroup names it) lives under `mount`, seen from `root`."""
    rel = cgroup_path
    if mount.root != "/" and (rel == mount.root or rel.startswith(mount.root + "/")):
        rel = rel[len(mount.root):]
    base = root / mount.point.relative_to("/")
    candidate = base / rel.lstrip("/")
    # In a cgroup namespace whose mount shows only our subtree, the path may not resolve: our
    # cgroup is then the mount's root.
    return candidate if candidate.is_dir() else base


def _tightest(start: Path, stop: Path, filename: str,
              parse: Callable[[str], int | None]) -> tuple[int | None, Path | None]:
    best: tuple[int | None, Path | None] = (None, None)
    d = start
    while True:
        f = d / filename
        if f.is_file():
            value = parse(f.read_text().strip())
            if value is not None and (best[0] is None or value < best[0]):
                best = (value, f)
        if d == stop or stop not in d.parents:
            return best
        d = d.parent


def _parse_v2(text: str) -> int | None:
    return None if text == "max" else int(text)


def _parse_v1(text: str) -> int | None:
    value = int(text)
    return None if value >= _V1_UNLIMITED else value


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        mountinfo: Path = Path("/proc/self/mountinfo"),
                        root: Path = Path("/")) -> CgroupLimit:
    """The memory limit of our cgroup and its ancestors, whichever is tightest."""
    v2_path = v1_path = None
    for line in proc_cgroup.read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    mounts = _mounts(mountinfo)
    if v1_path is not None:  # a v1 memory controller takes precedence: on hybrid hosts it holds limits
        for m in mounts:
            if m.fstype == "cgroup" and "memory" in m.super_options.split(","):
                start = _cgroup_dir(root, m, v1_path)
                limit, src = _tightest(start, root / m.point.relative_to("/"), "memory.limit_in_bytes",
                                       _parse_v1)
                return CgroupLimit(limit, src or start, 1)
    if v2_path is not None:
        for m in mounts:
            if m.fstype == "cgroup2":
                start = _cgroup_dir(root, m, v2_path)
                if not (start / "memory.max").exists() and not (start / "cgroup.controllers").exists():
                    continue
                limit, src = _tightest(start, root / m.point.relative_to("/"), "memory.max", _parse_v2)
                return CgroupLimit(limit, src or start, 2)
    return CgroupLimit(None, None, 0)


# --- memory locking --------------------------------------------------------------------------------
def has_cap_ipc_lock(status: Path = Path("/proc/self/status")) -> bool:
    """CAP_IPC_LOCK in the effective set lifts RLIMIT_MEMLOCK."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def memlock_limits() -> tuple[int | None, int | None]:
    """(soft, hard) RLIMIT_MEMLOCK in bytes; None where unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return tuple(None if v == resource.RLIM_INFINITY else v for v in (soft, hard))  # type: ignore[return-value]


def raise_memlock_soft_limit() -> None:
    """Any process may lift its soft limit up to the hard one: only the hard limit really binds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))


def _kib_or_mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def check_memlock(needed_bytes: int, hard: int | None, privileged: bool, under_systemd: bool) -> None:
    """Raise MemoryLockError, naming the limit and where to raise it, when `needed_bytes` cannot be locked.

    Under systemd the shipped unit already sets LimitMEMLOCK=infinity: a finite hard limit there means
    the unit was edited or the cap comes from outside systemd's reach (a container's limit on the
    service manager itself), and telling the operator to set what is set would send them in circles.
    """
    if privileged or hard is None or hard >= needed_bytes:
        return
    mib = -(-needed_bytes // (1 << 20))
    where = (
        f"the shipped seqshare-worker@.service sets LimitMEMLOCK=infinity (check `systemctl show -p "
        f"LimitMEMLOCK seqshare-worker@NAME`; set it again with `systemctl edit seqshare-worker@NAME` if an "
        f"override lowered it); if it is set and the hard limit is still {_kib_or_mib(hard)}, the cap comes "
        f"from outside systemd (the container or VM that runs it: raise its memlock limit, e.g. "
        f"`--rlimit=RLIMIT_MEMLOCK=infinity` for systemd-nspawn or `--ulimit memlock=-1` for docker)"
        if under_systemd else
        f"raise it with `ulimit -l {mib * 1024}` (as root, or via /etc/security/limits.conf) before starting"
    )
    raise MemoryLockError(
        f"lock_memory needs {mib} MiB locked but the hard RLIMIT_MEMLOCK is {_kib_or_mib(hard)}; {where}; "
        f"or turn memory.lock_memory off"
    )


def lock_memory(needed_bytes: int) -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): weights and KV never leave RAM.

    MCL_ONFAULT locks pages as they are first touched instead of populating every reserved mapping
    (thread stacks, malloc arenas) at once; kernels before 4.4 lack it and get plain MCL_FUTURE.
    """
    raise_memlock_soft_limit()
    under_systemd = bool(os.environ.get("INVOCATION_ID"))  # systemd sets it for every service it runs
    check_memlock(needed_bytes, memlock_limits()[1], has_cap_ipc_lock(), under_systemd)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for flags in (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, MCL_CURRENT | MCL_FUTURE):
        if libc.mlockall(flags) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            break
    limit = memlock_limits()[0]
    shown = "unlimited" if limit is None else _kib_or_mib(limit)
    raise MemoryLockError(
        f"mlockall failed: {os.strerror(err)} (RLIMIT_MEMLOCK is {shown}); raise LimitMEMLOCK= in "
        f"the unit or turn memory.lock_memory off"
    )
