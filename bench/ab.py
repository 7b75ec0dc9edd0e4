"""Two builds of the native module against each other on one bundle, alternating in one run.

    .venv/bin/python bench/ab.py BEFORE.so AFTER.so BUNDLE [--rounds 5] [prefill:6000 decode:512 ...]
    .venv/bin/python bench/ab.py X.so X.so BUNDLE --pair-tiles off,on   # one build, two settings

Each build is loaded into a long-lived child process of its own (the module file is put in place
before each child starts), and the two children take turns figure by figure, so both see the same
machine state. A figure is the seconds to prefill N random token ids into a fresh cache, or the
seconds per greedy step over 64 steps after such a prompt. It prints the best and median of each
and AFTER's speed-up. Nothing asserts a time. Both builds run under this checkout's Python, so both
must have the binding it calls (where an older commit's binding differs, build its native/ with
today's binding). `--pair-tiles` sets each side's `kv_pair_tiles` (default on,on). BENCHMARKS.md's
"alternated in one process pair" figures come from this.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from seqshare import _native

STEPS = 64


def child(bundle: Path, pair_tiles: bool) -> None:
    """Load the bundle, then answer "prefill N" / "decode N" lines on stdin with seconds."""
    import numpy as np

    from seqshare.bundle.loader import load_bundle
    from seqshare.daemon.cli.bench import SeqshareEngine, time_decode, time_prefill

    eng = SeqshareEngine(load_bundle(bundle), 2, 128, kv_pair_tiles=pair_tiles)
    ids = [int(x) for x in np.random.default_rng(0).integers(100, 30000, 8192)]
    eng.prefill(ids[:64])  # warm-up: threads, allocators, first touch of the weights
    print("ready", flush=True)
    for line in sys.stdin:
        op, n = line.split()
        s = time_prefill(eng, ids[: int(n)]) if op == "prefill" else time_decode(eng, ids[: int(n)], STEPS) / STEPS
        print(s, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("figures", nargs="*", default=["decode:512", "decode:6000", "prefill:6000"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pair-tiles", default="on,on", choices=[f"{a},{b}" for a in ("on", "off") for b in ("on", "off")],
                    help="kv_pair_tiles of BEFORE and AFTER")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args()
    if args.child:
        return child(args.bundle, args.child == "on")
    installed = Path(_native.__file__)
    kept = installed.read_bytes()
    procs = []
    try:
        for so, pairs in zip((args.before, args.after), args.pair_tiles.split(","), strict=True):
            shutil.copy(so, installed.with_suffix(".tmp"))
            os.replace(installed.with_suffix(".tmp"), installed)
            p = subprocess.Popen([sys.executable, __file__, str(so), str(so), str(args.bundle), "--child", pairs],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            procs.append(p)
    finally:
        installed.with_suffix(".tmp").write_bytes(kept)
        os.replace(installed.with_suffix(".tmp"), installed)
    figures = [(f.split(":")[0], int(f.split(":")[1])) for f in args.figures]
    times: dict[tuple[str, int, int], list[float]] = {(op, n, i): [] for op, n in figures for i in (0, 1)}
    for r in range(args.rounds):
        for op, n in figures:
            for i in (0, 1) if r % 2 == 0 else (1, 0):  # who goes first alternates too
                p = procs[i]
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(f"{op} {n}\n")
                p.stdin.flush()
                times[(op, n, i)].append(float(p.stdout.readline()))
    print(f"machine: ISA {_native.best_isa()}, {args.rounds} alternating rounds, bundle {args.bundle.name}, "
          f"kv_pair_tiles {args.pair_tiles}")
    print("| figure | before best / median | after best / median | speed-up best / median | after won |")
    print("|---|---|---|---|---|")
    for op, n in figures:
        a, b = times[(op, n, 0)], times[(op, n, 1)]
        won = sum(y < x for x, y in zip(a, b, strict=True))
        unit = "s" if op == "prefill" else "ms/token"
        k = 1.0 if op == "prefill" else 1e3
        print(f"| {op} {n} | {min(a) * k:.3f} / {statistics.median(a) * k:.3f} {unit} | "
              f"{min(b) * k:.3f} / {statistics.median(b) * k:.3f} | {min(a) / min(b):.3f}x / "
              f"{statistics.median(a) / statistics.median(b):.3f}x | {won} of {len(a)} |")
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
