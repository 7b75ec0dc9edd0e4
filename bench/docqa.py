"""Document-QA benchmark: one long document, many questions, seqshare vs llama.cpp at its best.

    .venv/bin/python bench/docqa.py [--gguf PATH] [--threads 2] [--doc-tokens 6000] [--questions 16]
                                    [--new-tokens 48] [--no-reuse-questions 4] [--no-llama]

Workload: a synthetic gazetteer of about --doc-tokens tokens (bench/textgen.py, nothing downloaded),
--questions questions of 20-40 tokens, --new-tokens new tokens each, greedy, the default model (Q4_1,
imported losslessly), the same chat split and token ids for every engine. Scenarios, in one run:

  seqshare cold     the prefix is not cached: prefill the document once, all questions in one batch
  seqshare warm     the prefix is cached in memory (the same request again)
  seqshare restore  the prefix was evicted to the spill directory and is restored from disk
  seqshare no-reuse each question alone on the full prompt (measured on --no-reuse-questions of them;
                    each costs the same, so the total is scaled to all questions and marked so)
  llama.cpp         document prefilled once, its state saved, restored per question, questions one
                    after another (flash attention on and off, the better run counts)

Reported: wall time, answers per minute, first-token latency per question; ratios against llama.cpp
and no-reuse; first token on a cache hit against prefilling the question alone; restore against
recompute. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine import machine, versions  # noqa: E402
from textgen import gazetteer  # noqa: E402


def make_workload(tokenizer: Any, doc_tokens: int, n_questions: int) -> tuple[str, list[str]]:
    """A document of about doc_tokens tokens and n_questions questions about towns in it."""
    towns = max(n_questions, doc_tokens // 110)
    text, questions = gazetteer(7, towns)
    while len(tokenizer.encode(text).ids) > doc_tokens and towns > n_questions:
        towns -= 1
        text, questions = gazetteer(7, towns)
    step = max(1, len(questions) // n_questions)
    return text, questions[::step][:n_questions]


# ---- seqshare ---------------------------------------------------------------------------------
def run_seqshare(args: argparse.Namespace) -> dict[str, Any]:
    from seqshare.bundle.convert import load_checkpoint
    from seqshare.bundle.format import Limits
    from seqshare.worker.docqa import DocQA, QuestionRequest
    from seqshare.worker.generate import generate
    from seqshare.worker.model import Model
    from seqshare.worker.params import SamplingParams
    from seqshare.worker.prefix_cache import PrefixCache
    from seqshare.worker.spill import Spill

    ck = load_checkpoint(args.gguf, "keep")
    model = Model(ck, threads=args.threads, max_batch=max(32, args.questions))
    text, questions = make_workload(model.tokenizer, args.doc_tokens, args.questions)
    params = SamplingParams(mode="greedy", max_new_tokens=args.new_tokens)
    reqs = [QuestionRequest(q, params, f"q{i}") for i, q in enumerate(questions)]
    limits = Limits(share_length=args.doc_tokens + 512, unshare_length=128, seq_length=args.doc_tokens + 1024)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spill = Spill(Path(tmp), 1 << 32)
        qa = DocQA(model, PrefixCache(1 << 32), spill, limits, "bench")
        prompt, _ = qa.prepare(qa_request(text, reqs))
        out["doc_tokens"] = len(prompt.context_ids)
        out["question_tokens"] = [len(q) for q in prompt.question_ids]
        for name in ("cold", "warm"):
            out[name] = summarize(qa.answer(text, reqs))
        # One question on the cached prefix: its first-token latency against the time its own tokens
        # take to prefill over that prefix (what a hit cannot avoid) and over nothing (the question alone).
        out["one_ttft_s"] = qa.answer(text, reqs[:1]).answers[0].first_token_s
        _, key = qa.prepare(qa_request(text, reqs[:1]))
        entry = qa.cache.acquire(key)
        assert entry is not None
        q0 = prompt.question_ids[0]
        own = model.new_kv(len(q0) + 1, start=entry.value.kv.length)
        t = time.perf_counter()
        model.prefill(q0, own, prefix=entry.value.kv)
        out["one_prefill_over_prefix_s"] = time.perf_counter() - t
        qa.cache.release(entry)
        qa.close()  # a clean shutdown: every unreferenced prefix goes to the spill directory
        out["restore"] = summarize(qa.answer(text, reqs))
        few = reqs[: args.no_reuse_questions]
        r = qa.answer(text, few, reuse=False)
        out["no_reuse"] = summarize(r, scale=len(reqs) / len(few))
        # The question alone (no document), as a plain prompt: the yardstick of first-token latency.
        alone = [generate(model, q.tolist(), SamplingParams(mode="greedy", max_new_tokens=1)).prefill_seconds
                 for q in prompt.question_ids]
        out["question_alone_prefill_s"] = statistics.median(alone)
    return out


def qa_request(text: str, reqs: list[Any]) -> Any:
    from seqshare.worker.docqa import DocRequest

    return DocRequest(text, reqs)


def summarize(doc: Any, scale: float = 1.0) -> dict[str, Any]:
    ttft = [a.first_token_s for a in doc.answers]
    return {"wall_s": doc.wall_s * scale, "scaled": scale != 1.0, "answers": len(doc.answers),
            "prefix": doc.prefix, "prefix_s": doc.prefix_s, "ttft": ttft,
            "generated": sum(a.generated_tokens for a in doc.answers),
            "texts": [a.text for a in doc.answers]}


# ---- llama.cpp (child process) ----------------------------------------------------------------
_LLAMA = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
llm = Llama(cfg["gguf"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
            n_batch=512, n_ubatch=512, flash_attn=cfg["fa"], verbose=False)
eos = llm.token_eos()
def argmax():  # without logits_all, llama-cpp-python keeps no scores: read the last row
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
t0 = time.perf_counter()
llm.eval(cfg["context"])
state = llm.save_state()
t_doc = time.perf_counter() - t0
ttft, texts, generated = [], [], 0
for q in cfg["questions"]:
    t = time.perf_counter()
    llm.load_state(state)
    llm.eval(q)
    tok = argmax()
    ttft.append(time.perf_counter() - t)
    out = []
    while tok != eos and len(out) < cfg["new_tokens"]:
        out.append(tok)
        if len(out) == cfg["new_tokens"]:
            break
        llm.eval([tok])
        tok = argmax()
    generated += len(out)
    texts.append(llm.detokenize(out).decode("utf-8", "replace"))
print(json.dumps({"wall_s": time.perf_counter() - t0, "doc_prefill_s": t_doc, "ttft": ttft,
                  "generated": generated, "texts": texts}))
"""


