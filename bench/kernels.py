"""Kernel throughput at a model's shapes: GFLOP/s and GB/s per op, format and ISA.

    .venv/bin/python bench/kernels.py [--isa avx512] [--threads 2] [--formats q4,f32] [--tokens 1,512]
                                      [--shape qwen2.5-0.5b] [--layers 10] [--no-attention]

Decode GEMV (N=1) is judged by GB/s of packed weights streamed; prefill GEMM (N=512) by GFLOP/s.
Whole-layer figures sum the 7 linears of one layer; `--layers` passes over that many distinct
layers, so that a GEMV reads its weights from memory rather than the caches. Attention (`--formats ""`
for attention alone) runs over a cache filled once, `--layers` layers of it per pass: a prefill
chunk (512 over 512), one decode row over 6000, and 16 rows at the last position over 6000 (the
questions of one document stepping together over its shared prefix). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from seqshare import _native
from seqshare.bundle.quant import default_group, kernel_args, quantize
from seqshare.worker.errors import UnsupportedQuantError

# (hidden, ffn, heads, kv heads, head_dim) from the published configs
SHAPES = {"smollm2-135m": (576, 1536, 9, 3, 64), "qwen2.5-0.5b": (896, 4864, 14, 2, 64),
          "qwen2.5-1.5b": (1536, 8960, 12, 2, 128)}


def layer(shape: str) -> dict[str, tuple[int, int]]:
    """The 7 linears of one layer: name -> (rows, cols)."""
    hidden, inter, heads, kv_heads, hd = SHAPES[shape]
    return {"wq": (heads * hd, hidden), "wk": (kv_heads * hd, hidden), "wv": (kv_heads * hd, hidden),
            "wo": (hidden, heads * hd), "w_gate": (inter, hidden), "w_up": (inter, hidden),
            "w_down": (hidden, inter)}


def best_time(fn: Callable[[], object], min_time: float) -> float:
    fn()
    best, total, runs = float("inf"), 0.0, 0
    while total < min_time or runs < 3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, runs = min(best, dt), total + dt, runs + 1
    return best


def bench_linear(fmt: str, isa: str, n: int, min_time: float, shape: str, layers: int) -> None:
    """One pass over `layers` layers of distinct weights: with enough of them the weights cannot stay
    in the caches and a GEMV streams them from memory, as decode does."""
    rng = np.random.default_rng(0)
    weights, flops, nbytes = [], 0.0, 0
    for _ in range(layers):
        for rows, cols in layer(shape).values():
            w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
            t = quantize(w, fmt, default_group(fmt))
            weights.append((kernel_args(t), cols))
            flops += 2.0 * n * rows * cols
            nbytes += t.nbytes
    xs = {cols: rng.standard_normal((n, cols), dtype=np.float32) for _, cols in weights}

    def one_pass() -> None:
        for kw, cols in weights:
            _native.linear(xs[cols], isa=isa, **kw)

    dt = best_time(one_pass, min_time)
    print(f"linear {fmt:5s} {isa:7s} N={n:4d}  {shape} x{layers}  layer {dt / layers * 1e3:8.3f} ms  "
          f"{flops / dt / 1e9:8.1f} GFLOP/s  {nbytes / dt / 1e9:7.2f} GB/s weights ({nbytes / 2**20:.0f} MiB)")


def bench_attention(isa: str, n: int, length: int, min_time: float, shape: str, layers: int,
                    same_pos: bool = False, pairs: bool | None = None) -> None:
    """n queries over `layers` layers of a cache of `length` f16 rows, filled once (the model's
    layout) and each read once per pass: with enough layers from memory, as decode reads them.
    Causal (a prefill chunk ending at the cache's last row), or with `same_pos` every query at the
    last row: the questions of one document decoding a step together over its cached prefix."""
    _, _, HEADS, KV_HEADS, HEAD_DIM = SHAPES[shape]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, HEADS, HEAD_DIM), dtype=np.float32)
    kv = _native.KV(layers, KV_HEADS, HEAD_DIM, length, "f16", pairs=pairs)
    for layer in range(layers):
        kv.truncate(0)  # kv_store appends to one layer at a time
        rows = rng.standard_normal((2, length, KV_HEADS * HEAD_DIM), dtype=np.float32)
        _native.kv_store(kv, layer, rows[0], rows[1])
    q_pos = (np.full(n, length - 1) if same_pos else np.arange(length - n, length)).astype(np.int32)
    scale = HEAD_DIM**-0.5

    def one_pass() -> None:
        for layer in range(layers):
            _native.attention_kv(q, kv, layer, q_pos, 0, scale, isa)

    dt = best_time(one_pass, min_time) / layers
    # visible (query, key) pairs under the causal mask, 4 flops per head_dim element (QK and PV)
    flops = 4.0 * int(np.sum(q_pos + 1)) * HEADS * HEAD_DIM
    print(f"attention  {isa:7s} N={n:4d} len={length:5d}{' same pos' if same_pos else ''} x{layers}  layer "
          f"{dt * 1e3:8.3f} ms  {flops / dt / 1e9:8.1f} GFLOP/s  {kv.used_bytes / layers / dt / 1e9:7.2f} GB/s K/V")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default=_native.best_isa())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="q4,q5,q6,q8,q8p,q4k,q6k,f16,bf16,f32")
    ap.add_argument("--tokens", default="1,512")
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--no-kv-pairs", action="store_true",
                    help="a cache without BF16 pair tiles (kv_pair_tiles = false): tiles converted per call")
    ap.add_argument("--layers", type=int, default=1,
                    help="distinct layers per pass (10 at qwen2.5-0.5b: 4x a 32 MiB L3)")
    args = ap.parse_args()
    _native.set_threads(args.threads)
    print(f"isa={args.isa} threads={_native.get_threads()}")
    for n in (int(s) for s in args.tokens.split(",")):
        for fmt in (f for f in args.formats.split(",") if f):
            try:
                bench_linear(fmt, args.isa, n, args.min_time, args.shape, args.layers)
            except UnsupportedQuantError as e:  # e.g. a 256-column super-block format at 4864 columns
                print(f"linear {fmt:5s} {args.isa:7s} N={n:4d}  {args.shape}: skipped ({e})")
    if not args.no_attention:
        pairs = False if args.no_kv_pairs else None
        bench_attention(args.isa, 512, 512, args.min_time, args.shape, args.layers, pairs=pairs)
        bench_attention(args.isa, 1, 6000, args.min_time, args.shape, args.layers, pairs=pairs)
        bench_attention(args.isa, 16, 6000, args.min_time, args.shape, args.layers, same_pos=True, pairs=pairs)


if __name__ == "__main__":
    main()
