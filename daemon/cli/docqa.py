"""`seqshare generate BUNDLE --context-file DOC --question Q1 --question Q2 ...`: document QA in this
process. Thin over worker.docqa.DocQA: the document becomes one shared prefix (prefilled once, kept in
an in-process prefix cache) and all questions are decoded together against it; `--no-reuse` answers
each question alone on the full prompt instead (the baseline). Prints the answers, or one JSON object.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import click

CACHE_BUDGET_BYTES = 4 << 30  # one process, one document: the budget only has to hold it


def weight_digest(source: Any, path: Path) -> str:
    """A bundle's own digest; for a GGUF or checkpoint converted in memory, one bound to the file and
    quant (the cache lives in this process only, so it never has to match another process)."""
    digest = getattr(source, "weight_digest", None)
    if digest:
        return str(digest)
    tag = f"unbundled\0{path.resolve()}\0{getattr(source, 'quant', '')}"
    return hashlib.sha256(tag.encode()).hexdigest()


def limits_of(source: Any) -> Any:
    """The bundle's limits; a GGUF or checkpoint gets the defaults for its context length."""
    from seqshare.bundle.format import Limits

    limits = getattr(source, "limits", None)
    return limits if limits is not None else Limits.default(int(source.context_length))


def _progress(n_questions: int) -> Any:
    if not sys.stderr.isatty():
        return None

    def show(done: int, tokens: int) -> None:
        click.echo(f"\r{done}/{n_questions} answered, {tokens} tokens generated", err=True, nl=done == n_questions)

    return show


def answer_document(model: Any, source: Any, path: Path, context: str, questions: list[str], params: Any, *,
                    reuse: bool, system: str | None, raw: bool) -> Any:
    """Answer `questions` about `context` through DocQA; returns its DocAnswer."""
    from seqshare.worker.docqa import DocQA, QuestionRequest
    from seqshare.worker.prefix_cache import PrefixCache

    qa = DocQA(model, PrefixCache(CACHE_BUDGET_BYTES), None, limits_of(source), weight_digest(source, path))
    requests = [QuestionRequest(q, params, f"q{i}") for i, q in enumerate(questions)]
    return qa.answer(context, requests, progress=_progress(len(questions)), reuse=reuse, system=system, raw=raw)


def to_json(doc: Any, questions: list[str], reuse: bool, peak_rss_bytes: int) -> dict[str, Any]:
    """Per question: answer, token counts, first-token latency, prefix cache hit; then totals and counters."""
    answers = [
        {"question": q, "text": a.text, "token_ids": a.token_ids, "context_tokens": a.context_tokens,
         "question_tokens": a.question_tokens, "generated_tokens": a.generated_tokens,
         "first_token_s": round(a.first_token_s, 4), "total_s": round(a.total_s, 4), "cache_hit": a.cache_hit,
         "finish_reason": a.finish_reason}
        for q, a in zip(questions, doc.answers, strict=True)
    ]
    generated = sum(a.generated_tokens for a in doc.answers)
    totals = {
        "questions": len(answers),
        "context_tokens": doc.context_tokens,
        "question_tokens": sum(a.question_tokens for a in doc.answers),
        "generated_tokens": generated,
        "wall_s": round(doc.wall_s, 4),
        "answers_per_minute": round(60 * len(answers) / doc.wall_s, 2) if doc.wall_s > 0 else 0.0,
        "generated_tokens_per_s": round(generated / doc.wall_s, 2) if doc.wall_s > 0 else 0.0,
    }
    prefix = {"reuse": reuse, "status": doc.prefix, "context_hash": doc.context_hash,
              "computed_tokens": doc.prefix_computed_tokens, "seconds": round(doc.prefix_s, 4)}
    return {"answers": answers, "prefix": prefix, "totals": totals, "cache": doc.cache,
            "peak_rss_bytes": peak_rss_bytes}


def to_text(doc: Any, questions: list[str]) -> str:
    return "\n\n".join(f"Q: {q}\nA: {a.text}" for q, a in zip(questions, doc.answers, strict=True))
