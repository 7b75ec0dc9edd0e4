"""Every op of native/ops.h against numpy references (bundle/quant.py's dequantize is the spec of
the weight formats), in every kernel variant this CPU runs, through the same threaded code the
model uses."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_checks import ISAS, need, rel_err

from seqshare import _native
from seqshare.bundle.quant import Q6_GROUP, QTensor, default_group, dequantize, kernel_args, panel_tensor, quantize

QUANTIZED = ["q8", "q4", "q5", "q6", "q4s", "q5s", "q8p", "q4k", "q5k", "q6k"]

# Named tolerances. Relative errors are max|got - want| / max|want|.
FLOAT_LINEAR_RTOL = 2e-6  # fp32 FMA vs float64 over the same (exactly converted) f32/f16/bf16 weights
INT8_PATH_RTOL = 2e-6  # q8/q4 kernels vs numpy running the same int8-activation arithmetic
# The int8 activation quantisation itself (llama.cpp's scheme) vs float activations on the same
# dequantized weights: ~1/254 of a group's max per value, averaging out over a dot product.
INT8_ACT_QUANT_RTOL = 1.5e-2
# q8 weights take int16 activations: ~1/65534 of a group's max per value.
INT16_ACT_QUANT_RTOL = 1e-4
ELEMENTWISE_RTOL = 1e-6
ROPE_ATOL = 2e-6  # float32 angles as transformers computes them; cos/sin rounding only


def int8_path_reference(x: np.ndarray, t: QTensor) -> np.ndarray:
    """numpy version of the q8/q4 kernels: activations quantised per weight group, to int8 for q4
    weights and to int16 for q8 weights."""
    n, cols = x.shape
    g = t.group_size
    xg = x.reshape(n, cols // g, g).astype(np.float32)
    d = np.abs(xg).max(axis=2) / np.float32(32767.0 if t.fmt == "q8" else 127.0)
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(xg * inv[..., None]).astype(np.float64)
    xd = (q * d[..., None].astype(np.float64)).reshape(n, cols)
    return xd @ dequantize(t).astype(np.float64).T


def weight(fmt: str, rows: int, cols: int, group: int, seed: int) -> QTensor:
    """A random weight; q6 and the K-scale panels take their one group size whatever `group` says,
    and the K-scale panels whole 256-column super-blocks (columns are cut to a multiple of 256)."""
    rng = np.random.default_rng(seed)
    if fmt.endswith("k"):
        cols = max(256, cols // 256 * 256)
    w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
    return quantize(w, fmt, default_group(fmt) if fmt in ("q6", "q4k", "q5k", "q6k") else group)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16"])
@pytest.mark.parametrize(("rows", "cols", "n"), [(48, 64, 1), (100, 576, 3), (37, 1536, 37)])
def test_linear_float_formats(fmt: str, rows: int, cols: int, n: int, isa: str) -> None:
    need(isa)
    t = weight(fmt, rows, cols, 0, rows + cols)
    x = np.random.default_rng(n).standard_normal((n, cols), dtype=np.float32)
    want = x.astype(np.float64) @ dequantize(t).astype(np.float64).T
    got = _native.linear(x, isa=isa, **kernel_args(t))
    assert got.shape == (n, rows)
    assert rel_err(got, want) < FLOAT_LINEAR_RTOL, isa


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize(
    ("rows", "cols", "group", "n"),
    [(48, 64, 32, 1), (100, 576, 32, 3), (33, 576, 64, 1), (40, 576, 64, 9), (64, 1536, 128, 19), (17, 1536, 32, 70)],
)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_quantized_formats(fmt: str, rows: int, cols: int, group: int, n: int, isa: str) -> None:
    need(isa)
    t = weight(fmt, rows, cols, group, rows * cols + group)
    cols = t.shape[1]
    x = np.random.default_rng(n).standard_normal((n, cols), dtype=np.float32)
    x[:, 3] = 0.0  # an all-zero group must not divide by zero
    x[0, : t.group_size] = 0.0
    want = int8_path_reference(x, t)
    exact = x.astype(np.float64) @ dequantize(t).astype(np.float64).T
    bound = INT16_ACT_QUANT_RTOL if fmt == "q8" else INT8_ACT_QUANT_RTOL
    assert rel_err(want.astype(np.float32), exact) < bound
    got = _native.linear(x, isa=isa, **kernel_args(t))
    assert rel_err(got, want) < INT8_PATH_RTOL, isa


@pytest.mark.parametrize("isa", ["avxvnni", "avx512", "amx"])
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_vnni_integer_kernels_give_the_avx2_bits(isa: str, fmt: str) -> None:
    """VNNI sums the same integer products as AVX2's multiply-add chains, and the float steps are the
    same: the variants agree bit for bit, at every group size and tile remainder."""
    need(isa)
    cases = [(32, 1, 45), (64, 2, 33), (64, 7, 40), (128, 13, 17), (32, 37, 64), (64, 12, 8), (32, 25, 3)]
    for group, n, rows in cases:
        t = weight(fmt, rows, 1536, group, group + n)
        x = np.random.default_rng(n).standard_normal((n, 1536), dtype=np.float32)
        want = _native.linear(x, isa="avx2", **kernel_args(t))
        np.testing.assert_array_equal(_native.linear(x, isa=isa, **kernel_args(t)), want, err_msg=f"{group} {n}")


@pytest.mark.parametrize("fmt", ["q4", "q5", "q4s", "q5s", "q8p", "q4k", "q5k"])
def test_amx_tiles_give_the_avx512_bits_in_any_batch(fmt: str) -> None:
    """AMX takes whole tiles of 16 tokens x 16 rows in blocks of up to two by two, AVX-512 the rest:
    every block shape (one or two token tiles, one or two panel pairs, a lone last panel, tokens left
    over) at every group size gives AVX-512's bits, and a token's row is the same alone (decode, no
    tile) as inside any batch."""
    need("amx")
    cases = [(32, 16, 16), (64, 31, 24), (128, 32, 48), (32, 48, 56), (64, 70, 96), (32, 33, 136)]
    for group, n, rows in cases:
        t = weight(fmt, rows, 1024, group, group + n)
        x = np.random.default_rng(n).standard_normal((n, 1024), dtype=np.float32)
        got = _native.linear(x, isa="amx", **kernel_args(t))
        np.testing.assert_array_equal(got, _native.linear(x, isa="avx512", **kernel_args(t)), err_msg=f"{group} {n}")
        for i in (0, n // 2, n - 1):
            alone = _native.linear(x[i : i + 1], isa="amx", **kernel_args(t))
            np.testing.assert_array_equal(alone[0], got[i], err_msg=f"token {i} of {n}, group {group}")


@pytest.mark.parametrize("isa", ["dotprod", "i8mm"])
@pytest.mark.parametrize("fmt", ["q4", "q5", "q6", "q4s", "q5s", "q8p", "q4k", "q5k", "q6k"])
def test_arm_panel_kernels_give_the_neon_bits(isa: str, fmt: str) -> None:
    """sdot and smmla sum the same integer products as baseline NEON's smull/sadalp, and the float
    steps are shared: the ARM levels agree bit for bit, for lone tokens, token pairs and remainders."""
    need(isa)
    for group, n, rows in [(32, 1, 45), (64, 7, 40), (128, 13, 17), (32, 37, 64), (64, 12, 8), (32, 2, 3)]:
        t = weight(fmt, rows, 1536, group, group + n)
        x = np.random.default_rng(n).standard_normal((n, 1536), dtype=np.float32)
        want = _native.linear(x, isa="neon", **kernel_args(t))
        np.testing.assert_array_equal(_native.linear(x, isa=isa, **kernel_args(t)), want, err_msg=f"{group} {n}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q5", "q6", "q8p"])
def test_wide_panel_extremes_sum_exactly(isa: str, fmt: str) -> None:
    """Values at the top (q5: 31, q6: 63, q8p: 255) against activations at +-127: the largest sums a
    block makes, which would overflow AVX2's int16 lanes if a chain took more steps before widening
    than the format allows (q5: four, q6: two, q8p's nibble chains: eight), or saturate if q8p's bytes
    went into vpmaddubsw whole."""
    need(isa)
    rows, cols = 16, 512
    top = {"q5": 31, "q6": 63, "q8p": 255}[fmt]
    q = np.full((rows, cols), top, np.uint8)
    q[1::2, ::3] = 0  # some rows not all at the top
    symmetric = fmt in ("q6", "q8p")
    for group in ((Q6_GROUP,) if fmt == "q6" else (32, 128)):
        ones = np.ones((rows, cols // group), np.float16)
        t = panel_tensor(fmt, q, ones, None if symmetric else -ones, group)
        for n in (1, 2, 7):  # decode's split chains and the prefill tile
            x = np.ones((n, cols), np.float32)
            x[1::2] = -1.0
            got = _native.linear(x, isa=isa, **kernel_args(t))
            assert rel_err(got, int8_path_reference(x, t)) < INT8_PATH_RTOL, (isa, group, n)


def test_linear_same_result_with_one_or_two_threads() -> None:
    t = weight("q4", 80, 576, 32, 5)
    x = np.random.default_rng(1).standard_normal((9, 576), dtype=np.float32)
    before = _native.get_threads()
    try:
        _native.set_threads(1)
        one = _native.linear(x, **kernel_args(t))
        _native.set_threads(2)
        assert _native.get_threads() == 2
        two = _native.linear(x, **kernel_args(t))
    finally:
        _native.set_threads(before)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("fmt", ["q4", "q4k", "f32"])
@pytest.mark.parametrize("isa", ISAS)
def test_fused_linears_give_each_weight_its_own_rows(fmt: str, isa: str) -> None:
    """The model fuses q/k/v and gate/up into one op whose threads claim ranges of row chunks that can
    span two weights (Qwen2.5-1.5B's q/k/v: 24 + 4 + 4 chunks of 64 rows): each output is the weight's
    own `linear`, bit for bit, with one thread or two."""
    need(isa)
    ts = [weight(fmt, rows, 256, 32, rows) for rows in (1536, 256, 200)]
    x = np.random.default_rng(3).standard_normal((3, 256), dtype=np.float32)
    before = _native.get_threads()
    try:
        for threads in (1, 2):
            _native.set_threads(threads)
            for n in (1, 3):
                got = _native.linear_many(x[:n], [kernel_args(t) for t in ts], isa=isa)
                for t, y in zip(ts, got, strict=True):
                    np.testing.assert_array_equal(y, _native.linear(x[:n], isa=isa, **kernel_args(t)))
    finally:
        _native.set_threads(before)


@pytest.mark.parametrize("isa", ISAS)
def test_elementwise_ops_same_result_with_one_or_two_threads(isa: str) -> None:
    """Past ops.cpp's kMinSplit (32768 elements) the element-wise ops split their rows or runs among
    the threads: each element must still come out as one thread computes it, the odd tail included,
    and still match the float64 reference."""
    need(isa)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((70, 1000), dtype=np.float32)
    w = rng.standard_normal(1000, dtype=np.float32)
    up = rng.standard_normal((70, 1000), dtype=np.float32)
    flat, flat_up = x.reshape(-1)[:69_997], up.reshape(-1)[:69_997]  # 69,997: not a whole vector
    heads = rng.standard_normal((70, 8, 64), dtype=np.float32)
    pos = np.arange(1000, 1070, dtype=np.int32)

    def run() -> list[np.ndarray]:
        return [_native.rmsnorm(x, w, 1e-5, isa), _native.silu_mul(flat, flat_up, isa),
                _native.add(flat, flat_up, isa), _native.rope(heads, pos, 10000.0)]

    before = _native.get_threads()
    try:
        _native.set_threads(1)
        one = run()
        _native.set_threads(2)
        two = run()
    finally:
        _native.set_threads(before)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
    f64 = flat.astype(np.float64)
    assert rel_err(two[1], f64 / (1 + np.exp(-f64)) * flat_up) < ELEMENTWISE_RTOL, isa
    np.testing.assert_array_equal(two[2], flat + flat_up)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", *QUANTIZED])
def test_linear_rows_do_not_depend_on_the_batch(fmt: str, isa: str) -> None:
    """Batch invariance: a token's output is the same bits alone, in a small batch or in a big one,
    so a question decoded in a batch answers exactly as when decoded alone. At 1536 columns the AVX2
    panel kernels take 61 tokens in blocks of 15 to 24 (qgemm_panel.h's token blocks); at 8192 the
    AMX tiles take 80 of 90 tokens in blocks of 32, 32 and 16, under both 32-row passes of the first unit."""
    need(isa)
    cases = [(45, 576, 37, [(0, 1), (5, 7), (9, 13), (20, 37)]), (45, 1536, 61, [(0, 1), (23, 30), (17, 61)]),
             (80, 8192, 90, [(0, 1), (30, 90), (5, 40)])]
    for rows, cols, n, parts in cases:
        t = weight(fmt, rows, cols, 32, 11)
        x = np.random.default_rng(3).standard_normal((n, t.shape[1]), dtype=np.float32)
        whole = _native.linear(x, isa=isa, **kernel_args(t))
        for n0, n1 in parts:
            part = _native.linear(x[n0:n1], isa=isa, **kernel_args(t))
            np.testing.assert_array_equal(part, whole[n0:n1], err_msg=f"{isa} {cols} {n0}:{n1}")


def test_bad_weights_are_value_errors() -> None:
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="unknown weight format"):
        _native.linear(x, fmt="q7", data=np.zeros((4, 64), np.float32))
    with pytest.raises(ValueError, match=r"q5 data must be \(panels, cols/32, 160\)"):
        _native.linear(x, fmt="q5", data=np.zeros((1, 2, 128), np.uint8), rows=8, group=32)
    with pytest.raises(ValueError, match="scales are required"):
        _native.linear(x, fmt="q8", data=np.zeros((4, 64), np.int8), group=32)
    with pytest.raises(ValueError, match="q6 groups are 16 columns, got 32"):
        q6 = np.zeros((1, 2, 192), np.uint8)
        _native.linear(x, fmt="q6", data=q6, scales=np.zeros((1, 2, 8), np.float16), rows=8, group=32)
    q4, planes = np.zeros((1, 2, 128), np.uint8), np.zeros((1, 2, 8), np.float16)
    with pytest.raises(ValueError, match="mins are required for q4"):
        _native.linear(x, fmt="q4", data=q4, scales=planes, rows=8, group=32)
    with pytest.raises(ValueError, match="q4s is symmetric: it takes no mins"):
        _native.linear(x, fmt="q4s", data=q4, scales=planes, mins=planes, rows=8, group=32)
    with pytest.raises(ValueError, match="q8p is symmetric: it takes no mins"):
        _native.linear(x, fmt="q8p", data=np.zeros((1, 2, 256), np.uint8), scales=planes, mins=planes, rows=8, group=32)
    x256, q4k = np.ones((1, 256), np.float32), np.zeros((1, 8, 128), np.uint8)
    with pytest.raises(ValueError, match=r"q4k scales must be \(panels, cols/256, 160\)"):
        _native.linear(x256, fmt="q4k", data=q4k, scales=np.zeros((1, 1, 144), np.uint8), rows=8, group=32)
    with pytest.raises(ValueError, match="q4k keeps its minimums in its scales: it takes no mins"):
        _native.linear(x256, fmt="q4k", data=q4k, scales=np.zeros((1, 1, 160), np.uint8), mins=planes, rows=8,
                       group=32)
    with pytest.raises(ValueError, match="q4k needs whole 256-column super-blocks"):
        _native.linear(x, fmt="q4k", data=q4, scales=np.zeros((1, 1, 160), np.uint8), rows=8, group=32)
    with pytest.raises(ValueError, match="x must be"):
        _native.linear(np.ones((1, 63), np.float32), fmt="f32", data=np.zeros((4, 64), np.float32))


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", *QUANTIZED])
def test_embedding_rows_are_dequantized_rows(fmt: str) -> None:
    t = weight(fmt, 50, 128, 32, 3)
    tokens = np.array([0, 49, 7, 7], np.int32)
    got = _native.embedding(tokens, **kernel_args(t))
    np.testing.assert_array_equal(got, dequantize(t)[tokens])
    with pytest.raises(ValueError, match="out of range"):
        _native.embedding(np.array([50], np.int32), **kernel_args(t))


@pytest.mark.parametrize("isa", ISAS)
def test_rmsnorm_silu_mul_add(isa: str) -> None:
    need(isa)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 576), dtype=np.float32)
    w = rng.standard_normal(576, dtype=np.float32)
    up = rng.standard_normal((5, 576), dtype=np.float32)
    x64 = x.astype(np.float64)
    want_norm = x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + 1e-5) * w
    want_silu = x64 / (1 + np.exp(-x64)) * up
    assert rel_err(_native.rmsnorm(x, w, 1e-5, isa), want_norm) < ELEMENTWISE_RTOL, isa
    assert rel_err(_native.silu_mul(x, up, isa), want_silu) < ELEMENTWISE_RTOL, isa
    np.testing.assert_array_equal(_native.add(x, up, isa), x + up)


@pytest.mark.parametrize("isa", ["avx512", "amx"])
def test_wide_silu_mul_gives_the_avx2_bits(isa: str) -> None:
    """The AVX-512 levels' silu_mul does AVX2's operations per element at 16 lanes (its exp is
    avx2::exp's) and hands AVX2 the tail: every length, the tails of 1-15 included, and inputs from
    the exponential's clamps (|x| > 87) to zero give AVX2's bits."""
    need(isa)
    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 15, 16, 17, 31, 33, 100, 4864 * 3 + 5):
        gate = (rng.standard_normal(n) * rng.choice([0.01, 1.0, 10.0, 100.0], n)).astype(np.float32)
        gate[: min(n, 3)] = [0.0, -90.0, 95.0][: min(n, 3)]
        up = rng.standard_normal(n, dtype=np.float32)
        np.testing.assert_array_equal(_native.silu_mul(gate, up, isa), _native.silu_mul(gate, up, "avx2"),
                                      err_msg=f"n={n}")


def test_rope_rotates_halves_like_transformers() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 64), dtype=np.float32)
    pos = np.array([0, 1, 511, 6000], np.int32)
    # transformers' default rope init and forward, in float32
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).to(dtype=torch.float) / 64))
    ang = torch.from_numpy(pos).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], dim=-1)[:, None, :]
    xt = torch.from_numpy(x)
    rotated = torch.cat([-xt[..., 32:], xt[..., :32]], dim=-1)
    want = (xt * emb.cos() + rotated * emb.sin()).numpy()
    np.testing.assert_allclose(_native.rope(x, pos, 10000.0), want, atol=ROPE_ATOL)


@pytest.mark.parametrize("start", [0, 5, 31, 70])
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_kv_store_rows_read_back_exactly_whatever_the_phase(dtype: str, start: int) -> None:
    """K lives in transposed 32-row tiles aligned to absolute positions, V in rows: what is stored
    reads back (as float16 when the cache is float16), also across a tile boundary and a copy."""
    kv = _native.KV(2, 3, 64, 40, dtype, start=start)
    assert kv.phase == start % 32
    rng = np.random.default_rng(start)
    k, v = (rng.standard_normal((37, 192), dtype=np.float32) * 100 for _ in range(2))
    k[0, 0] = 1e-7  # a float16 subnormal
    _native.kv_store(kv, 0, -v, k)  # layer 0's rows, then the length goes back for layer 1's
    kv.truncate(0)
    _native.kv_store(kv, 1, k[:30], v[:30])
    _native.kv_store(kv, 1, k[30:], v[30:])
    cast = np.float16 if dtype == "f16" else np.float32
    got_k, got_v = kv.layer_f32(1)
    np.testing.assert_array_equal(got_k, k.astype(cast).astype(np.float32))
    np.testing.assert_array_equal(got_v, v.astype(cast).astype(np.float32))
    twin = kv.copy(45)
    assert twin.phase == kv.phase and twin.length == 37
    np.testing.assert_array_equal(twin.layer_f32(1)[0], got_k)
    for layer in range(2):  # every (layer, kv head) block, whichever pool thread copied it
        for got, want in zip(twin.layer_f32(layer), kv.layer_f32(layer), strict=True):
            np.testing.assert_array_equal(got, want)
    # The export layout is per layer K then V, each kv head's rows in turn, whatever the storage;
    # an import into a cache of another phase puts every row back.
    exported = np.frombuffer(kv.export_bytes(), dtype=cast).reshape(2, 2, 3, 37, 64).astype(np.float32)
    for layer in range(2):
        for which, plane in enumerate(kv.layer_f32(layer)):
            np.testing.assert_array_equal(exported[layer, which], plane.reshape(37, 3, 64).transpose(1, 0, 2))
    for other in (start, start + 9):
        restored = _native.KV(2, 3, 64, 37, dtype, start=other)
        restored.import_bytes(kv.export_bytes(), 37)
        for layer in range(2):
            for got, want in zip(restored.layer_f32(layer), kv.layer_f32(layer), strict=True):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("start", "kept", "dtype"), [(0, 40, "f16"), (45, 20, "f16"), (3, 64, "f32"), (7, 10, "f32")])
def test_kv_append_keeps_the_rows_before_it_in_a_shared_tile(start: int, kept: int, dtype: str) -> None:
    """Rows appended mid-tile (a cache cut back, then another cache's rows after it) leave the rows
    before them in that K tile as they were: a whole-tile copy once overwrote them."""
    rng = np.random.default_rng(kept)
    k, v = (rng.standard_normal((100, 128), dtype=np.float32) for _ in range(2))
    kv = _native.KV(1, 2, 64, 200, dtype, start=start)
    _native.kv_store(kv, 0, k[:70] * 3, v[:70] * 3)
    kv.truncate(kept)
    tail = _native.KV(1, 2, 64, 200, dtype, start=start + kept)
    _native.kv_store(tail, 0, k[kept:], v[kept:])
    kv.append(tail)
    cast = np.float16 if dtype == "f16" else np.float32
    want = [np.concatenate([x[:kept] * 3, x[kept:]]).astype(cast).astype(np.float32) for x in (k, v)]
    for got, w in zip(kv.layer_f32(0), want, strict=True):
        np.testing.assert_array_equal(got, w)