def run_llama(args: argparse.Namespace, context: list[int], questions: list[list[int]]) -> dict[str, Any] | None:
    best = None
    for fa in (False, True):
        cfg = {"gguf": str(args.gguf), "threads": args.threads, "fa": fa, "new_tokens": args.new_tokens,
               "n_ctx": len(context) + max(len(q) for q in questions) + args.new_tokens + 16,
               "context": context, "questions": questions}
        res = subprocess.run([sys.executable, "-c", _LLAMA], input=json.dumps(cfg), capture_output=True, text=True)
        if res.returncode != 0:
            print(f"llama.cpp (flash_attn={fa}) failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["flash_attn"] = fa
        if best is None or r["wall_s"] < best["wall_s"]:
            best = r
    return best


def token_ids(args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    """The exact context and question ids seqshare uses (chat split), for llama.cpp."""
    from seqshare.bundle.convert import load_checkpoint
    from seqshare.bundle.format import Limits
    from seqshare.worker.docqa import DocQA, QuestionRequest
    from seqshare.worker.model import Model
    from seqshare.worker.prefix_cache import PrefixCache

    model = Model(load_checkpoint(args.gguf, "keep"), threads=args.threads)
    text, questions = make_workload(model.tokenizer, args.doc_tokens, args.questions)
    limits = Limits(share_length=args.doc_tokens + 512, unshare_length=128, seq_length=args.doc_tokens + 1024)
    qa = DocQA(model, PrefixCache(1 << 30), None, limits, "bench")
    prompt, _ = qa.prepare(qa_request(text, [QuestionRequest(q) for q in questions]))
    return prompt.context_ids.tolist(), [q.tolist() for q in prompt.question_ids]


# ---- report ------------------------------------------------------------------------------------
def report(ours: dict[str, Any], llama: dict[str, Any] | None, args: argparse.Namespace) -> str:
    rows = [("seqshare cold", ours["cold"]), ("seqshare warm", ours["warm"]), ("seqshare restore", ours["restore"]),
            ("seqshare no-reuse" + (" (scaled)" if ours["no_reuse"]["scaled"] else ""), ours["no_reuse"])]
    if llama:
        rows.append((f"llama.cpp (flash_attn={llama['flash_attn']})", llama))
    n = args.questions
    lines = ["| scenario | wall s | answers/min | first token mean s | p50 s | max s | vs llama.cpp | vs no-reuse |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        t = r["ttft"]
        vs_l = f"{llama['wall_s'] / r['wall_s']:.2f}x" if llama else "-"
        vs_n = f"{ours['no_reuse']['wall_s'] / r['wall_s']:.2f}x"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {60 * n / r['wall_s']:.1f} | {statistics.mean(t):.3f} | "
                     f"{statistics.median(t):.3f} | {max(t):.3f} | {vs_l} | {vs_n} |")
    one, alone, over = ours["one_ttft_s"], ours["question_alone_prefill_s"], ours["one_prefill_over_prefix_s"]
    lines += ["", f"document: {ours['doc_tokens']} tokens; questions: {min(ours['question_tokens'])}-"
              f"{max(ours['question_tokens'])} tokens; {args.new_tokens} new tokens each, greedy",
              "first token of one question on a cache hit: "
              f"{one:.3f} s = {one / over:.2f}x its own prefill over the cached prefix ({over:.3f} s), "
              f"{one / alone:.2f}x the question alone without the document ({alone:.3f} s)",
              "(in the batched scenarios all questions are prefilled together first: their first tokens "
              "arrive together)",
              f"prefix restored from the spill directory in {ours['restore']['prefix_s']:.3f} s vs computed in "
              f"{ours['cold']['prefix_s']:.3f} s: {ours['cold']['prefix_s'] / ours['restore']['prefix_s']:.1f}x faster"]
    if llama:
        same = sum(a == b for a, b in zip(ours["warm"]["texts"], llama["texts"], strict=False))
        lines.append(f"llama.cpp: document prefill {llama['doc_prefill_s']:.1f} s once; "
                     f"answers identical to seqshare's: {same} of {n}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--doc-tokens", type=int, default=6000)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--no-reuse-questions", type=int, default=4)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    from seqshare.daemon.fetch import default_model_path

    args.gguf = args.gguf or default_model_path()
    ours = run_seqshare(args)
    llama = None if args.no_llama else run_llama(args, *token_ids(args))
    print(f"\nmachine: {machine()}\nversions: {versions()}\nthreads: {args.threads}\n")
    print(report(ours, llama, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"seqshare": ours, "llama.cpp": llama}, indent=1))


if __name__ == "__main__":
    main()
