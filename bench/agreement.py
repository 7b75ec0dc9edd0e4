"""Accuracy on the file users download: teacher-forced top-1 agreement of seqshare and llama.cpp with
transformers' own GGUF loader reading the same file, and the size of seqshare's bundle against it.

    .venv/bin/python bench/agreement.py [--formats Q4_0,Q8_0,Q4_K_M] [--tokens 1024] [--threads 2]

The default model (Q4_1) is requantized to each format by llama.cpp's own quantizer
(`llama_model_quantize`, cached with bench/matrix.py's files). transformers dequantizes the file to
float32 with `gguf`'s reference code: its logits are the model as the file defines it. seqshare
compiles the file losslessly where the format allows (`quant keep`) and llama.cpp runs it as it is;
each is compared with that reference at every position of one text (the default tokenizer on
bench/engine.py's synthetic document). Nothing here asserts anything; the table goes into
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine import prompt_ids  # noqa: E402
from matrix import cache_dir, llama_quantize  # noqa: E402


def requantized(fmt: str, threads: int) -> Path:
    """The default model requantized to `fmt` by llama.cpp (cached)."""
    from seqshare.daemon.fetch import default_model_path

    out = cache_dir() / f"default.{fmt}.gguf"
    if not out.exists():
        llama_quantize(default_model_path(), out, fmt, threads, requantize=True)
    return out


def reference_logits(gguf: Path, ids: list[int], threads: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def seqshare_logits(gguf: Path, ids: list[int], threads: int) -> tuple[np.ndarray, int]:
    """Logits at every position, and the compiled bundle's size in bytes."""
    from seqshare.bundle.convert import load_checkpoint
    from seqshare.bundle.format import Limits, write_bundle
    from seqshare.bundle.loader import load_bundle
    from seqshare.worker.model import Model

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "model.ssb"
        write_bundle(load_checkpoint(gguf, "keep"), bundle, Limits.default(len(ids) + 64))
        model = Model(load_bundle(bundle), threads=threads, max_batch=1)
        kv = model.new_kv(len(ids))
        out = []
        for s in range(0, len(ids), model.chunk):
            part = np.asarray(ids[s : s + model.chunk], dtype=np.int32)
            out.append(model.forward(part, [(None, kv, part.size)], np.arange(part.size, dtype=np.int32)))
        return np.concatenate(out).astype(np.float64), bundle.stat().st_size


def llama_logits(gguf: Path, ids: list[int], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=len(ids) + 16, n_threads=threads, n_threads_batch=threads, n_batch=512,
                logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean cosine similarity of the logits."""
    top1 = float(np.mean(got.argmax(1) == want.argmax(1)))
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return top1, float(cos.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K_M")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from seqshare.daemon.fetch import default_model_path

    ids = prompt_ids(default_model_path(), args.tokens)
    rows: list[str] = []
    for fmt in args.formats.split(","):
        gguf = requantized(fmt, args.threads)
        want = reference_logits(gguf, ids, args.threads)
        ours, bundle_bytes = seqshare_logits(gguf, ids, args.threads)
        peer = llama_logits(gguf, ids, args.threads)
        (t_ours, c_ours), (t_peer, c_peer) = agreement(ours, want), agreement(peer, want)
        size = gguf.stat().st_size
        rows.append(f"| {fmt} | {size / 2**20:.1f} | {bundle_bytes / 2**20:.1f} ({bundle_bytes / size:.2f}x) | "
                    f"{t_ours:.4f} / {c_ours:.6f} | {t_peer:.4f} / {c_peer:.6f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    report = [
        f"default model requantized by llama.cpp, {len(ids)} tokens teacher-forced; reference: transformers "
        "reading the same GGUF in float32",
        "",
        "| format | file MiB | bundle MiB (x file) | seqshare top-1 / cosine | llama.cpp top-1 / cosine |",
        "|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(report))


if __name__ == "__main__":
    main()
