"""The batched decode loop of doc QA: admit, prefill, decode together, finish independently.

Each `Sequence` is one question: its own KV (question rows, then answer rows) and, when reused, the
shared prefix KV it attends to first. Per step all active sequences go to `model.decode` in one
call; the model groups those that name the same prefix KV object so the prefix is read once per
step for all of them. A finished sequence leaves the batch (its own KV is dropped, the prefix is
untouched) and a pending one takes its place after its question is prefilled.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seqshare.worker.params import SamplingParams


class _Greedy:
    """Greedy needs no state and no history: argmax (the lowest id on a tie)."""

    def pick(self, logits: np.ndarray, history: np.ndarray) -> int:
        return int(np.argmax(logits))


def make_sampler(params: SamplingParams) -> Any:
    """A per-sequence picker with `pick(logits, history) -> token`; history = question + answer ids."""
    if params.mode == "greedy":
        return _Greedy()
    from seqshare.worker.sampling import Sampler

    return Sampler(params)


@dataclass(eq=False)
class Sequence:
    """One question being answered."""

    tag: tuple[int, int]  # (request index, question index)
    prompt: np.ndarray  # (m,) int32: the rows this sequence prefills into its own KV
    question: np.ndarray  # (q,) int32: where the repetition-penalty window begins (never the context)
    params: SamplingParams
    prefix: Any = None  # the shared prefix KV (read-only) or None
    kv: Any = field(default=None, repr=False)
    sampler: Any = field(default=None, repr=False)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    t_start: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0

    @property
    def capacity(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def first_token_s(self) -> float:
        return self.t_first - self.t_start

    @property
    def total_s(self) -> float:
        return self.t_end - self.t_start


class DecodeLoop:
    """Runs sequences to completion on one model, at most `max_batch` decoded together."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: Iterable[int], max_batch: int = 32):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.eos = frozenset(int(t) for t in eos_ids)
        self.max_batch = max_batch
        self.steps = 0  # decode calls made (each reads every active prefix once)

    def run(self, pending: Seq[Sequence], on_done: Callable[[Sequence], None],
            on_token: Callable[[Sequence], None] | None = None) -> None:
        queue, active = deque(pending), list[Sequence]()
        while queue or active:
            if queue and len(active) < self.max_batch:
                admitted = [queue.popleft() for _ in range(min(self.max_batch - len(active), len(queue)))]
                self._start(admitted)
                for s in admitted:
                    self._after_token(s, on_done, on_token, active)
            if active:
                active = self._step(active, on_done, on_token)

    # --- the three phases -----------------------------------------------------------------------
    def _start(self, admitted: list[Sequence]) -> None:
        """Prefill the admitted questions into fresh KVs against their prefixes; the logits give each
        its first token. Short prompts share native calls (up to the model's row limit), so a prefix
        is read once per call for all of them; a long prompt is prefilled alone, in chunks."""
        t0 = time.perf_counter()
        group: list[Sequence] = []
        rows = 0
        for s in admitted:
            s.t_start = t0
            s.kv = self.model.new_kv(s.capacity, start=0 if s.prefix is None else s.prefix.length)
            s.sampler = make_sampler(s.params)
            if len(s.prompt) > self.model.max_tokens:
                logits = self.model.prefill(s.prompt, s.kv, prefix=s.prefix, want_logits=True)
                self._accept(s, np.asarray(logits).reshape(-1))
                s.t_first = time.perf_counter()
                continue
            if rows + len(s.prompt) > self.model.max_tokens:
                self._prefill_group(group)
                group, rows = [], 0
            group.append(s)
            rows += len(s.prompt)
        self._prefill_group(group)

    def _prefill_group(self, group: list[Sequence]) -> None:
        if not group:
            return
        tokens = np.concatenate([s.prompt for s in group]).astype(np.int32)
        last_rows = np.cumsum([len(s.prompt) for s in group]) - 1
        logits = self.model.forward(tokens, [(s.prefix, s.kv, len(s.prompt)) for s in group], last_rows)
        t = time.perf_counter()
        for s, row in zip(group, logits, strict=True):
            self._accept(s, row)
            s.t_first = t

    def _step(self, active: list[Sequence], on_done: Callable[[Sequence], None],
              on_token: Callable[[Sequence], None] | None) -> list[Sequence]:
        tokens = np.array([s.generated[-1] for s in active], dtype=np.int32)
        logits = self.model.decode(tokens, [(s.prefix, s.kv) for s in active])
        self.steps += 1
        still: list[Sequence] = []
        for s, row in zip(active, logits, strict=True):
            self._accept(s, row)
            self._after_token(s, on_done, on_token, still)
        return still

    def _after_token(self, s: Sequence, on_done: Callable[[Sequence], None],
                     on_token: Callable[[Sequence], None] | None, keep: list[Sequence]) -> None:
        if on_token is not None:
            on_token(s)
        if s.finish_reason is None:
            keep.append(s)
            return
        s.t_end = time.perf_counter()
        s.kv = None  # the own rows go now; the shared prefix stays with its cache entry
        on_done(s)

    # --- one token ------------------------------------------------------------------------------
    def _accept(self, s: Sequence, logits: np.ndarray) -> None:
        history = np.concatenate([s.question, np.asarray(s.generated, dtype=np.int32)])
        tok = int(s.sampler.pick(logits, history))
        if tok in self.eos:
            s.finish_reason = "stop"
            s.text = self._decode(s.generated)
            return
        s.generated.append(tok)
        if s.params.stop:
            text = self._decode(s.generated)
            cut = min((i for i in (text.find(x) for x in s.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                s.text, s.finish_reason = text[:cut], "stop"
                return
        if len(s.generated) >= s.params.max_new_tokens:
            s.finish_reason = "length"
            s.text = self._decode(s.generated)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
