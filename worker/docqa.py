"""Document QA: every question about one context answered through one shared prefix, in one batch.

    hash the context -> prefix from memory | from the spill directory | by extending a cached strict
    prefix | by prefilling the context once -> prefill each question against it -> decode all
    questions together -> release the prefix (it stays cached; evicted prefixes are spilled)

`reuse=False` answers each question alone on the full prompt (context + question in one KV): the
baseline the equivalence tests and benchmarks compare against. This module is the Python API the
worker and the CLI use; both stay thin layers over it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from seqshare.worker.decode_loop import DecodeLoop, Sequence
from seqshare.worker.params import SamplingParams
from seqshare.worker.prefix_cache import Entry, PrefixCache
from seqshare.worker.segments import LimitsLike, Prompt, check_limits, context_hash, segment, tokenizer_identity
from seqshare.worker.spill import Spill

KV_FORMAT = "seqshare-kv-v2"  # the layout of KV.export_bytes(): per layer, K then V, each kv head's rows
# progress(request_index, questions_done, tokens_generated) for answer_many; answer drops the index.
ManyProgress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class QuestionRequest:
    text: str
    params: SamplingParams = field(default_factory=SamplingParams)
    custom_id: str | None = None


@dataclass(frozen=True)
class DocRequest:
    """One context and its questions. `raw` (or a model without a chat template) uses the strings as given."""

    context: str | Seq[Any]
    questions: list[QuestionRequest]
    cache_salt: str | None = None
    system: str | None = None
    raw: bool = False


@dataclass
class QuestionAnswer:
    custom_id: str | None
    text: str
    token_ids: list[int]
    context_tokens: int
    question_tokens: int
    generated_tokens: int
    first_token_s: float  # from the start of this question's prefill to its first token
    total_s: float  # from the start of its prefill to its last token
    cache_hit: bool  # the prefix came from memory or the spill directory
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" (max_new_tokens) | "seq_length" (answer.py)


@dataclass
class DocAnswer:
    answers: list[QuestionAnswer]
    context_hash: str
    context_tokens: int
    prefix: str  # "hit" | "restored" | "partial" | "miss" | "off" (reuse disabled)
    prefix_computed_tokens: int  # context tokens prefilled for this request
    prefix_s: float  # time to obtain the prefix (lookup, restore or prefill)
    wall_s: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)  # counters after the request

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class PrefixKV:
    """What a cache entry holds: the KV and where it goes when evicted."""

    kv: Any
    binding: dict[str, Any]
    spill: Spill | None


def spill_entry(entry: Entry) -> None:
    """The cache's eviction hook: write the prefix to its spill directory (if any)."""
    value: PrefixKV = entry.value
    if value.spill is not None:
        value.spill.put(entry.key, entry.tokens, value.kv.export_bytes(), value.binding)


@dataclass
class _Prepared:
    request: DocRequest
    prompt: Prompt
    key: str


