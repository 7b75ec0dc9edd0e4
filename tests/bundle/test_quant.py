"""GGUF blocks imported without a second quantization (bundle/quant.py from_gguf_blocks), against
the gguf package's own dequantization of the same bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from seqshare import _native
from seqshare.bundle.quant import (
    _Q4_K,
    _Q5_0,
    Q4_K_F16_REL_ERR,
    dequantize,
    from_gguf_blocks,
    kernel_args,
    q4_k_scales_mins,
)
from seqshare.worker.errors import UnsupportedQuantError

T = gguf.GGMLQuantizationType


def gguf_reference(raw: np.ndarray, qtype: T, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(raw.view(np.uint8).reshape(rows, -1), qtype).reshape(rows, cols)


def random_blocks(dtype: np.dtype, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = np.frombuffer(rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).tobytes(), dtype).copy()
    for f in ("d", "dmin"):  # realistic float16 scales (random bits could be inf or NaN)
        if f in dtype.names:
            b[f] = (rng.random(n) * 0.02 + 1e-4).astype(np.float16)
    return b


def test_q5_0_becomes_q8_exactly() -> None:
    rows, cols = 10, 96
    raw = random_blocks(_Q5_0, rows * cols // 32, 1)
    t = from_gguf_blocks("Q5_0", raw, rows, cols)
    assert t.fmt == "q8" and t.group_size == 32
    assert int(t.planes["qs"].min()) >= -16 and int(t.planes["qs"].max()) <= 15
    np.testing.assert_array_equal(dequantize(t), gguf_reference(raw, T.Q5_0, rows, cols))


def test_q4_k_becomes_q4_within_the_float16_bound() -> None:
    rows, cols = 9, 512
    raw = random_blocks(_Q4_K, rows * cols // 256, 2)
    t = from_gguf_blocks("Q4_K", raw, rows, cols)
    assert t.fmt == "q4" and t.group_size == 32
    want = gguf_reference(raw, T.Q4_K, rows, cols)
    sc, m = q4_k_scales_mins(raw["scales"])
    d = raw["d"].astype(np.float64)[:, None] * sc  # per (super-block, group)
    dm = raw["dmin"].astype(np.float64)[:, None] * m
    terms = (np.repeat(d, 32, axis=1) * 15 + np.repeat(dm, 32, axis=1)).reshape(rows, cols)
    err = np.abs(dequantize(t).astype(np.float64) - want)
    assert np.all(err <= Q4_K_F16_REL_ERR * terms + 1e-12)
    assert err.max() > 0  # the bound is not vacuous: float16 does round some products


def test_q4_k_runs_in_the_q4_kernels() -> None:
    rows, cols = 16, 512
    raw = random_blocks(_Q4_K, rows * cols // 256, 3)
    t = from_gguf_blocks("Q4_K", raw, rows, cols)
    x = np.random.default_rng(0).standard_normal((3, cols), dtype=np.float32)
    got = _native.linear(x, **kernel_args(t))
    want = x.astype(np.float64) @ gguf_reference(raw, T.Q4_K, rows, cols).astype(np.float64).T
    # int8 activations (the q4 path's own error, tests/native/test_kernels.py INT8_ACT_QUANT_RTOL)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1.5e-2


def test_q4_k_needs_whole_super_blocks() -> None:
    with pytest.raises(UnsupportedQuantError, match="multiple of the Q4_K super-block size 256"):
        from_gguf_blocks("Q4_K", np.zeros(144 * 3, np.uint8), 4, 96)
