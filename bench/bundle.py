"""Bundle benchmarks: compile time and peak memory per quant, encrypt and decrypt throughput.

    .venv/bin/python bench/bundle.py [--gguf PATH] [--quants keep,int4] [--mib 1024]

Compiles run in a child process each, so peak RSS (and its anonymous part) is that compile's own.
Throughput is measured on a synthetic plain bundle of --mib MiB (random weights, so nothing
compresses), best of three runs, page cache warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
from seqshare.bundle.format import Limits, write_bundle
from seqshare.daemon.cli.bench import peak_rss_bytes
from seqshare.bundle.convert import load_checkpoint
src, out, quant = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
ck = load_checkpoint(src, quant)
peak_anon = 0
def watch(_name, _nb):
    global peak_anon
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
h = write_bundle(ck, out, Limits.default(ck.context_length), on_tensor=watch)
print(json.dumps({"seconds": time.perf_counter() - t, "weight_bytes": h["weight_bytes"],
                  "peak_rss": peak_rss_bytes(),
                  "peak_anon_after_tensor": peak_anon}))
"""


def bench_compile(src: Path, quant: str, tmp: Path) -> dict:
    out = tmp / f"{quant}.ssb"
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(out), quant], check=True, capture_output=True, text=True
    )
    r = json.loads(res.stdout.strip().splitlines()[-1])
    out.unlink()
    return r


def synthetic_bundle(path: Path, mib: int) -> None:
    """A valid plain bundle with one random q8 tensor of about `mib` MiB."""
    import numpy as np

    from seqshare.bundle.convert import Checkpoint, SpecialTokens, plan_tensor
    from seqshare.bundle.format import Limits, write_bundle
    from seqshare.bundle.quant import QTensor
    from seqshare.bundle.spec import ModelSpec

    cols = 4096
    rows = mib * (1 << 20) // cols
    spec = ModelSpec("llama", rows, cols, cols, 0, 32, 8, 128, 1e4, 1e-5, 4096, True)
    plan = [plan_tensor("tok_embeddings", (rows, cols), "q8", 32), plan_tensor("norm", (cols,), "f32", 0)]
    rng = np.random.default_rng(0)

    def produce(p):
        if p.name == "norm":
            return QTensor("f32", p.shape, 0, {"data": np.ones(cols, np.float32)})
        qs = rng.integers(-127, 128, size=(rows, cols), dtype=np.int8)
        return QTensor("q8", p.shape, 32, {"qs": qs, "scales": np.ones((rows, cols // 32), np.float16)})

    ck = Checkpoint(spec, "{}", None, SpecialTokens(None, ()), 4096, "int8", 32, path, plan, produce)
    write_bundle(ck, path, Limits(1024, 256, 4096))


def bench_crypto(tmp: Path, mib: int) -> dict:
    from seqshare.bundle import crypto

    plain, enc = tmp / "synthetic.ssb", tmp / "synthetic.enc"
    synthetic_bundle(plain, mib)
    size = plain.stat().st_size
    key = os.urandom(32)
    enc_s, dec_s = [], []
    for _ in range(3):
        t = time.perf_counter()
        crypto.encrypt_file(plain, enc, key)
        enc_s.append(time.perf_counter() - t)
        ef = crypto.open_encrypted(enc)
        t = time.perf_counter()
        buf = crypto.decrypt_to_memory(ef, key)
        dec_s.append(time.perf_counter() - t)
        buf.close()
    return {
        "bytes": size,
        "encrypt_GBps": size / min(enc_s) / 1e9,
        "decrypt_to_memory_GBps": size / min(dec_s) / 1e9,
    }


def main() -> None:
    from seqshare.daemon.fetch import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=default_model_path())
    ap.add_argument("--quants", default="keep,f16,int8,int4")
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="seqshare-bench-") as d:
        tmp = Path(d)
        for q in args.quants.split(","):
            r = bench_compile(args.gguf, q, tmp)
            print(
                f"compile {q:5s}: {r['seconds']:6.2f} s, weights {r['weight_bytes'] / 2**20:7.1f} MiB, "
                f"peak RSS {r['peak_rss'] / 2**20:7.1f} MiB "
                f"(anon after a tensor {r['peak_anon_after_tensor'] / 2**20:.1f} MiB)"
            )
        c = bench_crypto(tmp, args.mib)
        print(
            f"crypto on {c['bytes'] / 2**20:.0f} MiB: encrypt {c['encrypt_GBps']:.2f} GB/s (to disk), "
            f"decrypt {c['decrypt_to_memory_GBps']:.2f} GB/s (into memory)"
        )


if __name__ == "__main__":
    main()
