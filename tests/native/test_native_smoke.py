"""The compiled module imports, reports its CPU, and a trivial kernel agrees with numpy in every
variant this CPU can run."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_checks import ISAS, need

from seqshare import _native

DOT_RTOL = 1e-5  # float32 accumulation order differs between variants


def test_module_reports_version_and_isa() -> None:
    from importlib.metadata import version

    assert _native.__version__ == version("seqshare")
    assert _native.active_isa() in ISAS and _native.active_isa() == _native.best_isa()
    assert set(_native.runnable_isas()) <= set(ISAS) and _native.runnable_isas()[-1] == _native.best_isa()
    assert isinstance(_native.cpu_features()["avx2"], bool)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [0, 1, 15, 16, 33, 1000, 4099])
def test_dot_f32_matches_numpy_in_every_variant(n: int, isa: str) -> None:
    need(isa)
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n, dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    want = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
    got = _native.dot_f32(a, b, isa)
    assert got == pytest.approx(want, rel=DOT_RTOL, abs=1e-4), isa


def test_unknown_isa_and_bad_shapes_are_value_errors() -> None:
    a = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="unknown ISA"):
        _native.dot_f32(a, a, "sse9")
    with pytest.raises(ValueError, match="equal length"):
        _native.dot_f32(a, np.ones(5, np.float32))
