"""The device hook of `seqshare memory-setup`: the external memory tool (Sophgo's memory_edit.sh, a
program on the device) gets `-p`, and `-c -npu MB -vpu MB -vpp MB` sized from the plan only when the
partition differs; then a reboot is asked for, never done.

The tool does not exist here. Its stand-in is a real executable that records its argv and answers
in the output format Sophgo documents for memory_edit.sh (`now npu size: 0x... [N MiB]`, `check ...`
lines after -c), keeping the partition in a state file so a second run sees what the first wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from service_helpers import run_cli, tiny_bundles, write_config

from seqshare.daemon.device_hook import Partition, apply_partition, parse_partition
from seqshare.daemon.memory_plan import MIB, RUNTIME_BYTES
from seqshare.worker.errors import DeviceToolError

FAKE_TOOL = r'''#!@PYTHON@
"""Stand-in for memory_edit.sh: -p prints the partition, -c -npu N -vpu N -vpp N rewrites it."""
import json, sys
from pathlib import Path

here = Path(__file__).parent
with (here / "argv.log").open("a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
state = json.loads((here / "state.json").read_text())
units = ["npu", "vpp"] if state.get("bm1688") else ["npu", "vpu", "vpp"]
if state.get("error"):
    print("Error: " + state["error"])   # the real tool prints errors and may still exit 0
    sys.exit(0)
if sys.argv[1:] == ["-p"]:
    print("Info: get max memory size ...")
    for u in units:
        print(f"Info: max {u} size: 0xfaf00000 [4015 MiB]")
    print("Info: get now memory size ...")
    for u in units:
        print(f"Info: now {u} size: {state[u] * 1048576:#x} [{state[u]} MiB]")
elif sys.argv[1] == "-c":
    args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    for u in units:
        state[u] = int(args["-" + u]) + state.get("skew", 0)
    (here / "state.json").write_text(json.dumps(state))
    print("Info: output configuration results ...")
    print("Info: start check memory size ...")
    for u in units:
        print(f"Info: check {u} size: {state[u] * 1048576:#x} [{state[u]} MiB]")
    print("Info: check edit size ok")
else:
    print("Error: Invalid parameters.")
    sys.exit(1)
'''


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_bundles(tmp_path_factory)


def make_tool(d: Path, **state: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tool = d / "memory_edit.sh"
    tool.write_text(FAKE_TOOL.replace("@PYTHON@", sys.executable))
    tool.chmod(0o755)
    (d / "state.json").write_text(json.dumps({"npu": 2000, "vpu": 2024, "vpp": 2048, **state}))
    (d / "argv.log").write_text("")
    return tool


def calls(tool: Path) -> list[str]:
    return (tool.parent / "argv.log").read_text().splitlines()


def device_config(tmp: Path, bundle: Path, tool: Path, extra: str = "") -> Path:
    return write_config(tmp, [("a", bundle)], memory=f'device_tool = "{tool}"\ndevice_vpu_mb = 0\n'
                                                      f"device_vpp_mb = 4050\n{extra}")


def test_repartitions_once_from_the_plan_and_asks_for_a_reboot(bundles: dict[str, Path], tmp_path: Path) -> None:
    tool = make_tool(tmp_path / "tool")
    cfg = device_config(tmp_path, bundles["a"], tool)
    first = run_cli("memory-setup", "--config", str(cfg), "--json")
    assert first.returncode == 75, first.stderr  # EX_TEMPFAIL: the workers must wait for the reboot
    report = json.loads(first.stdout)
    npu = -(-(report["per_worker_bytes"] - RUNTIME_BYTES) // MIB)  # all but the host-side runtime
    assert report["device_bytes"] == report["per_worker_bytes"] - RUNTIME_BYTES
    assert calls(tool) == ["-p", f"-c -npu {npu} -vpu 0 -vpp 4050"]
    assert report["device"]["current"] == {"npu_mb": 2000, "vpu_mb": 2024, "vpp_mb": 2048}
    assert report["device"]["reboot_needed"] is True
    assert "REBOOT" in first.stderr and "does not reboot by itself" in first.stderr

    again = run_cli("memory-setup", "--config", str(cfg))
    assert again.returncode == 0, again.stderr
    assert calls(tool) == ["-p", f"-c -npu {npu} -vpu 0 -vpp 4050", "-p"]  # no second -c
    assert "device partition already as planned" in again.stdout

    # Command-line sizes for the video/image units win over the config's.
    over = run_cli("memory-setup", "--config", str(cfg), "--vpu-mb", "512", "--vpp-mb", "1024")
    assert over.returncode == 75
    assert calls(tool)[-1] == f"-c -npu {npu} -vpu 512 -vpp 1024"


def test_the_tool_is_not_run_when_the_plan_does_not_fit(bundles: dict[str, Path], tmp_path: Path) -> None:
    tool = make_tool(tmp_path / "tool")
    cfg = device_config(tmp_path, bundles["a"], tool, extra="workers = 1000000")
    out = run_cli("memory-setup", "--config", str(cfg))
    assert out.returncode == 78 and calls(tool) == []


def test_tool_failures_are_named(bundles: dict[str, Path], tmp_path: Path) -> None:
    tool = make_tool(tmp_path / "tool", error="get dts file failed")
    out = run_cli("memory-setup", "--config", str(device_config(tmp_path, bundles["a"], tool)))
    assert out.returncode == 1
    assert "reported an error" in out.stderr and "get dts file failed" in out.stderr
    assert calls(tool) == ["-p"]

    missing = run_cli("memory-setup", "--config",
                      str(device_config(tmp_path, bundles["a"], tmp_path / "no-such-tool.sh")))
    assert missing.returncode == 1 and "no-such-tool.sh does not exist" in missing.stderr


def test_a_partition_written_wrong_is_reported(tmp_path: Path) -> None:
    tool = make_tool(tmp_path / "tool", skew=1)  # the tool writes 1 MiB more than asked
    with pytest.raises(DeviceToolError, match="wrote"):
        apply_partition(tool, Partition(3000, 0, 4050))


def test_reads_bm1684x_and_bm1688_partitions(tmp_path: Path) -> None:
    bm1688 = make_tool(tmp_path / "bm1688", bm1688=True, npu=768, vpp=1280)
    result = apply_partition(bm1688, Partition(768, 0, 1280))
    assert result.current == Partition(768, 0, 1280) and not result.reboot_needed  # no vpu line: 0 MiB
    assert calls(bm1688) == ["-p"]
    # Sizes come from the "now" lines only, not the "max" ones printed first.
    text = ("Info: get max memory size ...\nInfo: max npu size: 0xfaf00000 [4015 MiB]\n"
            "Info: max vpu size: 0xb8000000 [2944 MiB]\nInfo: max vpp size: 0x100000000 [4096 MiB]\n"
            "Info: get now memory size ...\nInfo: now npu size: 0x7d000000 [2000 MiB]\n"
            "Info: now vpu size: 0x7e800000 [2024 MiB]\nInfo: now vpp size: 0x80000000 [2048 MiB]\n")
    assert parse_partition(text) == Partition(2000, 2024, 2048)
    with pytest.raises(DeviceToolError, match="no 'now npu size' line"):
        parse_partition("Info: max npu size: 0xfaf00000 [4015 MiB]\n")
