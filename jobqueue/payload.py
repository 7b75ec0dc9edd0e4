"""The job payload: what a producer puts on the queue and the worker answers.

One pydantic model, serialized as JSON (rq's JSONSerializer; never pickle). A payload is one context
(a document as text, or chat messages whose last user turn ends with the document) plus questions
about it. Every violation is reported per field by its location and pydantic's message only, so an
error never echoes the (possibly confidential) payload back into logs or results.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seqshare.worker.errors import InvalidJobError
from seqshare.worker.params import SamplingParams

PAYLOAD_VERSION: Literal[1] = 1
MAX_CONTEXT_CHARS = 8 << 20  # far above any share_length; a guard against runaway producers
MAX_QUESTION_CHARS = 64 << 10
MAX_QUESTIONS = 1024
Priority = Literal["low", "normal", "high"]
_NAME = r"^[A-Za-z0-9._:-]+$"
_ID = r"^[\x21-\x7e]+$"  # printable ASCII without spaces: safe in logs, file names and JSON keys


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTEXT_CHARS)


class Question(_Strict):
    custom_id: str = Field(min_length=1, max_length=256, pattern=_ID)
    text: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    # Per-question override of the job's parameters (a batch line may carry its own).
    params: SamplingParams | None = None


class JobPayload(_Strict):
    """One context, its questions, and how to answer them."""

    version: Literal[1] = PAYLOAD_VERSION
    model: str | None = Field(None, min_length=1, max_length=128, pattern=_NAME,
                              description="None = the worker's first model")
    context: str | list[ChatMessage] = Field(description="document text, or chat messages ending in it")
    questions: list[Question] = Field(min_length=1, max_length=MAX_QUESTIONS)
    params: SamplingParams = Field(default_factory=SamplingParams)
    cache_salt: str | None = Field(None, min_length=1, max_length=256,
                                   description="tenant salt: contexts with different salts never share KV")
    priority: Priority = "normal"

    @model_validator(mode="after")
    def _check(self) -> JobPayload:
        if isinstance(self.context, str):
            if len(self.context) > MAX_CONTEXT_CHARS:
                raise ValueError(f"context: longer than {MAX_CONTEXT_CHARS} characters")
        else:
            if not self.context:
                raise ValueError("context: an empty message list has no document")
            if sum(len(m.content) for m in self.context) > MAX_CONTEXT_CHARS:
                raise ValueError(f"context: messages longer than {MAX_CONTEXT_CHARS} characters in total")
            if self.context[-1].role != "user":
                raise ValueError("context: the last message must be the user turn holding the document")
        first: dict[str, int] = {}
        for i, q in enumerate(self.questions):
            if q.custom_id in first:
                raise ValueError(f"questions[{i}].custom_id: repeats questions[{first[q.custom_id]}].custom_id")
            first[q.custom_id] = i
        return self

    def params_for(self, question: Question) -> SamplingParams:
        return question.params or self.params

    def context_key(self) -> str:
        """Routing key: equal for payloads that must share one prefix on one model (and salt).

        Producers compute it without a tokenizer; the worker maps it to the engine's context hash.
        """
        ctx: Any = self.context if isinstance(self.context, str) else [m.model_dump() for m in self.context]
        blob = json.dumps([self.model or "", ctx, self.cache_salt], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True)


def _loc(loc: tuple[int | str, ...]) -> str:
    # Field names of extra keys come from the payload: shorten them so nothing long leaks.
    parts = [f"[{p}]" if isinstance(p, int) else str(p)[:64] for p in loc]
    return ".".join(parts).replace(".[", "[") or "(payload)"


def violations(err: ValidationError) -> list[str]:
    """`loc: message` for each violation; pydantic's `input` and `ctx` (which echo data) are dropped."""
    out = []
    for e in err.errors(include_input=False, include_url=False):
        msg = e["msg"]
        if e["type"] in ("value_error", "assertion_error"):
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        # model-level checks already start their message with the field they concern
        out.append(msg if not e["loc"] and e["type"] == "value_error" else f"{_loc(tuple(e['loc']))}: {msg}")
    return out


def parse_payload(data: Any) -> JobPayload:
    """Validate a decoded payload (a dict, or JSON text/bytes); raise InvalidJobError per field."""
    try:
        if isinstance(data, str | bytes | bytearray):
            return JobPayload.model_validate_json(data)
        return JobPayload.model_validate(data)
    except ValidationError as e:
        raise InvalidJobError(violations(e)) from None
