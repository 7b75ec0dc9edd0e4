"""`seqshare bench` times a real bundle on this machine and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from seqshare.daemon.cli import cli


def test_bench_reports_prefill_decode_and_rss(default_gguf: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", str(default_gguf), "--lengths", "40,80", "--decode-after", "40",
                                   "--steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out["prefill"]) == {"40", "80"} and set(out["decode"]) == {"40"}
    assert all(v > 0 for v in [*out["prefill"].values(), *out["decode"].values()])
    assert out["peak_rss"] >= out["rss_after_load"] > 0


def test_bench_refuses_lengths_past_the_limits(default_gguf: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", str(default_gguf), "--lengths", "9000", "--steps", "3"])
    assert res.exit_code != 0 and "seq_length" in res.output
    res = CliRunner().invoke(cli, ["bench", str(default_gguf), "--lengths", "12,x"])
    assert res.exit_code != 0 and "comma-separated" in res.output


def test_peak_rss_is_the_child_own_not_its_parent() -> None:
    # A parent holding 512 MiB starts a small child. getrusage's ru_maxrss would report the parent's
    # size in the child (Linux carries it over fork and exec); the peak RSS the benchmarks record must not.
    script = (
        "import subprocess, sys\n"
        "big = bytearray(512 << 20)\n"
        "big[::4096] = b'x' * len(big[::4096])\n"  # touch every page
        "child = 'from seqshare.daemon.cli.bench import peak_rss_bytes; print(peak_rss_bytes())'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert 0 < int(out) < 256 << 20
