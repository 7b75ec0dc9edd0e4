"""What the native kernel tests share: the ISA levels, skipping the ones this CPU lacks, and the
relative error every tolerance is stated in."""

from __future__ import annotations

import numpy as np
import pytest

from seqshare import _native

ISAS = ["scalar", "avx2", "avxvnni", "avx512", "amx", "neon", "dotprod", "i8mm"]


def runnable() -> list[str]:
    """The variants this CPU runs (a lower level is not always runnable: Zen 4 has avx512, not avxvnni)."""
    return _native.runnable_isas()


def need(isa: str) -> None:
    if isa not in runnable():
        pytest.skip(f"this CPU cannot run the {isa} kernels (runs: {', '.join(runnable())})")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(np.max(np.abs(want)), 1e-30))
