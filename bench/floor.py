"""The memory-bandwidth floor of decode: the fastest a step can go if it only had to read its bytes.

A decode step reads every weight the forward pass multiplies by (with tied embeddings that includes
the whole token table, as the output head) and the KV cache so far. Those bytes divided by the
machine's plain read bandwidth give the floor's seconds per token; an engine's tok/s over the
floor's tok/s is how close it runs to memory speed (issue 12 asks for 60% at Qwen2.5-0.5B and 1.5B).

The weights counted are the GGUF file's tensors as stored, so the floor is the model's, the same for
every engine: an engine whose runtime format is larger than the file pays for it in its percentage.
The KV cache is counted at f16, which both engines here keep.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

KV_BYTES = 2  # f16 keys and values


def read_bandwidth(threads: int, nbytes: int = 1 << 30, passes: int = 5) -> float:
    """Bytes per second that `threads` threads read from memory, the best of `passes`.

    Each thread takes the maximum of its own slice of a buffer far larger than the caches. numpy
    releases the GIL inside the reduction, and its byte-wise max keeps up with memory where its sums
    do not (on a Zen 3, one thread: max 19.8 GB/s like a plain AVX2 load loop, a float32 sum 13.3).
    Large numpy arrays sit on transparent huge pages where the kernel allows them, as the engines'
    weights can."""
    buf = np.ones(nbytes, np.uint8)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.maximum.reduce, parts))  # first touch and thread start-up, not timed
        for _ in range(passes):
            t0 = time.perf_counter()
            list(pool.map(np.maximum.reduce, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def streamed_weight_bytes(gguf: Path) -> int:
    """The bytes of the GGUF's tensors one decode step reads: all of them, except that an untied
    token table (one with a separate `output.weight`) is read one row at a time, not whole."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(gguf).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def kv_bytes(layers: int, kv_heads: int, head_dim: int, ctx: int) -> int:
    """Keys and values of `ctx` positions across all layers."""
    return 2 * layers * kv_heads * head_dim * ctx * KV_BYTES


def floor_tok_s(weight_bytes: int, kv: int, bandwidth: float) -> float:
    return bandwidth / (weight_bytes + kv)
