"""`seqshare bench`: how fast this box runs a bundle (prefill and decode tok/s, RSS), without peers.

The comparison with llama.cpp and transformers lives in bench/engine.py, which times every engine with
`time_prefill()` and `time_decode()` below, the loop `measure()` uses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import click


class Engine(Protocol):
    def prefill(self, ids: list[int]) -> int: ...  # a fresh cache: the prompt, then the next token (greedy)
    def step(self, tok: int) -> int: ...  # append one token, return the next (greedy)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_kib("VmRSS")


def peak_rss_bytes() -> int:
    """This process image's peak RSS. Not getrusage's ru_maxrss: Linux carries that over fork and exec,
    so a child started by a big parent would report the parent's size."""
    return _status_kib("VmHWM")


def prefill_tries(n: int) -> int:
    """Prefills are short below 2048 tokens: time two and keep the better."""
    return 1 if n > 2048 else 2


def time_prefill(eng: Engine, ids: list[int]) -> float:
    """Seconds to prefill `ids` into a fresh cache."""
    t = time.perf_counter()
    eng.prefill(ids)
    return time.perf_counter() - t


def time_decode(eng: Engine, ids: list[int], steps: int) -> float:
    """Seconds for `steps` greedy tokens after a prompt of `ids` (the prefill is not timed)."""
    tok = eng.prefill(ids)
    t = time.perf_counter()
    for _ in range(steps):
        tok = eng.step(tok)
    return time.perf_counter() - t


def measure(eng: Engine, ids: list[int], lengths: list[int], after: list[int], steps: int) -> dict[str, Any]:
    """Prefill tok/s of each length (best of two below 2048 tokens), decode tok/s of `steps` greedy
    tokens after a prompt of each `after` length, peak RSS."""
    out: dict[str, Any] = {"prefill": {}, "decode": {}}
    eng.prefill(ids[:64])  # warm-up: threads, allocators, first touch of the weights
    for n in lengths:
        out["prefill"][n] = n / min(time_prefill(eng, ids[:n]) for _ in range(prefill_tries(n)))
    for n in after:
        out["decode"][n] = steps / time_decode(eng, ids[:n], steps)
    out["peak_rss"] = peak_rss_bytes()
    return out


class SeqshareEngine:
    """The engine as the worker runs it, one sequence at a time."""

    def __init__(self, source: Any, threads: int, room: int, kv_pair_tiles: bool = True):
        from seqshare.worker.model import Model

        self.model = Model(source, threads=threads, max_batch=1, kv_pair_tiles=kv_pair_tiles)
        self.room = room  # KV rows past the prompt
        self.kv: Any = None

    def prefill(self, ids: list[int]) -> int:
        self.kv = None  # free the previous prompt's cache before allocating the next
        self.kv = self.model.new_kv(len(ids) + self.room)
        logits = self.model.prefill(ids, self.kv)
        assert logits is not None
        return int(logits.argmax())

    def step(self, tok: int) -> int:
        return int(self.model.decode([tok], [(None, self.kv)])[0].argmax())


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated token counts, got {text!r}") from e


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--lengths", default="512,2048", show_default=True, help="Prompt lengths to prefill.")
@click.option("--decode-after", default="512", show_default=True, help="Prompt lengths to decode after.")
@click.option("--steps", type=click.IntRange(1, 1024), default=64, show_default=True, help="Decode steps.")
@click.option("--threads", type=click.IntRange(0), default=0, help="Compute threads (0 = all cores).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), help="Key of an encrypted bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(bundle: Path, lengths: str, decode_after: str, steps: int, threads: int, key_file: Path | None,
          as_json: bool) -> None:
    """Time BUNDLE on this machine: prefill and greedy decode tok/s, RSS. The prompts are seeded
    random token ids (speed does not depend on the text). Peers: see bench/engine.py."""
    import numpy as np

    from seqshare.daemon.cli.generate import _fail, open_source

    ls, after = _ints(lengths), _ints(decode_after)
    try:
        t0 = time.perf_counter()
        source = open_source(bundle, key_file)
        eng = SeqshareEngine(source, threads, steps + 1)
        load_s = time.perf_counter() - t0
    except Exception as e:
        raise _fail(e) from e
    limit = eng.model.seq_length - steps - 1
    too_long = [n for n in ls + after if n > limit]
    if too_long:
        raise click.BadParameter(f"{too_long} exceed the bundle's seq_length minus the steps ({limit})")
    vocab = eng.model.spec.vocab_size
    ids = np.random.default_rng(0).integers(100, vocab, max(ls + after + [64])).tolist()
    res = {"load_s": load_s, "rss_after_load": rss_bytes(), **measure(eng, ids, ls, after, steps)}
    if as_json:
        click.echo(json.dumps(res))
        return
    from seqshare import _native

    click.echo(f"{bundle.name}: {_native.get_threads()} threads, {_native.active_isa()} kernels, load {load_s:.2f} s")
    for n, v in res["prefill"].items():
        click.echo(f"  prefill {n:>6} tokens  {v:8.1f} tok/s")
    for n, v in res["decode"].items():
        click.echo(f"  decode after {n:>6}  {v:8.1f} tok/s")
    click.echo(f"  RSS after load {res['rss_after_load'] / 2**20:.0f} MiB, peak {res['peak_rss'] / 2**20:.0f} MiB")