class DocQA:
    """The doc-QA engine of one loaded model. Several may share one PrefixCache (and Spill):
    bundles with one weight digest and tokenizer/template then share their prefixes too."""

    def __init__(self, model: Any, cache: PrefixCache, spill: Spill | None, limits: LimitsLike,
                 weight_digest: str, max_batch: int = 32):
        self.model, self.cache, self.spill, self.limits = model, cache, spill, limits
        self.weight_digest = weight_digest
        self.tokenizer = model.tokenizer
        self.template: str | None = model.chat_template
        self._tokenizer_id = tokenizer_identity(self.tokenizer)
        self._special = self._special_strings()
        probe = model.new_kv(1)
        self.binding = {"format": KV_FORMAT, "weight_digest": weight_digest, "kv_dtype": probe.dtype,
                        "n_layers": probe.n_layers, "kv_dim": probe.kv_dim}
        if cache.on_evict is None:
            cache.on_evict = spill_entry
        self.batch = DecodeLoop(model, max_batch)
        self.alone = DecodeLoop(model, 1)

    # --- API ------------------------------------------------------------------------------------
    def answer(self, context: str | Seq[Any], questions: list[QuestionRequest], cache_salt: str | None = None,
               progress: Callable[[int, int], Any] | None = None, reuse: bool = True,
               system: str | None = None, raw: bool = False) -> DocAnswer:
        many = None if progress is None else (lambda _j, done, tokens: progress(done, tokens))
        req = DocRequest(context, list(questions), cache_salt, system, raw)
        return self.answer_many([req], progress=many, reuse=reuse)[0]

    def answer_many(self, requests: list[DocRequest], progress: ManyProgress | None = None,
                    reuse: bool = True) -> list[DocAnswer]:
        """Answer several requests in one decode batch; requests with one context hash share one prefix.

        Every request is split and checked against the limits before any compute, so a request over
        a limit fails the call without side effects.
        """
        t0 = time.perf_counter()
        prepared = [self._prepare(r) for r in requests]
        docs: list[DocAnswer] = []
        seqs: list[Sequence] = []
        held: list[Entry] = []
        try:
            by_key: dict[str, tuple[Entry | None, str, int, float]] = {}
            for j, p in enumerate(prepared):
                if p.key not in by_key:
                    # Between prefill chunks too, so a long document keeps the watchdog fed and a
                    # stop request is honoured within about a second.
                    tick = None if progress is None else (lambda _d, _t, j=j: progress(j, 0, 0))
                    by_key[p.key] = self._acquire(p, tick) if reuse else (None, "off", 0, 0.0)
                    if (entry := by_key[p.key][0]) is not None:
                        held.append(entry)
                else:
                    by_key[p.key] = (*by_key[p.key][:1], "hit", 0, 0.0)  # shared within this call
                entry, how, computed, secs = by_key[p.key]
                docs.append(DocAnswer([], p.key, len(p.prompt.context_ids), how, computed, secs))
                seqs += self._sequences(j, p, entry)
            self._run(seqs, prepared, docs, progress, reuse)
        finally:
            for entry in held:
                self.cache.release(entry)
        wall = time.perf_counter() - t0
        counters = self.counters()
        for d in docs:
            d.wall_s, d.cache = wall, counters
        return docs

    def close(self) -> None:
        """Clean shutdown: spill every prefix not in use, so a restart finds them on disk."""
        for entry in self.cache.drain():
            spill_entry(entry)

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.cache.stats.to_dict(), "entries": len(self.cache),
                               "memory_bytes": self.cache.used_bytes}
        if self.spill is not None:
            out["spill"] = {**self.spill.stats.to_dict(), "disk_bytes": self.spill.used_bytes}
        return out

    def prepare(self, request: DocRequest) -> tuple[Prompt, str]:
        """Split, tokenize, hash and limit-check one request (no compute)."""
        p = self._prepare(request)
        return p.prompt, p.key

    # --- steps ----------------------------------------------------------------------------------
    def _prepare(self, r: DocRequest) -> _Prepared:
        template = None if r.raw else self.template
        prompt = segment(self.tokenizer, r.context, [q.text for q in r.questions], template,
                         self._special, r.system)
        check_limits(self.limits, len(prompt.context_ids), [len(q) for q in prompt.question_ids],
                     [q.params.max_new_tokens for q in r.questions])
        key = context_hash(self.weight_digest, self._tokenizer_id, prompt.template_id, prompt.context_ids,
                           r.cache_salt)
        return _Prepared(r, prompt, key)

    def _acquire(self, p: _Prepared, tick: Callable[[int, int], Any] | None = None) -> tuple[Entry, str, int, float]:
        """(referenced entry, how it was obtained, context tokens computed, seconds). `tick(done, total)`
        runs between prefill chunks; an exception it raises abandons the prefix."""
        t0 = time.perf_counter()
        ids = p.prompt.context_ids
        if (entry := self.cache.acquire(p.key)) is not None:
            return entry, "hit", 0, time.perf_counter() - t0
        if (entry := self._restore(p.key, ids)) is not None:
            return entry, "restored", 0, time.perf_counter() - t0
        base = self.cache.acquire_longest_prefix(ids)
        if base is not None:
            try:
                kv = base.value.kv.copy(len(ids))
            finally:
                self.cache.release(base)
            start, how = kv.length, "partial"
        else:
            kv, start, how = self.model.new_kv(len(ids)), 0, "miss"
        self.model.prefill(ids[start:], kv, want_logits=False, progress=tick)
        entry = self.cache.insert(p.key, ids, PrefixKV(kv, self.binding, self.spill), kv.nbytes)
        return entry, how, len(ids) - start, time.perf_counter() - t0

    def _restore(self, key: str, ids: np.ndarray) -> Entry | None:
        if self.spill is None or (rec := self.spill.get(key, self.binding)) is None:
            return None
        kv = self.model.new_kv(len(ids))
        try:
            if not np.array_equal(rec.tokens, ids):
                raise ValueError("its token ids differ from the context's")
            kv.import_bytes(rec.kv, len(ids))
        except ValueError:
            # Sound file, wrong content (a hash collision or a layout change): never trust it.
            self.spill.remove(key, self.binding)
            self.spill.stats.discarded += 1
            return None
        return self.cache.insert(key, ids, PrefixKV(kv, self.binding, self.spill), kv.nbytes, restored=True)

    def _sequences(self, j: int, p: _Prepared, entry: Entry | None) -> list[Sequence]:
        out = []
        for i, (q, ids) in enumerate(zip(p.request.questions, p.prompt.question_ids, strict=True)):
            if entry is not None:
                out.append(Sequence((j, i), ids, ids, q.params, prefix=entry.value.kv))
            else:
                full = np.concatenate([p.prompt.context_ids, ids])
                out.append(Sequence((j, i), full, ids, q.params))
        return out

    def _run(self, seqs: list[Sequence], prepared: list[_Prepared], docs: list[DocAnswer],
             progress: ManyProgress | None, reuse: bool) -> None:
        slots: list[list[QuestionAnswer | None]] = [[None] * len(p.request.questions) for p in prepared]
        done = [0] * len(prepared)
        tokens = [0] * len(prepared)

        def on_done(s: Sequence) -> None:
            j, i = s.tag
            p, d = prepared[j], docs[j]
            a = s.answer
            assert a is not None and a.reason is not None
            slots[j][i] = QuestionAnswer(
                p.request.questions[i].custom_id, a.text, list(a.token_ids), len(p.prompt.context_ids),
                len(p.prompt.question_ids[i]), len(a.token_ids), s.first_token_s, s.total_s,
                d.prefix in ("hit", "restored"), a.reason)
            done[j] += 1
            if progress is not None:
                progress(j, done[j], tokens[j])

        def on_token(s: Sequence) -> None:
            j = s.tag[0]
            tokens[j] += 1
            if progress is not None:  # per token: the caller rate-limits what it publishes
                progress(j, done[j], tokens[j])

        (self.batch if reuse else self.alone).run(seqs, on_done, on_token)
        for d, answers in zip(docs, slots, strict=True):
            d.answers = [a for a in answers if a is not None]

    def _special_strings(self) -> dict[str, str | None]:
        """bos/eos token strings some chat templates print."""
        spec = getattr(self.model, "spec", None)
        bos = getattr(spec, "bos_token_id", None)
        eos = list(self.model.eos_ids)

        def name(i: int | None) -> str | None:
            return None if i is None else self.tokenizer.id_to_token(int(i))

        return {"bos_token": name(bos), "eos_token": name(eos[0] if eos else None)}
