"""Commands the units run: `seqshare memory-setup` and `seqshare reload`.

`memory-setup` computes the memory plan, checks it fits and prepares the device partition; it is run
by seqshare-memory-setup.service before the workers start, or by hand. Exit codes:
  0   the plan fits (and the device partition, if a device tool is configured, is as planned)
  78  EX_CONFIG: the plan does not fit (the shortfall is named) or the configuration is invalid
  75  EX_TEMPFAIL: the device partition was rewritten; reboot the device, then start the workers
  73  EX_CANTCREAT: the plan could not be written where the workers read it
  1   the device tool failed
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import click

from seqshare.daemon.config import load_settings
from seqshare.daemon.device_hook import apply_partition, wanted_partition
from seqshare.daemon.memory_plan import EX_CONFIG, plan_for, plan_path, write_plan
from seqshare.worker.errors import ConfigError, DeviceToolError

EX_TEMPFAIL = 75
EX_CANTCREAT = 73


def _fail(message: str, code: int, command: str = "memory-setup") -> NoReturn:
    click.echo(f"seqshare {command}: {message}", err=True)
    raise SystemExit(code)


@click.command("memory-setup")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Worker config (TOML); environment SEQSHARE_* applies on top.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes that will run this config, each with its own copy "
                   "[default: memory.workers].")
@click.option("--vpu-mb", type=click.IntRange(min=0), default=None,
              help="Device tool: MiB kept for the video unit [default: memory.device_vpu_mb].")
@click.option("--vpp-mb", type=click.IntRange(min=0), default=None,
              help="Device tool: MiB kept for the image unit [default: memory.device_vpp_mb].")
def memory_setup(config_file: Path | None, as_json: bool, workers: int | None, vpu_mb: int | None,
                 vpp_mb: int | None) -> None:
    """Compute the memory plan, compare it with MemAvailable and the cgroup limit, write it where the
    workers read it, and (with memory.device_tool set) size the device's memory partition from it."""
    try:
        settings = load_settings(config_file)
        plan = plan_for(settings, workers=workers)
    except ConfigError as e:
        _fail(str(e), EX_CONFIG)
    where = plan_path(settings)
    try:
        write_plan(plan, where)
    except OSError as e:
        _fail(f"cannot write the plan to {where}: {e}", EX_CANTCREAT)
    report = plan.to_json()
    code = 0 if plan.fits else EX_CONFIG
    device_msg = None
    mem = settings.memory
    if plan.fits and mem.device_tool is not None:
        wanted = wanted_partition(plan, mem.device_vpu_mb if vpu_mb is None else vpu_mb,
                                  mem.device_vpp_mb if vpp_mb is None else vpp_mb)
        try:
            result = apply_partition(mem.device_tool, wanted)
        except DeviceToolError as e:
            _fail(str(e), 1)
        device_msg = result.message()
        report["device"] = {"current": vars(result.current), "wanted": vars(result.wanted),
                            "command": result.command, "reboot_needed": result.reboot_needed}
        if result.reboot_needed:
            code = EX_TEMPFAIL
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(plan.table())
        if device_msg:
            click.echo(device_msg)
        click.echo(f"plan written to {where}")
    if not plan.fits:
        _fail(f"memory plan {plan.verdict()}", EX_CONFIG)
    if code == EX_TEMPFAIL:
        _fail(f"{device_msg}", EX_TEMPFAIL)
    raise SystemExit(code)


@click.command("reload")
@click.option("--pid", type=click.IntRange(min=1), required=True, help="The worker's pid ($MAINPID).")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the worker writes reload.json [default: $RUNTIME_DIRECTORY].")
@click.option("--timeout", "timeout_s", type=float, default=110.0, show_default=True,
              help="Seconds to wait; keep it under the unit's TimeoutStartSec=, which bounds ExecReload=.")
def reload(pid: int, state_dir: Path | None, timeout_s: float) -> None:
    """Reload a worker and wait for the outcome: exit 0 when it reloaded, 1 when it failed.

    The unit's ExecReload= runs this, so `systemctl reload` reports a failed reload as failed."""
    from seqshare.daemon.reload import request_reload, runtime_dir

    where = state_dir or runtime_dir()
    if where is None:
        _fail("no --state-dir and no $RUNTIME_DIRECTORY: nowhere to read the outcome from", 2, "reload")
    ok, outcome = request_reload(pid, where, timeout_s)
    click.echo(f"seqshare reload: {outcome}", err=not ok)
    if not ok:
        raise SystemExit(1)

