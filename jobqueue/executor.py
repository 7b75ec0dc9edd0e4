"""The job function: the only callable a seqshare worker executes.

rq stores a job as (function name, args, kwargs). The worker compares the stored name with
JOB_FUNCTION *as a string* before deserializing anything else or importing anything, so a job
naming another callable fails without side effects. The resident worker never calls `job.perform()`:
it decodes the payloads itself and runs jobs that share a context through one engine call
(`run_group`). `answer` exists so rq's tools (and `rq worker`-style runners) see a real, importable
function; outside a seqshare worker it fails with EngineNotReadyError instead of loading a model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from seqshare.jobqueue.payload import JobPayload, parse_payload
from seqshare.worker.errors import (
    EngineNotReadyError,
    InvalidJobError,
    JobNotAllowedError,
    LimitExceededError,
    SeqshareError,
    UnknownModelError,
)

log = logging.getLogger(__name__)

JOB_FUNCTION = "seqshare.jobqueue.executor.answer"
# progress(job_index, questions_done, tokens_generated) while a group runs.
GroupProgress = Callable[[int, int, int], None]


class Engine(Protocol):
    """What the executor needs from worker.docqa.DocQA."""

    def answer(self, context: Any, questions: list[Any], cache_salt: str | None = None,
               progress: Callable[..., Any] | None = None) -> Any: ...

    def answer_many(self, requests: list[Any], progress: Callable[..., Any] | None = None) -> list[Any]: ...

    def prepare(self, request: Any) -> Any: ...


def check_allowed(func_name: object) -> None:
    """Refuse any job whose stored function name is not ours (compared as text, nothing imported)."""
    if func_name != JOB_FUNCTION:
        shown = str(func_name)[:80] if isinstance(func_name, str) else type(func_name).__name__
        raise JobNotAllowedError(f"this worker runs only {JOB_FUNCTION}; the job names {shown!r}")


def decode_job(func_name: object, args: object, kwargs: object) -> JobPayload:
    """The payload of an rq job after the allow-list check; InvalidJobError names what is wrong."""
    check_allowed(func_name)
    if not isinstance(args, list | tuple) or len(args) != 1 or kwargs not in ({}, None):
        raise InvalidJobError(["(job): expected exactly one positional argument, the payload"])
    return parse_payload(args[0])


@dataclass
class Engines:
    """The models a worker loaded, by name; the first is the default for payloads without a model."""

    by_name: Mapping[str, Engine]
    default: str = field(default="")

    def __post_init__(self) -> None:
        if not self.default and self.by_name:
            self.default = next(iter(self.by_name))

    def get(self, model: str | None) -> tuple[str, Engine]:
        name = model or self.default
        engine = self.by_name.get(name)
        if engine is None:
            raise UnknownModelError(f"model {name!r} is not loaded here; loaded: {sorted(self.by_name)}")
        return name, engine


_installed: Engines | None = None


def install(engines: Engines | None) -> None:
    """Called by the resident worker once its bundles are loaded (None on shutdown)."""
    global _installed
    _installed = engines


def answer(payload: dict[str, Any]) -> dict[str, Any]:
    """rq entry point (also usable in-process): answer one payload with the installed engines."""
    if _installed is None:
        raise EngineNotReadyError("seqshare jobs run only inside `seqshare worker`, which loads the model")
    out = run_group(_installed, [parse_payload(payload)])[0]
    if isinstance(out, BaseException):
        raise out
    return out


def _requests(payload: JobPayload) -> list[Any]:
    from seqshare.worker.docqa import QuestionRequest

    return [QuestionRequest(text=q.text, params=payload.params_for(q), custom_id=q.custom_id)
            for q in payload.questions]


def run_group(engines: Engines, payloads: Sequence[JobPayload], worker: str = "",
              progress: GroupProgress | None = None) -> list[dict[str, Any] | SeqshareError]:
    """Answer payloads that share one context (same context key) with one engine call.

    Returns, per payload, its result dict or the named error that failed it. A failure that concerns
    one payload only (unknown model) fails only that one; an engine error fails the group.
    """
    outcomes: list[dict[str, Any] | SeqshareError] = []
    runnable: list[tuple[int, str, Engine, JobPayload]] = []
    for i, p in enumerate(payloads):
        try:
            name, engine = engines.get(p.model)
        except SeqshareError as e:
            outcomes.append(e)
            continue
        outcomes.append({})
        runnable.append((i, name, engine, p))
    if not runnable:
        return outcomes
    name, engine = runnable[0][1], runnable[0][2]
    if any(r[2] is not engine for r in runnable):
        raise ValueError("run_group: payloads of one group must name the same model")
    t0 = time.monotonic()
    docs = _call_engine(engine, [r[3] for r in runnable], progress, [r[0] for r in runnable])
    wall = time.monotonic() - t0
    for (i, _, _, p), doc in zip(runnable, docs, strict=True):
        outcomes[i] = doc if isinstance(doc, SeqshareError) else _result(p, name, doc, worker, len(runnable), wall)
    return outcomes


def _call_engine(engine: Engine, payloads: list[JobPayload], progress: GroupProgress | None,
                 index: list[int]) -> list[Any]:
    def tick_for(j: int) -> Callable[..., None] | None:
        if progress is None:
            return None
        return lambda done, tokens, *_: progress(index[j], int(done), int(tokens))

    if len(payloads) == 1:
        return [_answer_alone(engine, payloads[0], tick_for(0))]
    from seqshare.worker.docqa import DocRequest

    reqs = [DocRequest(context=p.context, questions=_requests(p), cache_salt=p.cache_salt) for p in payloads]
    try:
        return list(engine.answer_many(reqs, progress=_many_progress(progress, index)))
    except SeqshareError:
        # One payload's limit error must not fail its neighbours: answer each alone to attribute it.
        return [_answer_alone(engine, p, tick_for(j)) for j, p in enumerate(payloads)]


def _answer_alone(engine: Engine, p: JobPayload, tick: Callable[..., None] | None) -> Any:
    try:
        return engine.answer(p.context, _requests(p), cache_salt=p.cache_salt, progress=tick)
    except LimitExceededError as e:
        bad = _over_limit(engine, p)
        good = [q for q in p.questions if q.custom_id not in bad]
        if not bad or not good:
            return e  # the context itself is over a limit: the whole job fails
        doc = _answer_alone(engine, p.model_copy(update={"questions": good}), tick)
        if isinstance(doc, SeqshareError):
            return doc
        return _Partial(doc, bad)
    except SeqshareError as e:
        return e


@dataclass
class _Partial:
    """An engine answer for the questions within limits, plus the named errors of the others."""

    doc: Any
    errors: dict[str, SeqshareError]


def _over_limit(engine: Engine, p: JobPayload) -> dict[str, SeqshareError]:
    """Which questions break a limit on their own (tokenizing only, no compute)."""
    from seqshare.worker.docqa import DocRequest

    bad: dict[str, SeqshareError] = {}
    for q, r in zip(p.questions, _requests(p), strict=True):
        try:
            engine.prepare(DocRequest(context=p.context, questions=[r], cache_salt=p.cache_salt))
        except LimitExceededError as e:
            bad[q.custom_id] = e
    return bad


def _many_progress(progress: GroupProgress | None, index: list[int]) -> Callable[..., None] | None:
    if progress is None:
        return None
    return lambda j, done, tokens, *_: progress(index[int(j)], int(done), int(tokens))


def _result(p: JobPayload, model: str, doc: Any, worker: str, batched: int, wall: float) -> dict[str, Any]:
    errors: dict[str, SeqshareError] = {}
    if isinstance(doc, _Partial):
        doc, errors = doc.doc, doc.errors
    by_id = {a.custom_id: a for a in doc.answers}
    answers: list[dict[str, Any]] = []
    for q in p.questions:
        if q.custom_id in errors:
            answers.append({"custom_id": q.custom_id, "error": describe_error(errors[q.custom_id])})
            continue
        a = by_id[q.custom_id]
        answers.append({
            "custom_id": q.custom_id,
            "answer": a.text,
            "finish_reason": a.finish_reason,
            "context_tokens": a.context_tokens,
            "question_tokens": a.question_tokens,
            "generated_tokens": a.generated_tokens,
            "first_token_s": round(float(a.first_token_s), 6),
            "total_s": round(float(a.total_s), 6),
            "cache_hit": bool(a.cache_hit),
        })
    return {
        "model": model,
        "context_hash": doc.context_hash,
        "prefix": doc.prefix,  # hit | restored | partial | miss
        "prefix_computed_tokens": doc.prefix_computed_tokens,
        "prefix_s": round(float(doc.prefix_s), 6),
        "worker": worker,
        "batched_jobs": batched,
        "wall_s": round(wall, 6),
        "answers": answers,
    }


def describe_error(e: BaseException) -> dict[str, str]:
    """The reason recorded on a failed job: the error's name and its operator-facing message."""
    return {"type": type(e).__name__, "message": str(e)}
