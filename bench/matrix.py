"""The benchmark matrix: seqshare vs llama.cpp at real model shapes, in every GGUF format users download.

    .venv/bin/python bench/matrix.py [--shapes smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b]
                                     [--formats Q4_0,Q4_1,Q8_0,Q4_K_M,Q5_K_M] [--lengths 512,2048]
                                     [--decode-after 512,2048] [--rounds 1] [--threads 2]

For each shape it writes a GGUF of random f16 weights (the `gguf` package; hidden size, layers, heads,
kv heads and FFN from the published configs; q/k/v bias and tied embeddings as Qwen2.5 has them; the
tokenizer copied from the default model, so the vocabulary is its 49,152 tokens rather than Qwen's
151,936), then quantizes it with llama.cpp's own quantizer (`llama_model_quantize`) to each format.
Speed does not depend on the weights' values. Every file is cached under
$SEQSHARE_HOME/bench-matrix and reused.

Each cell runs bench/engine.py on that file: seqshare (the GGUF compiled losslessly where the format
allows) and llama.cpp with flash attention off and on (each figure takes the better), alternating, in
one run. The table shows seqshare / llama.cpp per figure, above 1 = seqshare faster, with the CPU, its
ISA flags and the ISA seqshare picked. A second table puts each decode figure against the
memory-bandwidth floor (bench/floor.py), from the plain read bandwidth measured before the first
cell and after the last (the higher counts). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import floor
import numpy as np

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    qkv_bias: bool
    rope_base: float
    eps: float


# From the published config.json of each model (tied embeddings everywhere).
SHAPES = {
    "smollm2-135m": Shape("llama", 576, 30, 9, 3, 1536, False, 100000.0, 1e-5),
    "qwen2.5-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, True, 1000000.0, 1e-6),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 28, 12, 2, 8960, True, 1000000.0, 1e-6),
    "qwen2.5-3b": Shape("qwen2", 2048, 36, 16, 2, 11008, True, 1000000.0, 1e-6),
}
# llama.cpp's llama_ftype numbers. The matrix runs the first four; Q5_K_M (its 5-bit tensors run as
# q5) on request.
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
MATRIX_FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M")


def cache_dir() -> Path:
    from seqshare.daemon.paths import seqshare_home

    d = seqshare_home() / "bench-matrix"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_f16(name: str, s: Shape, out: Path) -> None:
    """A GGUF of random weights at shape `s`, with the default model's tokenizer."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from seqshare.daemon.fetch import default_model_path

    src = GGUFReader(str(default_model_path()))
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    w = GGUFWriter(str(out), s.arch)
    w.add_name(f"random {name}")
    w.add_block_count(s.layers)
    w.add_context_length(32768)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.eps)
    w.add_file_type(1)  # mostly f16
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    hd = s.hidden // s.heads
    w.add_tensor("token_embd.weight", rand(vocab, s.hidden))
    w.add_tensor("output_norm.weight", np.ones(s.hidden, np.float32))
    for i in range(s.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(s.hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(s.hidden, np.float32))
        for t, rows in (("attn_q", s.heads * hd), ("attn_k", s.kv_heads * hd), ("attn_v", s.kv_heads * hd)):
            w.add_tensor(p + t + ".weight", rand(rows, s.hidden))
            if s.qkv_bias:
                w.add_tensor(p + t + ".bias", (rng.standard_normal(rows, dtype=np.float32) * 0.02))
        w.add_tensor(p + "attn_output.weight", rand(s.hidden, s.heads * hd))
        w.add_tensor(p + "ffn_gate.weight", rand(s.ffn, s.hidden))
        w.add_tensor(p + "ffn_up.weight", rand(s.ffn, s.hidden))
        w.add_tensor(p + "ffn_down.weight", rand(s.hidden, s.ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def quantized(name: str, fmt: str, threads: int) -> Path:
    """The cached file of shape `name` in format `fmt`, made on first use."""
    d = cache_dir()
    out = d / f"{name}.{fmt}.gguf"
    if out.exists():
        return out
    f16 = d / f"{name}.f16.gguf"
    if not f16.exists():
        print(f"writing {f16.name} ...", file=sys.stderr, flush=True)
        write_f16(name, SHAPES[name], f16.with_suffix(".part"))
        f16.with_suffix(".part").rename(f16)
    llama_quantize(f16, out, fmt, threads)
    return out


def llama_quantize(src: Path, out: Path, fmt: str, threads: int, requantize: bool = False) -> None:
    """`src` quantized to `fmt` by llama.cpp's own quantizer, written to `out` (via a .part file)."""
    import llama_cpp

    print(f"quantizing {out.name} with llama.cpp ...", file=sys.stderr, flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[fmt]
    params.nthread = threads
    params.allow_requantize = requantize
    part = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {fmt}")
    part.rename(out)


def run_cell(gguf: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cell.json"
        cmd = [sys.executable, str(HERE / "engine.py"), "--gguf", str(gguf), "--threads", str(args.threads),
               "--lengths", args.lengths, "--decode-after", args.decode_after, "--steps", str(args.steps),
               "--peers", "llama", "--rounds", str(args.rounds), "--json", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not out.exists():
            print(f"{gguf.name} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
            return None
        return dict(json.loads(out.read_text()))


def ratio_row(name: str, fmt: str, cell: dict[str, Any] | None, cols: list[tuple[str, str]]) -> str:
    if cell is None or not cell.get("seqshare") or not cell.get("llama.cpp"):
        return f"| {name} | {fmt} | " + " | ".join("failed" for _ in cols) + " |"
    ours, peer = cell["seqshare"], cell["llama.cpp"]
    vals = []
    for kind, n in cols:
        a, b = ours[kind].get(n), peer[kind].get(n)
        vals.append(f"{a / b:.2f}x ({a:.0f} / {b:.0f})" if a and b else "-")
    return f"| {name} | {fmt} | " + " | ".join(vals) + " |"


Cells = dict[tuple[str, str], tuple[Path, dict[str, Any] | None]]  # (shape, format) -> (GGUF, figures)


def floor_rows(cells: Cells, decode_lengths: list[str], steps: int, bandwidth: float) -> list[str]:
    """One row per cell: the floor's tok/s per decode length and each engine's share of it."""
    rows = []
    for (name, fmt), (gguf, cell) in cells.items():
        s, weights = SHAPES[name], floor.streamed_weight_bytes(gguf)
        vals = []
        for n in decode_lengths:
            kv = floor.kv_bytes(s.layers, s.kv_heads, s.hidden // s.heads, int(n) + steps // 2)
            top = floor.floor_tok_s(weights, kv, bandwidth)
            ours, peer = ((cell or {}).get(e, {}).get("decode", {}).get(n) for e in ("seqshare", "llama.cpp"))
            pct = " / ".join(f"{v / top:.0%}" if v else "-" for v in (ours, peer))
            vals.append(f"{top:.0f}: {pct}")
        rows.append(f"| {name} | {fmt} | {weights / 1e6:.0f} | " + " | ".join(vals) + " |")
    return rows


def floor_table(cells: Cells, decode_lengths: list[str], args: argparse.Namespace, bandwidth: float) -> float:
    """Print the decode figures against the floor, from the higher of the read bandwidth measured
    before the cells and now (a VM's bandwidth drifts; the higher floor is the harder one)."""
    bandwidth = max(bandwidth, floor.read_bandwidth(args.threads))
    print(f"\nDecode against the memory-bandwidth floor: (weight + f16 KV bytes per step) / "
          f"{bandwidth / 1e9:.1f} GB/s, the plain read of {args.threads} thread(s); floor tok/s: "
          f"seqshare / llama.cpp as shares of it\n")
    head = "| shape | format | weight MB | " + " | ".join(f"decode {n}" for n in decode_lengths) + " |"
    print("\n".join([head, "|" + "---|" * (3 + len(decode_lengths)),
                     *floor_rows(cells, decode_lengths, args.steps, bandwidth)]))
    return bandwidth


def cpu_line() -> str:
    from seqshare import _native

    info = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    isa = [f for f in flags if f.startswith(("avx2", "avx512", "avx_vnni", "amx", "fma", "f16c"))]
    return (f"CPU: {model}; ISA flags: {' '.join(sorted(isa))}; seqshare picked {_native.best_isa()} "
            f"(runs: {', '.join(_native.runnable_isas())})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--formats", default=",".join(MATRIX_FORMATS), help=f"any of {', '.join(FTYPES)}")
    ap.add_argument("--lengths", default="512,2048", help="prefill lengths (add 6000 for the small shapes)")
    ap.add_argument("--decode-after", default="512,2048")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write every cell's raw figures here")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s} (known: {', '.join(SHAPES)})")
    for f in formats:
        if f not in FTYPES:
            ap.error(f"unknown format {f} (known: {', '.join(FTYPES)})")
    cols = [("prefill", n) for n in args.lengths.split(",") if n] + \
           [("decode", n) for n in args.decode_after.split(",") if n]
    decode_lengths = [n for kind, n in cols if kind == "decode"]
    bandwidth = floor.read_bandwidth(args.threads) if decode_lengths else 0.0
    cells: Cells = {}
    rows = []
    for s in shapes:
        for f in formats:
            print(f"cell {s} {f} ...", file=sys.stderr, flush=True)
            gguf = quantized(s, f, args.threads)
            cells[s, f] = gguf, run_cell(gguf, args)
            rows.append(ratio_row(s, f, cells[s, f][1], cols))
    head = "| shape | format | " + " | ".join(f"{k} {n}" for k, n in cols) + " |"
    print(f"\n{cpu_line()}\nthreads {args.threads}, {args.rounds} alternating round(s), tok/s as seqshare / "
          f"llama.cpp (best of flash attention off and on)\n")
    print("\n".join([head, "|" + "---|" * (2 + len(cols)), *rows]))
    raw: dict[str, Any] = {f"{s} {f}": cell for (s, f), (_, cell) in cells.items()}
    if decode_lengths:
        raw["read_bandwidth"] = floor_table(cells, decode_lengths, args, bandwidth)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))

if __name__ == "__main__":
    main()
