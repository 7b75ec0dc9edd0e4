"""The device hook: size an accelerator's memory partition from the memory plan.

Boards like the seed's (Sophgo BM1684X) split their memory between the NPU and the video (vpu) and
image (vpp) units with an external tool, `memory_edit.sh`. `-p` prints the partition:

    Info: get max memory size ...
    Info: max npu size: 0xfaf00000 [4015 MiB]
    ...
    Info: get now memory size ...
    Info: now npu size: 0x7d000000 [2000 MiB]
    Info: now vpu size: 0x7e800000 [2024 MiB]
    Info: now vpp size: 0x80000000 [2048 MiB]

and `-c -npu MB -vpu MB -vpp MB` writes a new boot image with that partition (its `check ... size`
lines echo what it wrote), which takes effect once the image is installed and the board rebooted.
BM1688 boards have no vpu: no `now vpu` line, and `-vpu 0`.

seqshare gives the NPU everything the plan puts on the device (weights, KV arena, prefix cache,
scratch), keeps the operator's vpu/vpp sizes, runs `-c` only when the current partition differs, and
reports that a reboot is needed instead of rebooting a box that may be serving. Output it cannot
read, or an `Error` line (the tool does not always exit non-zero), is a DeviceToolError showing it.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from seqshare.daemon.memory_plan import MIB, MemoryPlan
from seqshare.worker.errors import DeviceToolError

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 120.0
# "now npu size: 0x7d000000 [2000 MiB]" (what -p reports) and "check npu size: ..." (what -c wrote)
_SIZE = re.compile(r"\b(now|check)\s+(npu|vpu|vpp)\s+size:\s*(0x[0-9a-fA-F]+)(?:\s*\[(\d+)\s*MiB\])?")
_ERROR = re.compile(r"^\s*error\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Partition:
    npu_mb: int
    vpu_mb: int
    vpp_mb: int

    def set_args(self) -> list[str]:
        """The tool's own flag format for writing this partition (sizes in MiB)."""
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
        return (f"device partition rewritten from ({self.current}) to ({self.wanted}) by "
                f"`{' '.join(self.command or [])}`; it takes effect after a REBOOT of the device (with "
                f"Sophgo's memory_edit.sh, first copy the boot image it wrote to /boot). seqshare does not "
                f"reboot by itself; start the workers after the reboot")


def wanted_partition(plan: MemoryPlan, vpu_mb: int = 0, vpp_mb: int = 0) -> Partition:
    return Partition(-(-plan.device_bytes // MIB), vpu_mb, vpp_mb)


def _sizes(text: str, kind: str) -> dict[str, int]:
    """MiB per unit from the tool's `<kind> <unit> size:` lines (the bracketed MiB, else the hex bytes)."""
    found: dict[str, int] = {}
    for k, unit, hexbytes, mib in _SIZE.findall(text):
        if k == kind and unit not in found:
            found[unit] = int(mib) if mib else int(hexbytes, 16) // MIB
    return found


def _check_errors(text: str, what: str) -> None:
    if _ERROR.search(text):
        raise DeviceToolError(f"{what} reported an error:\n{text.strip()[-1500:]}")


def parse_partition(text: str) -> Partition:
    """The current partition from `-p` output. A unit without a line (vpu on BM1688) has 0 MiB."""
    _check_errors(text, "the device tool's -p")
    now = _sizes(text, "now")
    if "npu" not in now:
        shown = text.strip()[-1500:] or "(nothing)"
        raise DeviceToolError(f"cannot read the current partition: no 'now npu size' line in the tool's "
                              f"-p output:\n{shown}")
    return Partition(now["npu"], now.get("vpu", 0), now.get("vpp", 0))


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
                              f"{(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout + done.stderr


def read_partition(tool: Path) -> Partition:
    return parse_partition(_run(tool, ["-p"]))


def apply_partition(tool: Path, wanted: Partition) -> DeviceResult:
    """Write `wanted` with the tool if (and only if) the current partition differs."""
    current = read_partition(tool)
    if current == wanted:
        return DeviceResult(current, wanted, None)
    args = wanted.set_args()
    log.warning("repartitioning device memory: %s %s", tool, " ".join(args))
    out = _run(tool, args)
    _check_errors(out, f"{tool} {' '.join(args)}")
    written = _sizes(out, "check")
    wrong = {u: v for u, v in written.items() if v != getattr(wanted, f"{u}_mb")}
    if wrong:
        raise DeviceToolError(f"{tool} wrote {wrong} MiB, not the requested ({wanted}):\n{out.strip()[-1500:]}")
    return DeviceResult(current, wanted, [str(tool), *args])
