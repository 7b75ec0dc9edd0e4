"""Generation for one prompt: prefill, then sample -> check stop -> decode until the answer ends.

`Answer` (the stop rules of one sequence) and `Sampler` are the pieces a batched generator reuses:
per step it samples every live sequence, pushes the token into its Answer and decodes the ones
that are still running. The answer never runs past the model's `seq_length`: its budget is
min(max_new_tokens, seq_length - prompt length) and the KV is sized for exactly that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from seqshare.worker.errors import LimitExceededError
from seqshare.worker.params import SamplingParams
from seqshare.worker.sampling import Sampler

if TYPE_CHECKING:
    from seqshare.worker.debug_dump import DumpWriter
    from seqshare.worker.model import Model, Progress

STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_SEQ_LENGTH = "eos", "stop", "length", "seq_length"


def answer_budget(used: int, max_new_tokens: int, seq_length: int, what: str = "the prompt") -> tuple[int, bool]:
    """How many tokens may be generated after `used` positions, and whether seq_length (rather than
    max_new_tokens) is what caps it. A prompt that leaves no room is a named error."""
    room = seq_length - used
    if room < 1:
        raise LimitExceededError("seq_length", used + 1, seq_length, f"{what} plus one answer token")
    return min(max_new_tokens, room), room < max_new_tokens


@dataclass
class Answer:
    """The generated tokens of one sequence and the rules that end it: an EOS token, a stop string
    (the text is cut before it), or the token budget."""

    decode_text: Callable[[Sequence[int]], str]
    eos_ids: frozenset[int]
    stop: Sequence[str]
    budget: int
    budget_reason: str = STOP_LENGTH
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def push(self, token: int) -> bool:
        """Record the next token; True when the answer is complete (then `text` is set)."""
        if token in self.eos_ids:
            return self._finish(STOP_EOS)
        self.token_ids.append(int(token))
        if self.stop:
            text = self.decode_text(self.token_ids)
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                return self._finish(STOP_STRING, text[:cut])
        if len(self.token_ids) >= self.budget:
            return self._finish(self.budget_reason)
        return False

    def _finish(self, reason: str, text: str | None = None) -> bool:
        self.reason = reason
        self.text = self.decode_text(self.token_ids) if text is None else text
        return True


def new_answer(model: Model, params: SamplingParams, used: int, what: str = "the prompt") -> Answer:
    budget, capped = answer_budget(used, params.max_new_tokens, model.seq_length, what)
    reason = STOP_SEQ_LENGTH if capped else STOP_LENGTH
    return Answer(model.decode_text, frozenset(model.eos_ids), list(params.stop), budget, reason)


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    stop_reason: str
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "stop_reason": self.stop_reason,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    penalty_history: Sequence[int] | None = None,
    dump: DumpWriter | None = None,
    progress: Progress | None = None,
) -> Generation:
    """Answer one prompt. The repetition penalty sees `penalty_history` (default: the whole prompt,
    which for a plain prompt is all question) plus the answer so far."""
    ids = np.asarray(prompt_ids, dtype=np.int32)
    answer = new_answer(model, params, int(ids.size))
    kv = model.new_kv(int(ids.size) + answer.budget)
    t0 = time.perf_counter()
    logits = model.prefill(ids, kv, dump=dump, progress=progress)
    t1 = time.perf_counter()
    assert logits is not None
    sampler = Sampler(params)
    history = ids.tolist() if penalty_history is None else [int(t) for t in penalty_history]
    steps = 0
    while True:
        token = sampler.pick(logits, history)
        history.append(token)
        if answer.push(token):
            break
        logits = model.decode([token], [(None, kv)])[0]
        steps += 1
    t2 = time.perf_counter()
    return Generation(
        answer.token_ids, answer.text, int(ids.size), answer.reason or STOP_LENGTH, t1 - t0, t2 - t1, steps
    )
