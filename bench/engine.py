"""Engine benchmark: seqshare vs llama.cpp (llama-cpp-python) vs transformers f32, same machine, same run.

    .venv/bin/python bench/engine.py [--gguf PATH] [--threads 2] [--lengths 512,2048,6000]
                                     [--decode-after 512,6000] [--steps 64] [--peers llama,transformers]

Every engine runs in a child process of its own, so its peak RSS is its own. All of them get the same
token ids (the default model's tokenizer on a fixed synthetic text) and run greedy. Figures:
prefill tok/s at each length (an empty cache, the whole prompt), decode tok/s for `--steps` tokens
after a prompt of each `--decode-after` length, RSS after load and peak RSS. llama.cpp runs with flash
attention off and on and each figure takes its better run ("each peer's best setting"). seqshare runs
the default GGUF imported losslessly (quant keep) from a compiled, memory-mapped bundle.

The engines stay loaded side by side (each idle while another runs) and take turns figure by figure,
so the ones compared were timed seconds apart: a shared machine's speed drifts over minutes.
Nothing here asserts a time; the table goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seqshare.daemon.cli.bench import (
    SeqshareEngine,
    peak_rss_bytes,
    prefill_tries,
    rss_bytes,
    time_decode,
    time_prefill,
)

HERE = Path(__file__).resolve().parent
STEP_ROOM = 128  # KV rows past the prompt: room for the decode steps (>= --steps)


def prompt_lengths(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The prefill lengths and the prompt lengths decode runs after."""
    return ([int(x) for x in args.lengths.split(",") if x], [int(x) for x in args.decode_after.split(",") if x])


def longest_prompt(args: argparse.Namespace) -> int:
    lengths, after = prompt_lengths(args)
    return max(lengths + after)


def prompt_ids(gguf: Path, n: int) -> list[int]:
    """`n` token ids of a fixed synthetic English text (same for every engine)."""
    from seqshare.bundle.convert import load_checkpoint

    sys.path.insert(0, str(HERE))
    from textgen import document
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(load_checkpoint(gguf, "keep").tokenizer_json)
    ids: list[int] = []
    seed = 0
    while len(ids) < n:
        ids += tok.encode(document(seed, 2000), add_special_tokens=False).ids
        seed += 1
    return ids[:n]


# ---- the engines, one per child process -------------------------------------------------------
class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, n_ctx: int, flash_attn: bool):
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         n_ubatch=512, flash_attn=flash_attn, verbose=False)

    def _argmax(self) -> int:
        import numpy as np

        # Without logits_all, llama-cpp-python keeps no scores: read the last row from the context.
        row = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(row))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()

    def step(self, tok: int) -> int:
        self.llm.eval([tok])
        return self._argmax()


class Transformers:
    def __init__(self, gguf: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True).eval()
        self.past: Any = None

    def _run(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), past_key_values=self.past, use_cache=True,
                             logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids: list[int]) -> int:
        self.past = None
        return self._run(ids)

    def step(self, tok: int) -> int:
        return self._run([tok])


def child(args: argparse.Namespace) -> None:
    """Load one engine, then time what the parent asks, one JSON line per request on stdin and reply
    on stdout: {"op": "prefill", "n": N} or {"op": "decode", "n": N} -> {"s": seconds}; {"op": "done"} ->
    {"peak_rss": bytes}."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    ids = json.loads(Path(args.ids).read_text())
    t0 = time.perf_counter()
    if args.child == "seqshare":
        from seqshare.bundle.loader import load_bundle

        eng: Any = SeqshareEngine(load_bundle(Path(args.bundle)), args.threads, STEP_ROOM)
    elif args.child.startswith("llama"):
        n_ctx = longest_prompt(args) + STEP_ROOM
        eng = LlamaCpp(Path(args.gguf), args.threads, n_ctx, args.child == "llama-fa")
    else:
        eng = Transformers(Path(args.gguf), args.threads)
    answer: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_after_load": rss_bytes()}
    eng.prefill(ids[:64])  # warm-up: threads, allocators, first touch of the weights
    while answer:
        print(json.dumps(answer), file=reply, flush=True)
        req = json.loads(sys.stdin.readline() or '{"op": "done"}')
        if req["op"] == "prefill":
            answer = {"s": time_prefill(eng, ids[:req["n"]])}
        elif req["op"] == "decode":
            answer = {"s": time_decode(eng, ids[:req["n"]], args.steps)}
        else:
            print(json.dumps({"peak_rss": peak_rss_bytes()}), file=reply, flush=True)
            answer = {}


class Served:
    """One engine loaded in its child process, timing one figure per request."""

    def __init__(self, name: str, args: argparse.Namespace, ids_file: Path, bundle: Path, log: Path):
        cmd = [sys.executable, __file__, "--child", name, "--ids", str(ids_file), "--bundle", str(bundle),
               "--gguf", str(args.gguf), "--threads", str(args.threads), "--lengths", args.lengths,
               "--decode-after", args.decode_after, "--steps", str(args.steps)]
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        self.name, self.log = name, log
        with log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            amx_cpu = " amx_int8" in Path("/proc/cpuinfo").read_text()
            if rc == -signal.SIGSEGV and self.name.startswith("llama") and amx_cpu:
                why += (" (llama-cpp-python built by gcc 12 crashes in its AMX matmul on this CPU; "
                        "BENCHMARKS.md's Intel section shows the builds that run)")
            raise RuntimeError(f"{self.name} failed, {why}:\n{self.log.read_text()[-2000:]}")
        return dict(json.loads(line))

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _reply reports why
        return self._reply()

    def close(self) -> dict[str, Any]:
        out = self.ask(op="done")
        self.proc.wait()
        return out


# ---- the parent: run the children, print the table ---------------------------------------------
def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    from seqshare import _native

    return f"{cpu}, {os.cpu_count()} cores, seqshare ISA {_native.best_isa()}, Python {platform.python_version()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("seqshare", "llama-cpp-python", "torch", "transformers"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def run_engines(names: list[str], args: argparse.Namespace, ids_file: Path, bundle: Path,
                rounds: int) -> dict[str, dict[str, Any] | None]:
    """Load every engine of `names` side by side, then time each figure engine after engine, round
    after round; each figure keeps its best. An engine that fails is reported and left out (None)."""
    lengths, after = prompt_lengths(args)
    live: dict[str, Served] = {}
    figs: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            live[name] = Served(name, args, ids_file, bundle, ids_file.with_name(f"{name}.log"))
            figs[name] = {"prefill": {}, "decode": {}, **live[name].info}
        except RuntimeError as e:
            print(e, file=sys.stderr)

    def turn(kind: str, n: int, count: int) -> None:
        for name in list(live):
            try:
                rate = count / live[name].ask(op=kind, n=n)["s"]
            except RuntimeError as e:
                print(e, file=sys.stderr)
                del live[name], figs[name]
                continue
            best = figs[name][kind]
            best[n] = max(best.get(n, 0.0), rate)

    for r in range(rounds):
        print(f"round {r + 1} of {rounds}: {', '.join(live)}", file=sys.stderr, flush=True)
        for n in lengths:
            for _ in range(prefill_tries(n)):
                turn("prefill", n, n)
        for n in after:
            turn("decode", n, args.steps)
    for name, served in live.items():
        figs[name].update(served.close())
    return {name: figs.get(name) for name in names}


def best_of(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per figure, the better of two runs (llama.cpp with flash attention off and on; repeated rounds)."""
    if a is None or b is None:
        return a or b
    out = dict(a)
    out["prefill"] = {k: max(a["prefill"][k], b["prefill"][k]) for k in a["prefill"]}
    out["decode"] = {k: max(a["decode"][k], b["decode"][k]) for k in a["decode"]}
    out["rss_after_load"] = min(a["rss_after_load"], b["rss_after_load"])
    out["peak_rss"] = min(a["peak_rss"], b["peak_rss"])
    return out


