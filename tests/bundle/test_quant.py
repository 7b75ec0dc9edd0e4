"""GGUF blocks imported without a second quantization (bundle/gguf_blocks.py), against the gguf
package's own dequantization of the same bytes, and the K-scale panels' own quantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from seqshare import _native
from seqshare.bundle.convert import permute_rows
from seqshare.bundle.gguf_blocks import (
    _Q4_0,
    _Q4_K,
    _Q5_0,
    _Q5_1,
    _Q5_K,
    _Q6_K,
    _Q8_0,
    from_gguf_blocks,
    q4_k_scales_mins,
)
from seqshare.bundle.quant import (
    PANEL_BLOCK_BYTES,
    Q6_GROUP,
    QTensor,
    default_group,
    dequantize,
    k_panel_values,
    kernel_args,
    pack_panels,
    panel_values,
    quantize,
    unpack_panels,
)
from seqshare.worker.errors import UnsupportedQuantError

T = gguf.GGMLQuantizationType


def gguf_reference(raw: np.ndarray, qtype: T, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(raw.view(np.uint8).reshape(rows, -1), qtype).reshape(rows, cols)


def random_blocks(dtype: np.dtype, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = np.frombuffer(rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).tobytes(), dtype).copy()
    for f in ("d", "dmin", "m"):  # realistic float16 scales (random bits could be inf or NaN)
        if f in dtype.names:
            b[f] = (rng.random(n) * 0.02 + 1e-4).astype(np.float16) * (-1 if f == "m" else 1)
    return b


@pytest.mark.parametrize(("fmt", "bits"), [("q4", 4), ("q5", 5), ("q6", 6), ("q8p", 8)])
def test_panel_packing_round_trips(fmt: str, bits: int) -> None:
    rows, cols = 13, 96  # a partial last panel
    q = np.random.default_rng(5).integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
    packed = pack_panels(fmt, q)
    assert packed.shape == (2, 3, PANEL_BLOCK_BYTES[fmt]) and PANEL_BLOCK_BYTES[fmt] == 32 * bits
    np.testing.assert_array_equal(unpack_panels(fmt, packed, rows, cols), q)


@pytest.mark.parametrize(("kind", "dtype", "fmt", "top"),
                         [("Q5_0", _Q5_0, "q5s", 31), ("Q5_1", _Q5_1, "q5", 31), ("Q4_0", _Q4_0, "q4s", 15),
                          ("Q8_0", _Q8_0, "q8p", 255)])
def test_legacy_blocks_become_panels_exactly(kind: str, dtype: np.dtype, fmt: str, top: int) -> None:
    """Q4_0, Q5_0 and Q8_0 (d x (q - 8, 16 or 128)) as symmetric panels without a mins plane, Q5_1
    with its own."""
    rows, cols = 10, 96
    raw = random_blocks(dtype, rows * cols // 32, 1)
    t = from_gguf_blocks(kind, raw, rows, cols)
    assert t.fmt == fmt and t.group_size == 32 and ("mins" in t.planes) == (fmt == "q5")
    values, _, _ = panel_values(t)
    assert int(values.max()) == top  # the fifth bits arrived
    np.testing.assert_array_equal(dequantize(t), gguf_reference(raw, getattr(T, kind), rows, cols))


@pytest.mark.parametrize(("kind", "dtype", "fmt", "top"), [("Q4_K", _Q4_K, "q4k", 15), ("Q5_K", _Q5_K, "q5k", 31)])
def test_k_quants_keep_their_scales_and_values_exactly(kind: str, dtype: np.dtype, fmt: str, top: int) -> None:
    rows, cols = 9, 512
    raw = random_blocks(dtype, rows * cols // 256, 2)
    t = from_gguf_blocks(kind, raw, rows, cols)
    assert t.fmt == fmt and t.group_size == 32 and set(t.planes) == {"qs", "scales"}
    q, d, sc, dmin, m = k_panel_values(t)
    assert int(q.max()) == top  # the fifth bits arrived
    want_sc, want_m = q4_k_scales_mins(raw["scales"])
    np.testing.assert_array_equal(sc, want_sc.reshape(rows, -1))
    np.testing.assert_array_equal(m, want_m.reshape(rows, -1))
    np.testing.assert_array_equal(d.reshape(-1).view(np.uint16), raw["d"].view(np.uint16))
    np.testing.assert_array_equal(dmin.reshape(-1).view(np.uint16), raw["dmin"].view(np.uint16))
    np.testing.assert_array_equal(dequantize(t), gguf_reference(raw, getattr(T, kind), rows, cols))


# Q6_K is d sc (q - 32) in gguf and d sc q - 32 d sc in the kernels' float step: one rounding more.
Q6_K_FLOAT_REL_ERR = 2.0**-23


def test_q6_k_keeps_its_scales_and_values() -> None:
    rows, cols = 9, 512
    raw = random_blocks(_Q6_K, rows * cols // 256, 4)
    t = from_gguf_blocks("Q6_K", raw, rows, cols)
    assert t.fmt == "q6k" and t.group_size == Q6_GROUP and set(t.planes) == {"qs", "scales"}
    q, d, sc, dmin, m = k_panel_values(t)
    assert dmin is None and m is None
    assert int(q.min()) == 0 and int(q.max()) == 63  # both high bits arrived
    np.testing.assert_array_equal(sc, raw["scales"].reshape(rows, -1))
    want = gguf_reference(raw, T.Q6_K, rows, cols).astype(np.float64)
    scale = (d.astype(np.float64).repeat(16, axis=1) * sc).repeat(16, axis=1)
    terms = np.abs(scale * q) + np.abs(32 * scale)
    assert np.all(np.abs(dequantize(t) - want) <= Q6_K_FLOAT_REL_ERR * terms)


# Rounding each group's scale to a multiple of its super-block's float16 d costs the K-scale
# quantizer this much RMS error over the float16-scale panel of the same bits (measured: 0.1-0.4%).
K_SCALE_RMS_OVER_PLAIN_MAX = 1.01


@pytest.mark.parametrize(("fmt", "plain"), [("q4k", "q4"), ("q5k", "q5"), ("q6k", "q6")])
def test_k_scale_quantizer_is_as_close_as_float16_scales(fmt: str, plain: str) -> None:
    """quantize() makes K-scale panels from floats (for tests and benchmarks): planes that unpack
    to what the dequantization reads, as close to the floats as float16 scales per group are."""
    w = np.random.default_rng(7).standard_normal((11, 512), dtype=np.float32) * 0.05
    t = quantize(w, fmt, default_group(fmt))
    q, d, sc, _, _ = k_panel_values(t)
    assert q.shape == w.shape and d.shape == (11, 2) and sc.shape == (11, 512 // t.group_size)

    def rms_err(t: QTensor) -> float:
        return float(np.sqrt(np.mean((dequantize(t) - w) ** 2)))

    assert rms_err(t) <= K_SCALE_RMS_OVER_PLAIN_MAX * rms_err(quantize(w, plain, default_group(plain)))


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("Q4_K", _Q4_K), ("Q5_K", _Q5_K), ("Q6_K", _Q6_K), ("Q5_0", _Q5_0), ("Q4_0", _Q4_0), ("Q8_0", _Q8_0)],
)
def test_imported_blocks_run_in_the_panel_kernels(kind: str, dtype: np.dtype) -> None:
    rows, cols = 16, 512
    per_block = 256 if kind.endswith("_K") else 32
    raw = random_blocks(dtype, rows * cols // per_block, 3)
    t = from_gguf_blocks(kind, raw, rows, cols)
    x = np.random.default_rng(0).standard_normal((3, cols), dtype=np.float32)
    got = _native.linear(x, **kernel_args(t))
    want = x.astype(np.float64) @ gguf_reference(raw, getattr(T, kind), rows, cols).astype(np.float64).T
    # int8 activations (the panel path's own error, tests/native/test_kernels.py INT8_ACT_QUANT_RTOL)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1.5e-2


def test_q4_k_needs_whole_super_blocks() -> None:
    with pytest.raises(UnsupportedQuantError, match="multiple of the Q4_K super-block size 256"):
        from_gguf_blocks("Q4_K", np.zeros(144 * 3, np.uint8), 4, 96)


@pytest.mark.parametrize("fmt", ["q4k", "q6k"])
def test_k_scale_panels_permute_rows_losslessly(fmt: str) -> None:
    """llama-architecture q/k rows are un-permuted on import: a K-scale panel's rows move with their
    values, d, dmin and multiples (rows crossing panels, a partial last panel)."""
    w = np.random.default_rng(9).standard_normal((13, 512), dtype=np.float32)
    t = quantize(w, fmt, default_group(fmt))
    order = np.random.default_rng(1).permutation(13)
    np.testing.assert_array_equal(dequantize(permute_rows(t, order)), dequantize(t)[order])
