"""`seqshare memory-setup`: compute the memory plan, check it fits, prepare the device partition.

Run by seqshare-memory-setup.service before the workers start, or by hand. Exit codes:
  0   the plan fits (and the device partition, if a device tool is configured, is as planned)
  78  EX_CONFIG: the plan does not fit (the shortfall is named) or the configuration is invalid
  75  EX_TEMPFAIL: the device partition was rewritten; reboot the device, then start the workers
  1   the device tool failed
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..worker.errors import ConfigError, DeviceToolError, MemoryBudgetError
from .config import load_settings
from .device_hook import apply_partition, wanted_partition
from .memory_plan import EX_CONFIG, Budget, bundle_facts, compute_plan, plan_path, write_plan

EX_TEMPFAIL = 75


@click.command("memory-setup")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Worker config (TOML); environment SEQSHARE_* applies on top.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes that will run this config (each holds its own copy).")
@click.option("--vpu-mb", type=click.IntRange(min=0), default=0, show_default=True,
              help="Device tool: MiB kept for the video unit.")
@click.option("--vpp-mb", type=click.IntRange(min=0), default=0, show_default=True,
              help="Device tool: MiB kept for the image unit.")
def memory_setup(config_file: Path | None, as_json: bool, workers: int, vpu_mb: int, vpp_mb: int) -> None:
    """Compute the memory plan, compare it with MemAvailable and the cgroup limit, write it for the
    worker, and (with memory.device_tool set) size the device's memory partition from it."""
    try:
        settings = load_settings(config_file)
        facts = [bundle_facts(m) for m in settings.models]
    except ConfigError as e:
        click.echo(f"seqshare memory-setup: {e}", err=True)
        raise SystemExit(EX_CONFIG) from e
    plan = compute_plan(settings, facts, Budget.measure(), workers)
    where = plan_path(settings)
    write_plan(plan, where)
    report = plan.to_json()
    code = 0 if plan.fits else EX_CONFIG
    device_msg = None
    if plan.fits and settings.memory.device_tool is not None:
        try:
            result = apply_partition(settings.memory.device_tool, wanted_partition(plan, vpu_mb, vpp_mb))
        except DeviceToolError as e:
            click.echo(f"seqshare memory-setup: {e}", err=True)
            raise SystemExit(1) from e
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
        click.echo(f"seqshare memory-setup: {MemoryBudgetError.__name__}: memory plan {plan.verdict()}",
                   err=True)
    raise SystemExit(code)