def table(res: dict[str, dict[str, Any] | None]) -> str:
    names = [n for n in ("seqshare", "llama.cpp", "transformers") if res.get(n)]
    ours = res["seqshare"]
    assert ours is not None
    peers = [n for n in names if n != "seqshare"]
    head = "| figure | " + " | ".join(names) + " | " + " | ".join(f"seqshare / {p}" for p in peers) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(peers))]

    def row(label: str, get: Any, fmt: str, higher_better: bool = True) -> None:
        vals = {n: get(res[n]) for n in names}
        ratios = [vals["seqshare"] / vals[p] if higher_better else vals[p] / vals["seqshare"] for p in peers]
        lines.append(f"| {label} | " + " | ".join(fmt.format(vals[n]) for n in names) + " | "
                     + " | ".join(f"{r:.2f}x" for r in ratios) + " |")

    for n in ours["prefill"]:
        row(f"prefill {n} tok/s", lambda r, n=n: r["prefill"][n], "{:.0f}")
    for n in ours["decode"]:
        row(f"decode after {n} tok/s", lambda r, n=n: r["decode"][n], "{:.1f}")
    row("RSS after load MiB", lambda r: r["rss_after_load"] / 2**20, "{:.0f}", higher_better=False)
    row("peak RSS MiB", lambda r: r["peak_rss"] / 2**20, "{:.0f}", higher_better=False)
    return "\n".join(lines) + "\n\nRSS ratios are peer / seqshare (above 1 = seqshare uses less)."


def parent(args: argparse.Namespace) -> None:
    from seqshare.bundle.convert import load_checkpoint
    from seqshare.bundle.format import Limits, write_bundle
    from seqshare.daemon.fetch import default_model_path

    args.gguf = args.gguf or default_model_path()
    n_max = longest_prompt(args)
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, bundle = Path(tmp) / "ids.json", Path(tmp) / "model.ssb"
        ids_file.write_text(json.dumps(prompt_ids(args.gguf, n_max)))
        ck = load_checkpoint(args.gguf, "keep")
        write_bundle(ck, bundle, Limits.default(max(ck.context_length, n_max + args.steps + 64)))
        del ck
        # The engines take turns figure by figure and each figure keeps its best round: a shared
        # machine's speed drifts over minutes, and this keeps the drift from favouring any engine.
        names = ["seqshare"] + (["llama", "llama-fa"] if "llama" in args.peers else [])
        runs = run_engines(names, args, ids_file, bundle, args.rounds)
        res: dict[str, dict[str, Any] | None] = {
            "seqshare": runs["seqshare"], "llama.cpp": best_of(runs.get("llama"), runs.get("llama-fa")),
            "transformers": None}
        if "transformers" in args.peers:  # far behind; one round, after the others are unloaded
            res["transformers"] = run_engines(["transformers"], args, ids_file, bundle, 1)["transformers"]
    print(f"\nmachine: {machine()}\nversions: {versions()}\nthreads: {args.threads}, greedy, "
          f"{args.steps} decode steps, best of {args.rounds} alternating rounds, model {Path(args.gguf).name}\n")
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="512,2048,6000")
    ap.add_argument("--decode-after", default="512,6000")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--peers", default="llama,transformers")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each figure keeps its best")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps >= STEP_ROOM:
        ap.error(f"--steps must be below {STEP_ROOM}")
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
