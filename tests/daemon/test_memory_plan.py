"""The memory plan: sizes from real bundle headers, `seqshare memory-setup` (fits: 0, does not fit: 78,
the shortfall named, the plan written), the worker refusing an over-budget config with 78 before
loading anything, a real cgroup limit, and lock_memory against a real RLIMIT_MEMLOCK."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import MIB, SEQSHARE, NotifySocket, run_cli, tiny_bundles, write_config

from seqshare import _native
from seqshare.bundle import crypto
from seqshare.bundle.loader import load_bundle
from seqshare.daemon.config import load_settings
from seqshare.daemon.memory_plan import RUNTIME_BYTES, Budget, bundle_facts, compute_plan, plan_for, read_header
from seqshare.daemon.memory_probe import cgroup_memory_limit, has_cap_ipc_lock
from seqshare.worker.model import Model

GIB = 1 << 30


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_bundles(tmp_path_factory)


def kv_bytes_per_token_f16(header: dict) -> int:
    spec = header["spec"]  # K and V, every layer, every KV head, 2 bytes each
    rows = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * 2
    # the same again where the caches keep BF16 pair tiles (the avx512 and amx levels)
    return rows * (2 if _native.kv_keeps_pairs("f16", spec["head_dim"]) else 1)


def test_plan_counts_shared_weights_once_and_sizes_the_kv_arena(bundles: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [("a", bundles["a"]), ("a_short", bundles["a_short"]), ("b", bundles["b"])])
    settings = load_settings(cfg)
    plan = plan_for(settings, Budget(64 * GIB, None, None))
    ha, hs, hb = (read_header(bundles[k]) for k in ("a", "a_short", "b"))
    assert ha["weight_digest"] == hs["weight_digest"] != hb["weight_digest"]

    weights = [i for i in plan.items if i.kind == "weights"]
    assert [(i.label, i.bytes) for i in weights] == [("weights a, a_short", ha["weight_bytes"]),
                                                     ("weights b", hb["weight_bytes"])]
    assert "shared by 2 bundles" in weights[0].detail
    per_token = kv_bytes_per_token_f16(ha)
    arena = {i.label: i.bytes for i in plan.items if i.kind == "kv_arena"}
    # share + max_batch slots of (seq - share) rows, each with 31 spare rows in whole 32-row tiles:
    # the document being prefilled plus each batched sequence's tail
    assert arena == {"KV arena a": (200 + 4 * 256) * per_token,  # 200 + 31 -> 256
                     "KV arena a_short": (100 + 4 * 160) * per_token,  # 100 + 31 -> 160
                     "KV arena b": (200 + 4 * 256) * kv_bytes_per_token_f16(hb)}
    # ... and what a loaded model's arena really allocates is that, less the document.
    model = Model(load_bundle(bundles["a"], share=False), threads=1, max_batch=settings.max_batch)
    assert model.arena.nbytes == arena["KV arena a"] - 200 * per_token
    rest = {i.kind: i.bytes for i in plan.items if i.kind in ("prefix_cache", "scratch", "runtime")}
    assert rest == {"prefix_cache": 64 * MIB, "scratch": 16 * MIB, "runtime": RUNTIME_BYTES}
    assert plan.per_worker_bytes == sum(i.bytes for i in plan.items)
    assert plan.fits and plan.shortfall_bytes == 0

    # The same facts against a small budget, for three workers: the shortfall is named exactly.
    facts = [bundle_facts(m) for m in settings.models]
    tight = compute_plan(settings, facts, Budget(100 * MIB, None, None), workers=3)
    assert not tight.fits
    assert tight.per_worker_bytes == plan.per_worker_bytes
    assert tight.shortfall_bytes == 3 * plan.per_worker_bytes - 100 * MIB
    assert "does not fit" in tight.verdict() and "MemAvailable" in tight.verdict()


def test_plan_and_arena_without_pair_tiles_count_one_copy_of_the_kv(bundles: dict[str, Path], tmp_path: Path) -> None:
    """kv_pair_tiles = false: the plan's arena and what a model allocates hold the f16 rows only,
    whatever the CPU (where it keeps pair tiles, that is half the default's)."""
    cfg = write_config(tmp_path, [("a", bundles["a"])])
    settings = load_settings(cfg, kv_pair_tiles=False)
    plan = plan_for(settings, Budget(64 * GIB, None, None))
    spec = read_header(bundles["a"])["spec"]
    rows_only = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * 2
    arena = {i.label: i.bytes for i in plan.items if i.kind == "kv_arena"}
    assert arena == {"KV arena a": (200 + 4 * 256) * rows_only}
    model = Model(load_bundle(bundles["a"], share=False), threads=1, max_batch=settings.max_batch, kv_pair_tiles=False)
    assert model.arena.nbytes == arena["KV arena a"] - 200 * rows_only
    assert not model.new_kv(64).pairs
    default = Model(load_bundle(bundles["a"], share=False), threads=1, max_batch=settings.max_batch)
    assert default.new_kv(64).pairs == _native.kv_keeps_pairs("f16", spec["head_dim"])


def test_memory_setup_fits_prints_the_table_and_writes_the_plan(bundles: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [("a", bundles["a"]), ("a_short", bundles["a_short"]), ("b", bundles["b"])])
    out = run_cli("memory-setup", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    for row in ("weights a, a_short", "weights b", "KV arena a_short", "prefix cache", "scratch", "runtime",
                "per worker", "MemAvailable", "cgroup memory limit", "fits: needs"):
        assert row in out.stdout, row
    written = json.loads((tmp_path / "plan.json").read_text())
    expected = plan_for(load_settings(cfg), Budget(64 * GIB, None, None))
    assert written["fits"] is True and written["workers"] == 1
    assert written["per_worker_bytes"] == expected.per_worker_bytes
    assert [i["label"] for i in written["items"]] == [i.label for i in expected.items]

    as_json = run_cli("memory-setup", "--config", str(cfg), "--json", "--workers", "3")
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["workers"] == 3 and report["total_bytes"] == 3 * expected.per_worker_bytes


def test_memory_setup_names_the_shortfall_and_exits_78(bundles: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [("a", bundles["a"])])
    cfg.write_text(cfg.read_text().replace(f"memory_bytes = {64 * MIB}", f"memory_bytes = {1 << 50}"))
    out = run_cli("memory-setup", "--config", str(cfg))
    assert out.returncode == 78, out.stdout + out.stderr
    assert "does not fit" in out.stderr and "short by" in out.stderr
    assert "(largest: prefix cache 1048576.00 GiB" in out.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is False

    missing = write_config(tmp_path, [("a", tmp_path / "nope.bundle")])
    out = run_cli("memory-setup", "--config", str(missing))
    assert out.returncode == 78 and "bundle" in out.stderr and "nope.bundle does not exist" in out.stderr


def test_encrypted_bundle_header_needs_the_key_credential(bundles: dict[str, Path], tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    crypto.generate_key_file(creds / crypto.CREDENTIAL)
    enc = tmp_path / "a.enc.bundle"
    crypto.encrypt_file(bundles["a"], enc, crypto.parse_key((creds / crypto.CREDENTIAL).read_bytes(), "key"))
    cfg = write_config(tmp_path, [("a", enc)])
    no_key = run_cli("memory-setup", "--config", str(cfg), env={"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})
    assert no_key.returncode == 78 and "is encrypted" in no_key.stderr and "seqshare-model-key" in no_key.stderr
    with_key = run_cli("memory-setup", "--config", str(cfg), "--json", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert with_key.returncode == 0, with_key.stderr
    assert json.loads(with_key.stdout)["models"][0]["seq_length"] == 400


def _worker(cfg: Path, tmp: Path, env: dict[str, str] | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*(prefix or []), SEQSHARE, "worker", "--config", str(cfg), "--redis-url", f"unix://{tmp}/no-redis.sock"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SEQSHARE_HOME": str(tmp / "home"), **(env or {})})


def test_worker_refuses_an_over_budget_config_with_78_and_no_ready(bundles: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [("a", bundles["a"])])
    cfg.write_text(cfg.read_text().replace(f"memory_bytes = {64 * MIB}", f"memory_bytes = {1 << 50}"))
    notify = NotifySocket()
    try:
        out = _worker(cfg, tmp_path, {"NOTIFY_SOCKET": str(notify.path)})
        assert out.returncode == 78, out.stderr
        assert "memory plan does not fit" in out.stderr and "short by" in out.stderr
        assert not [n for n in notify.snapshot() if n.get("READY")]
    finally:
        notify.close()


def test_worker_refuses_when_memory_setup_found_the_workers_do_not_fit(bundles: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    # One worker fits; memory.workers of them do not: memory-setup says so, and the worker it
    # planned for reads that plan and refuses too, though it would fit on its own.
    cfg = write_config(tmp_path, [("a", bundles["a"])], memory="workers = 1000000")
    assert run_cli("memory-setup", "--config", str(cfg)).returncode == 78
    out = _worker(cfg, tmp_path)
    assert out.returncode == 78, out.stderr
    assert "memory-setup's plan" in out.stderr and "1000000 workers" in out.stderr


def _no_ipc_lock(memlock: str) -> list[str]:
    """prlimit to `memlock` (soft:hard), and as root also no CAP_IPC_LOCK (which would lift the limit)."""
    prefix = ["prlimit", f"--memlock={memlock}"]
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", *prefix]
    return prefix


@pytest.mark.parametrize("under_systemd", [False, True], ids=["shell", "systemd-unit"])
def test_lock_memory_refuses_a_too_low_hard_memlock_limit(bundles: dict[str, Path], tmp_path: Path,
                                                          under_systemd: bool) -> None:
    cfg = write_config(tmp_path, [("a", bundles["a"])], memory="lock_memory = true")
    env = {"INVOCATION_ID": "0" * 32} if under_systemd else {}
    out = _worker(cfg, tmp_path, env=env, prefix=_no_ipc_lock("65536:65536"))
    assert out.returncode == 78, out.stderr
    assert "lock_memory needs" in out.stderr and "hard RLIMIT_MEMLOCK is 64 KiB;" in out.stderr
    if under_systemd:  # the unit already says infinity: the operator is told where the cap really is
        assert "sets LimitMEMLOCK=infinity" in out.stderr and "from outside systemd" in out.stderr
        assert "ulimit -l" not in out.stderr
    else:
        assert "ulimit -l" in out.stderr


def test_lock_memory_raises_a_low_soft_limit_up_to_the_hard_one() -> None:
    # A low soft limit under a high enough hard one is no reason to refuse: the worker lifts it itself.
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    hard = 64 << 20 if hard == resource.RLIM_INFINITY else hard
    if hard < 1 << 20:
        pytest.skip(f"the hard RLIMIT_MEMLOCK here is only {hard} bytes")
    # The worker's check before mlockall (the call itself would lock all of Python's mappings too).
    code = ("from seqshare.daemon.memory_probe import check_memlock, memlock_limits, raise_memlock_soft_limit; "
            f"raise_memlock_soft_limit(); check_memlock({hard // 2}, memlock_limits()[1], False, False); "
            "print(memlock_limits()[0])")
    out = subprocess.run([*_no_ipc_lock(f"65536:{hard}"), sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == hard  # the soft limit was raised to the hard one


def test_lock_memory_locks_when_the_limit_allows() -> None:
    code = ("from seqshare.daemon.memory_probe import lock_memory; lock_memory(64 << 20); "
            "import numpy; a = numpy.ones(8 << 20, numpy.uint8); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmLck')][0].split()[1])")
    cmd = [sys.executable, "-c", code]
    if subprocess.run(["prlimit", "--memlock=unlimited:unlimited", "true"], capture_output=True).returncode == 0:
        cmd = ["prlimit", "--memlock=unlimited:unlimited", *cmd]
    elif not has_cap_ipc_lock():
        pytest.skip("this user can neither raise RLIMIT_MEMLOCK nor lock without it (CAP_IPC_LOCK)")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) * 1024 >= 8 << 20  # the array touched after mlockall is locked (MCL_FUTURE)


# --- cgroups -------------------------------------------------------------------------------------------
@pytest.fixture
def limited_cgroup() -> Iterator[Path]:
    """A child of our own memory cgroup with a 1 GiB limit (v1 or v2), removed afterwards."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":")[1].split(",")), None)
    if v1 is not None:
        parent, limit_file = Path("/sys/fs/cgroup/memory") / v1.lstrip("/"), "memory.limit_in_bytes"
    else:
        v2 = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
        parent, limit_file = Path("/sys/fs/cgroup") / (v2 or "/").lstrip("/"), "memory.max"
        if "memory" not in (parent / "cgroup.subtree_control").read_text(errors="replace").split():
            pytest.skip("the memory controller is not enabled for children of our cgroup")
    child = parent / f"seqshare-test-{os.getpid()}"
    try:
        child.mkdir()
        (child / limit_file).write_text(str(GIB))
    except OSError as e:
        if child.exists():
            child.rmdir()
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    yield child
    child.rmdir()


def test_memory_setup_compares_with_the_cgroup_limit(bundles: dict[str, Path], tmp_path: Path,
                                                     limited_cgroup: Path) -> None:
    cfg = write_config(tmp_path, [("a", bundles["a"])])
    cfg.write_text(cfg.read_text().replace(f"memory_bytes = {64 * MIB}", f"memory_bytes = {2 * GIB}"))

    def enter() -> None:
        (limited_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    outside = run_cli("memory-setup", "--config", str(cfg))
    assert outside.returncode == 0, outside.stderr  # MemAvailable alone allows 2.3 GiB here
    proc = subprocess.run([SEQSHARE, "memory-setup", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=120, preexec_fn=enter)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"the cgroup limit ({limited_cgroup}" in proc.stderr and "allows 1.00 GiB" in proc.stderr
    assert "1.00 GiB" in proc.stdout and str(limited_cgroup) in proc.stdout  # the table's cgroup row


def test_cgroup_v2_limit_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    # A cgroup v2 host laid out in files: the unit's own memory.max is "max", its slice's is 3 GiB,
    # the parent slice's 8 GiB. The reader must walk up and take 3 GiB from the slice.
    root = tmp_path / "root"
    unit = root / "sys/fs/cgroup/system.slice/seqshare.slice/seqshare-worker@a.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.controllers").write_text("cpu memory pids\n")
    (unit / "memory.max").write_text("max\n")
    (unit.parent / "memory.max").write_text(f"{3 * GIB}\n")
    (unit.parent.parent / "memory.max").write_text(f"{8 * GIB}\n")
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("0::/system.slice/seqshare.slice/seqshare-worker@a.service\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
                         "rw,nsdelegate,memory_recursiveprot\n")
    got = cgroup_memory_limit(proc_cgroup, mountinfo, root)
    assert got.version == 2 and got.limit_bytes == 3 * GIB
    assert got.source == unit.parent / "memory.max"
