"""The engine's generation loop, for one prompt (`generate`) or a batch of questions (doc QA).

Each step of `DecodeLoop.run` is one of five, in order:
  schedule  admit pending sequences while fewer than `max_batch` are active;
  prefill   their prompts into their own KVs against their shared prefixes -> first logits;
  decode    one token for every active sequence in one model call -> next logits;
  sample    per sequence, the next token from its logits (its Sampler, its history);
  finish    per sequence, the stop rules (answer.Answer); a finished one leaves the batch.

Each `Sequence` is one question: its own KV (prompt rows, then answer rows: a slot of the model's
KV arena) and, when reused, the shared prefix KV it attends to first. The model groups sequences
that name the same prefix KV object, so the prefix is read once per step for all of them. A
finished sequence gives its slot back (the prefix stays with its cache entry) and a pending one
takes its place.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from seqshare.worker.answer import Answer, new_answer
from seqshare.worker.params import SamplingParams
from seqshare.worker.sampling import Sampler

if TYPE_CHECKING:
    from seqshare.worker.debug_dump import DumpWriter
    from seqshare.worker.model import Progress


@dataclass(eq=False)
class Sequence:
    """One question being answered."""

    tag: tuple[int, int]  # (request index, question index)
    prompt: np.ndarray  # (m,) int32: the rows this sequence prefills into its own KV
    question: np.ndarray  # (q,) int32: the repetition penalty's history starts here (never the context)
    params: SamplingParams
    prefix: Any = None  # the shared prefix KV (read-only) or None
    dump: DumpWriter | None = None  # per-layer outputs of this prompt's prefill (debug)
    progress: Progress | None = None  # (done, total) between prefill chunks
    kv: Any = field(default=None, repr=False)
    sampler: Sampler | None = field(default=None, repr=False)
    answer: Answer | None = field(default=None, repr=False)
    history: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32), repr=False)  # question + answer
    t_start: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0

    @property
    def used(self) -> int:
        """Positions taken before the answer: the prefix and this prompt."""
        return (0 if self.prefix is None else int(self.prefix.length)) + len(self.prompt)

    @property
    def last_token(self) -> int:
        assert self.answer is not None and self.answer.token_ids
        return self.answer.token_ids[-1]

    @property
    def first_token_s(self) -> float:
        return self.t_first - self.t_start

    @property
    def total_s(self) -> float:
        return self.t_end - self.t_start


Hook = Callable[[Sequence], None]


class DecodeLoop:
    """Runs sequences to completion on one model, at most `max_batch` decoded together."""

    def __init__(self, model: Any, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model, self.max_batch = model, max_batch
        self.steps = 0  # decode calls made (each reads every active prefix once)

    def run(self, pending: Seq[Sequence], on_done: Hook, on_token: Hook | None = None) -> None:
        queue, active = deque(pending), list[Sequence]()
        try:
            while queue or active:
                admitted = self._schedule(queue, active)
                for s, logits in zip(admitted, self._prefill(admitted), strict=True):
                    self._sample_and_finish(s, logits, active, on_done, on_token)
                if active:
                    logits = self._decode(active)
                    still: list[Sequence] = []
                    for s, row in zip(active, logits, strict=True):
                        self._sample_and_finish(s, row, still, on_done, on_token)
                    active = still
        finally:  # a stop raised from a hook: the arena gets its slots back
            for s in pending:
                if s.kv is not None:
                    self.model.arena.give(s.kv)
                    s.kv = None

    # --- the steps ------------------------------------------------------------------------------
    def _schedule(self, queue: deque[Sequence], active: list[Sequence]) -> list[Sequence]:
        admitted = [queue.popleft() for _ in range(min(self.max_batch - len(active), len(queue)))]
        t0 = time.perf_counter()
        for s in admitted:
            s.t_start = t0
            s.answer = new_answer(self.model.decode_text, self.model.eos_ids, s.params, s.used, self.model.seq_length)
            s.kv = self.model.arena.take(len(s.prompt) + s.answer.budget, start=s.used - len(s.prompt))
            s.sampler = Sampler(s.params)
            s.history = np.empty(len(s.question) + s.answer.budget, np.int32)  # (q + budget,) filled as it goes
            s.history[: len(s.question)] = s.question
        return admitted

    def _prefill(self, admitted: list[Sequence]) -> list[np.ndarray]:
        """First logits of each admitted sequence. Short prompts share native calls (up to the
        model's row limit), so a prefix is read once per call for all of them; a long prompt, or
        one with a dump or a progress hook, is prefilled alone, in chunks."""
        out: dict[int, np.ndarray] = {}
        group: list[tuple[int, Sequence]] = []
        rows = 0
        for i, s in enumerate(admitted):
            if len(s.prompt) > self.model.max_tokens or s.dump is not None or s.progress is not None:
                logits = self.model.prefill(s.prompt, s.kv, prefix=s.prefix, dump=s.dump, progress=s.progress)
                out[i] = np.asarray(logits).reshape(-1)
                s.t_first = time.perf_counter()
                continue
            if rows + len(s.prompt) > self.model.max_tokens:
                out.update(self._prefill_group(group))
                group, rows = [], 0
            group.append((i, s))
            rows += len(s.prompt)
        out.update(self._prefill_group(group))
        return [out[i] for i in range(len(admitted))]

    def _prefill_group(self, group: list[tuple[int, Sequence]]) -> dict[int, np.ndarray]:
        if not group:
            return {}
        seqs = [s for _, s in group]
        tokens = np.concatenate([s.prompt for s in seqs]).astype(np.int32)
        last_rows = np.cumsum([len(s.prompt) for s in seqs]) - 1
        logits = self.model.forward(tokens, [(s.prefix, s.kv, len(s.prompt)) for s in seqs], last_rows)
        t = time.perf_counter()
        for s in seqs:
            s.t_first = t
        return {i: row for (i, _), row in zip(group, logits, strict=True)}

    def _decode(self, active: list[Sequence]) -> np.ndarray:
        tokens = np.array([s.last_token for s in active], dtype=np.int32)
        self.steps += 1
        return self.model.decode(tokens, [(s.prefix, s.kv) for s in active])

    def _sample_and_finish(self, s: Sequence, logits: np.ndarray, keep: list[Sequence], on_done: Hook,
                           on_token: Hook | None) -> None:
        assert s.answer is not None and s.sampler is not None
        n = len(s.question) + len(s.answer.token_ids)
        token = s.sampler.pick(logits, s.history[:n])
        if not s.answer.push(token) and n < s.history.size:
            s.history[n] = token
        if on_token is not None:
            on_token(s)
        if not s.answer.finished:
            keep.append(s)
            return
        s.t_end = time.perf_counter()
        self.model.arena.give(s.kv)  # the own rows go now; the shared prefix stays with its cache entry
        s.kv = None
        on_done(s)
