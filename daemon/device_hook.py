"""The device hook: size an accelerator's memory partition from the memory plan.

Boards like the seed's (Sophgo BM1684X) split their memory between the NPU and the video/image
units with an external tool, `memory_edit.sh`: `-p` prints the current partition, and
`-c -npu MB -vpu MB -vpp MB` writes a new one that takes effect after a reboot. seqshare computes the
NPU size from the plan (everything the device holds: weights, KV arena, prefix cache, scratch), keeps
the operator's video/image sizes, runs `-c` only when the current partition differs, and reports
that a reboot is needed instead of rebooting a box that may be serving.

The tool's `-p` output is read leniently: for each of npu, vpu and vpp the first integer after the
name (MiB). Anything else is a DeviceToolError showing the output, rather than a guess.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..worker.errors import DeviceToolError
from .memory_plan import MIB, MemoryPlan

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 120.0
_FIELD = re.compile(r"\b(npu|vpu|vpp)\b[^0-9\n]*?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Partition:
    npu_mb: int
    vpu_mb: int
    vpp_mb: int

    def set_args(self) -> list[str]:
        """The tool's own flag format for writing this partition."""
        return ["-c", "-npu", str(self.npu_mb), "-vpu", str(self.vpu_mb), "-vpp", str(self.vpp_mb)]

    def __str__(self) -> str:
        return f"npu {self.npu_mb} MiB, vpu {self.vpu_mb} MiB, vpp {self.vpp_mb} MiB"


@dataclass(frozen=True)
class DeviceResult:
    current: Partition
    wanted: Partition
    command: list[str] | None  # the -c command that ran, None when nothing had to change

    @property
    def reboot_needed(self) -> bool:
        return self.command is not None

    def message(self) -> str:
        if not self.reboot_needed:
            return f"device partition already as planned ({self.current})"
        return (f"device partition changed from ({self.current}) to ({self.wanted}); "
                f"REBOOT the device for it to take effect (seqshare does not reboot by itself)")


def wanted_partition(plan: MemoryPlan, vpu_mb: int = 0, vpp_mb: int = 0) -> Partition:
    return Partition(-(-plan.device_bytes // MIB), vpu_mb, vpp_mb)


def parse_partition(text: str) -> Partition:
    found: dict[str, int] = {}
    for name, value in _FIELD.findall(text):
        found.setdefault(name.lower(), int(value))
    missing = [n for n in ("npu", "vpu", "vpp") if n not in found]
    if missing:
        shown = text.strip()[:500] or "(nothing)"
        raise DeviceToolError(f"cannot read the current partition: no {', '.join(missing)} size in "
                              f"the tool's -p output:\n{shown}")
    return Partition(found["npu"], found["vpu"], found["vpp"])


def _run(tool: Path, args: list[str]) -> str:
    try:
        done = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              check=False)
    except FileNotFoundError as e:
        raise DeviceToolError(f"device memory tool {tool} does not exist") from e
    except PermissionError as e:
        raise DeviceToolError(f"device memory tool {tool} is not executable") from e
    except subprocess.TimeoutExpired as e:
        raise DeviceToolError(f"{tool} {' '.join(args)} did not finish in {TOOL_TIMEOUT_S:.0f} s") from e
    if done.returncode != 0:
        raise DeviceToolError(f"{tool} {' '.join(args)} exited with {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[:500]}")
    return done.stdout


def read_partition(tool: Path) -> Partition:
    return parse_partition(_run(tool, ["-p"]))


def apply_partition(tool: Path, wanted: Partition) -> DeviceResult:
    """Write `wanted` with the tool if (and only if) the current partition differs."""
    current = read_partition(tool)
    if current == wanted:
        return DeviceResult(current, wanted, None)
    args = wanted.set_args()
    log.warning("repartitioning device memory: %s %s", tool, " ".join(args))
    _run(tool, args)
    return DeviceResult(current, wanted, [str(tool), *args])
