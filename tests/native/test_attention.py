"""The attention kernel (online softmax over tiles of the KV cache, ops.h) against a float64 softmax,
in every variant this CPU runs: f32 products, and BF16 pair products where the avx512 and amx
levels read an f16 cache."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_checks import ISAS, need, rel_err

from seqshare import _native

# Named tolerances. Relative errors are max|got - want| / max|want|.
ATTN_RTOL = 2e-5  # float32 online softmax vs float64 softmax
# The levels whose attention multiplies BF16 pairs with an f16 cache (avx512 with vdpbf16ps, amx on
# its tiles): q, K, V and the softmax weights are rounded to 8 significant bits (relative error up
# to 2^-9 each). Seen here: 2-6e-3 of the output's max against the float64 softmax of the unrounded
# inputs, 1-2e-3 (the weights' rounding) against that of the BF16-rounded q, K and V, and up to
# 7e-3 in the log-sum-exp.
BF16_ISAS = ("avx512", "amx")
BF16_ATTN_RTOL = 1.2e-2
BF16_WEIGHTS_RTOL = 4e-3
BF16_LSE_ATOL = 1.5e-2


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to nearest-even BF16 (the top 16 bits), as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, pos0: int,
                        scale: float) -> tuple[np.ndarray, np.ndarray]:
    h = q.shape[1]
    kvh = k.shape[1]
    kk = np.repeat(k.astype(np.float64), h // kvh, axis=1)  # (L, H, D)
    vv = np.repeat(v.astype(np.float64), h // kvh, axis=1)
    s = np.einsum("nhd,lhd->nhl", q.astype(np.float64), kk) * scale
    visible = (pos0 + np.arange(k.shape[0]))[None, None, :] <= q_pos[:, None, None]
    s = np.where(visible, s, -np.inf)
    m = np.max(s, axis=2, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l_sum = p.sum(axis=2, keepdims=True)
    out = np.einsum("nhl,lhd->nhd", p, vv) / np.where(l_sum > 0, l_sum, 1)
    lse = np.where(l_sum[..., 0] > 0, np.log(np.where(l_sum[..., 0] > 0, l_sum[..., 0], 1)) + m[..., 0], -np.inf)
    return out, lse


def attn_case(n: int, length: int, h: int, kvh: int, d: int, seed: int, f16: bool):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, h, d), dtype=np.float32)
    k = rng.standard_normal((length, kvh, d), dtype=np.float32)
    v = rng.standard_normal((length, kvh, d), dtype=np.float32)
    if f16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    return q, k, v


@pytest.mark.parametrize("f16", [True, False])
@pytest.mark.parametrize(
    ("n", "length", "h", "kvh", "pos0"),
    [(1, 1000, 9, 3, 0), (40, 40, 9, 3, 0), (5, 300, 4, 4, 100), (33, 70, 6, 2, 7), (1, 7, 2, 1, 3),
     # Qwen2.5's GQA groups in decode: 7 (0.5B) and 8 (3B) query heads per kv head
     (1, 700, 14, 2, 0), (1, 300, 16, 2, 40), (2, 300, 14, 2, 0)],
)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [64, 128])
def test_attention_matches_softmax(
    f16: bool, n: int, length: int, h: int, kvh: int, pos0: int, d: int, isa: str
) -> None:
    need(isa)
    q, k, v = attn_case(n, length, h, kvh, d, n + length, f16)
    q_pos = (pos0 + length - n + np.arange(n)).astype(np.int32)  # the last n rows of the span
    q_pos[0] = max(pos0 - 1, 0) if n > 1 else q_pos[0]  # a query that may see nothing (or row 0)
    scale = d**-0.5
    want_o, want_l = attention_reference(q, k, v, q_pos, pos0, scale)
    out, lse = _native.attention(q, k, v, q_pos, pos0, scale, isa)
    bf16 = f16 and isa in BF16_ISAS
    assert rel_err(out, want_o) < (BF16_ATTN_RTOL if bf16 else ATTN_RTOL), isa
    fin = np.isfinite(want_l)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    atol = BF16_LSE_ATOL if bf16 else ATTN_RTOL
    np.testing.assert_allclose(lse[fin], want_l[fin], rtol=ATTN_RTOL, atol=atol)


@pytest.mark.parametrize(
    ("n", "length", "h", "kvh", "pos0"),
    [(1, 1000, 14, 2, 0), (1, 301, 16, 2, 45), (2, 300, 14, 2, 7), (40, 90, 12, 2, 0), (33, 71, 9, 3, 45),
     (5, 300, 4, 4, 100), (200, 1200, 14, 2, 0)],
)
@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_bf16_pairs_are_the_softmax_of_rounded_inputs(
    n: int, length: int, h: int, kvh: int, pos0: int, d: int, isa: str
) -> None:
    """With an f16 cache the BF16 levels compute the softmax of q, K and V rounded to BF16; what is
    left is the weights' own rounding. Odd lengths and spans starting mid-tile put key pairs
    across the visible edge, whose other half must count for nothing."""
    need(isa)
    q, k, v = attn_case(n, length, h, kvh, d, 3 * n + length + d, True)
    q_pos = (pos0 + length - n + np.arange(n)).astype(np.int32)
    scale = d**-0.5
    want_o, want_l = attention_reference(bf16_round(q), bf16_round(k.astype(np.float32)),
                                         bf16_round(v.astype(np.float32)), q_pos, pos0, scale)
    out, lse = _native.attention(q, k, v, q_pos, pos0, scale, isa)
    assert rel_err(out, want_o) < BF16_WEIGHTS_RTOL, isa
    np.testing.assert_allclose(lse, want_l, rtol=ATTN_RTOL, atol=BF16_LSE_ATOL)
    # The rounding is BF16's: an f32 product would be nearer the softmax of the unrounded inputs.
    exact_o, _ = attention_reference(q, k, v, q_pos, pos0, scale)
    assert rel_err(out, want_o) < rel_err(out, exact_o), isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("h", "kvh", "d"), [(14, 2, 64), (16, 2, 128), (12, 2, 128), (9, 3, 64)])
def test_attention_row_is_the_same_bits_alone_or_with_others(h: int, kvh: int, d: int, isa: str) -> None:
    """A decode row (up to 8 rows per kv head: tiles read straight from the f16 cache) and the same
    row among more queries (tiles staged, as f32 or as BF16 pairs) run the same arithmetic: the
    same bits."""
    need(isa)
    q, k, v = attn_case(3, 500, h, kvh, d, h * d, True)
    q_pos = np.array([497, 498, 499], np.int32)
    together, lse_t = _native.attention(q, k, v, q_pos, 0, d**-0.5, isa)
    alone, lse_a = _native.attention(q[2:], k, v, q_pos[2:], 0, d**-0.5, isa)
    np.testing.assert_array_equal(alone[0], together[2], err_msg=isa)
    np.testing.assert_array_equal(lse_a[0], lse_t[2], err_msg=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("h", "kvh", "d", "pos0"), [(14, 2, 64, 0), (9, 3, 64, 45), (16, 2, 128, 7)])
def test_attention_row_is_the_same_bits_at_any_place_in_a_chunk(h: int, kvh: int, d: int, pos0: int,
                                                                isa: str) -> None:
    """A query of a 37-query causal chunk (its rows at every offset in amx's 16-row tile blocks,
    and in several blocks of keys) gets the bits it gets alone: a prefill chunk and a decode step
    of the same query agree on every level."""
    need(isa)
    n, length = 37, 600
    q, k, v = attn_case(n, length, h, kvh, d, h + d + pos0, True)
    q_pos = (pos0 + length - n + np.arange(n)).astype(np.int32)
    together, lse_t = _native.attention(q, k, v, q_pos, pos0, d**-0.5, isa)
    for i in (0, 9, 22, 36):
        alone, lse_a = _native.attention(q[i:i + 1], k, v, q_pos[i:i + 1], pos0, d**-0.5, isa)
        np.testing.assert_array_equal(alone[0], together[i], err_msg=f"{isa} query {i}")
        np.testing.assert_array_equal(lse_a[0], lse_t[i], err_msg=f"{isa} query {i}")


# The levels whose attention reads an f16 cache's BF16 pair tiles (KV `pairs`, native/kv.h).
PAIR_ISAS = ("avx512", "amx")


@pytest.mark.parametrize("isa", PAIR_ISAS)
@pytest.mark.parametrize(
    ("n", "length", "h", "kvh", "d", "pos0"),
    [(1, 700, 14, 2, 64, 0), (3, 300, 9, 3, 64, 45), (40, 90, 12, 2, 128, 7), (1, 300, 16, 2, 128, 64),
     (5, 300, 4, 4, 32, 31)],
)
def test_attention_over_pair_tiles_gives_the_bits_of_converting_per_call(n: int, length: int, h: int, kvh: int,
                                                                         d: int, pos0: int, isa: str) -> None:
    """A cache that keeps its whole tiles as BF16 pairs gives the bits of one converted per call
    (decode and prefill, a span starting mid-tile and one ending mid-tile)."""
    need(isa)
    q, k, v = attn_case(n, length, h, kvh, d, n + length + d + pos0, True)
    q_pos = (pos0 + length - n + np.arange(n)).astype(np.int32)
    want_o, want_l = _native.attention(q, k, v, q_pos, pos0, d**-0.5, isa, pairs=False)
    got_o, got_l = _native.attention(q, k, v, q_pos, pos0, d**-0.5, isa, pairs=True)
    np.testing.assert_array_equal(got_o, want_o)
    np.testing.assert_array_equal(got_l, want_l)


@pytest.mark.parametrize("isa", PAIR_ISAS)
@pytest.mark.parametrize("pos0", [0, 45])
def test_pair_tiles_follow_every_write_of_rows(pos0: int, isa: str) -> None:
    """Rows written again after their tiles were kept as pairs (new rows after a truncate, a reset,
    an import, an append) are read as written, not as the pairs of the rows before: attention over
    the cache gives the bits of a fresh cache holding the same rows."""
    need(isa)
    d, h, kvh, cap = 64, 6, 2, 200
    rng = np.random.default_rng(pos0)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(rng.standard_normal((n, kvh, d), dtype=np.float32).astype(np.float16) for _ in range(2))

    def store(kv: _native.KV, k: np.ndarray, v: np.ndarray) -> None:
        _native.kv_store(kv, 0, k.astype(np.float32).reshape(len(k), -1), v.astype(np.float32).reshape(len(v), -1))

    def check(kv: _native.KV, k: np.ndarray, v: np.ndarray, what: str) -> None:
        n = len(k)
        q = rng.standard_normal((3, h, d), dtype=np.float32)
        q_pos = np.array([pos0 + n // 2, pos0 + n - 2, pos0 + n - 1], np.int32)
        want = _native.attention(q, k, v, q_pos, pos0, d**-0.5, isa, pairs=False)
        got = _native.attention_kv(q, kv, 0, q_pos, pos0, d**-0.5, isa)  # converts the new whole tiles
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=what)

    kv = _native.KV(1, kvh, d, cap, "f16", start=pos0, pairs=True)
    assert kv.pairs and kv.nbytes == 2 * _native.KV(1, kvh, d, cap, "f16", start=pos0, pairs=False).nbytes
    k, v = rows(150)
    store(kv, k, v)
    check(kv, k, v, "first rows")
    kv.truncate(70)  # a regenerated answer: rows 70.. again, other values
    k2, v2 = rows(80)
    store(kv, k2, v2)
    k, v = np.concatenate([k[:70], k2]), np.concatenate([v[:70], v2])
    check(kv, k, v, "rows after a truncate")
    kv.reset(pos0)  # an arena slot's next sequence
    k, v = rows(120)
    store(kv, k, v)
    check(kv, k, v, "rows after a reset")
    other = _native.KV(1, kvh, d, cap, "f16", start=pos0, pairs=False)
    k, v = rows(160)
    store(other, k, v)
    kv.import_bytes(other.export_bytes(), 160)  # a document restored from the spill directory
    check(kv, k, v, "imported rows")
    kv.truncate(40)
    tail = _native.KV(1, kvh, d, cap, "f16", start=pos0 + 40, pairs=False)
    k3, v3 = rows(100)
    store(tail, k3, v3)
    kv.append(tail)
    k, v = np.concatenate([k[:40], k3]), np.concatenate([v[:40], v3])
    check(kv, k, v, "appended rows")
    ph = pos0 % 32  # row 0's lane in its tile
    whole = (ph + len(k)) // 32 * 32 - ph  # rows up to the last whole tile, converted by check()
    assert kv.pair_rows == [whole]
    grown = kv.copy(cap)
    grown.reserve(cap + 64)
    assert grown.pair_rows == [0]  # a copy converts its tiles at its first attention
    check(grown, k, v, "a grown copy")
    assert grown.pair_rows == [whole]
    grown.truncate(whole - 5)  # forgets the tile row whole - 5 is in, keeps those before it
    assert grown.pair_rows == [max(0, (ph + whole - 5) // 32 * 32 - ph)]
    check(grown, k[: whole - 5], v[: whole - 5], "a truncated copy")
    with pytest.raises(ValueError, match="f16 cache only"):
        _native.KV(1, kvh, d, cap, "f32", pairs=True)
    with pytest.raises(ValueError, match="head_dim 32, 64 or 128 only, not 96"):  # never filled: refused
        _native.KV(1, kvh, 96, cap, "f16", pairs=True)


@pytest.mark.parametrize(
    ("n", "length", "h", "kvh", "d"),
    [(1, 700, 14, 2, 64), (2, 300, 16, 2, 128), (40, 90, 12, 2, 128), (33, 70, 9, 3, 64), (5, 300, 4, 4, 32)],
)
@pytest.mark.parametrize(("isa", "f16"), [("avx512", False), ("amx", False)])
def test_attention_16_lanes_give_the_avx2_bits(isa: str, f16: bool, n: int, length: int, h: int, kvh: int,
                                               d: int) -> None:
    """The 16-lane scores, softmax and P.V (attention_avx512.h's Lanes16: avx512 and amx over an
    f32 cache) give AVX2's bits: decode (tiles straight from the cache) and prefill (staged tiles),
    whole tiles and masked ones."""
    need(isa)
    q, k, v = attn_case(n, length, h, kvh, d, n * length + d, f16)
    q_pos = (length - n + np.arange(n)).astype(np.int32)
    # From position 0, and from a span starting mid-tile (its first tile masks its low lanes).
    for pos0 in (0, 45):
        want_o, want_l = _native.attention(q, k[pos0:], v[pos0:], q_pos, pos0, d**-0.5, "avx2")
        got_o, got_l = _native.attention(q, k[pos0:], v[pos0:], q_pos, pos0, d**-0.5, isa)
        np.testing.assert_array_equal(got_o, want_o)
        np.testing.assert_array_equal(got_l, want_l)


@pytest.mark.parametrize("f16", [True, False])
def test_attention_merge_of_two_spans_equals_whole(f16: bool) -> None:
    q, k, v = attn_case(6, 200, 9, 3, 64, 0, f16)
    q_pos = np.arange(194, 200, dtype=np.int32)
    whole_o, whole_l = _native.attention(q, k, v, q_pos, 0, 0.125)
    a_o, a_l = _native.attention(q, k[:120], v[:120], q_pos, 0, 0.125)
    b_o, b_l = _native.attention(q, k[120:], v[120:], q_pos, 120, 0.125)
    m_o, m_l = _native.attention_merge(a_o, a_l, b_o, b_l)
    # The halves round their weights against their own maxima, the whole against one.
    bf16 = f16 and _native.active_isa() in BF16_ISAS
    assert rel_err(m_o, whole_o) < (BF16_WEIGHTS_RTOL if bf16 else ATTN_RTOL)
    np.testing.assert_allclose(m_l, whole_l, rtol=ATTN_RTOL, atol=BF16_LSE_ATOL if bf16 else 0)
    empty_o, empty_l = _native.attention(q, k[:1], v[:1], np.zeros(6, np.int32) - 1, 0, 0.125)
    assert np.all(np.isneginf(empty_l)) and not np.any(empty_o)
    m2_o, m2_l = _native.attention_merge(empty_o, empty_l, whole_o, whole_l)
    np.testing.assert_array_equal(m2_o, whole_o)
    np.testing.assert_array_equal(m2_l, whole_l)


@pytest.mark.parametrize("f16", [True, False])
def test_attention_over_a_model_cache_layer_equals_the_arrays_call(f16: bool) -> None:
    """attention_kv (bench/kernels.py's timed call) reads a layer of a cache the model filled: the
    same keys as attention's arrays give the same bits, at another layer and a start mid-tile."""
    q, k, v = attn_case(5, 150, 9, 3, 64, 3, f16)
    pos0 = 37  # row 0 at lane 5 of its K tile
    q_pos = np.array([40, 100, 150, 186, 186], np.int32)
    kv = _native.KV(2, 3, 64, 150, "f16" if f16 else "f32", start=pos0)
    for layer, (kl, vl) in enumerate([(v, k), (k, v)]):  # layer 0 holds other rows
        kv.truncate(0)  # the binding appends one layer at a time
        _native.kv_store(kv, layer, np.asarray(kl, np.float32).reshape(150, -1),
                         np.asarray(vl, np.float32).reshape(150, -1))
    with pytest.raises(ValueError, match="do not fit"):
        _native.kv_store(kv, 0, np.zeros((1, 192), np.float32), np.zeros((1, 192), np.float32))
    want_o, want_l = _native.attention(q, k, v, q_pos, pos0, 0.125)
    got_o, got_l = _native.attention_kv(q, kv, 1, q_pos, pos0, 0.125)
    np.testing.assert_array_equal(got_o, want_o)
    np.testing.assert_array_equal(got_l, want_l)
    with pytest.raises(ValueError, match="phase"):
        _native.attention_kv(q, kv, 1, q_pos, 32, 0.125)
    with pytest.raises(ValueError, match="no such layer"):
        _native.attention_kv(q, kv, 2, q_pos, pos0, 0.125)
