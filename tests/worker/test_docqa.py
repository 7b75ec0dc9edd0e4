"""Doc QA on the real engine: shared prefix + batch equals each question alone, and the prefix cache
(memory, spill, restart, corruption, partial reuse, bundles sharing a digest) behaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits
from seqshare.worker.answer import FINISH_REASONS
from seqshare.worker.docqa import DocAnswer, DocQA, DocRequest, QuestionRequest
from seqshare.worker.errors import LimitExceededError
from seqshare.worker.model import Model
from seqshare.worker.params import SamplingParams
from seqshare.worker.prefix_cache import PrefixCache
from seqshare.worker.spill import Spill

LIMITS = Limits(share_length=2000, unshare_length=64, seq_length=2200)
GREEDY = SamplingParams(max_new_tokens=20)
DIGEST = "5e" * 32


def make_document(n_facts: int, seed: int = 0) -> tuple[str, list[str]]:
    """A made-up gazetteer (answerable questions, nothing downloaded)."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "tor", "va", "shi", "bel", "dun", "ar", "os", "qui"]
    goods = ["salt", "copper", "wool", "amber", "glass", "honey", "timber", "silk"]
    facts, questions = [], []
    for _ in range(n_facts):
        town = "".join(rng.choice(syll, 3)).capitalize()
        n, good, year = int(rng.integers(200, 9000)), str(rng.choice(goods)), int(rng.integers(1100, 1900))
        facts.append(f"The town of {town} was founded in {year}. It has {n} inhabitants and trades mostly in {good}.")
        questions.append(rng.choice([f"When was {town} founded?", f"What does {town} trade in?",
                                     f"How many people live in {town}?"]))
    return " ".join(facts), questions


def _qa(model: Model, tmp: Path | None = None, budget: int = 1 << 30, digest: str = DIGEST) -> DocQA:
    spill = Spill(tmp, 1 << 30) if tmp is not None else None
    return DocQA(model, PrefixCache(budget), spill, LIMITS, digest)


def _reqs(questions: list[str], params: SamplingParams = GREEDY) -> list[QuestionRequest]:
    return [QuestionRequest(q, params, f"q{i}") for i, q in enumerate(questions)]


def _tokens(doc: DocAnswer) -> list[list[int]]:
    return [a.token_ids for a in doc.answers]


def test_shared_prefix_batch_equals_alone_f32(default_gguf: Path) -> None:
    model = Model(load_checkpoint(default_gguf, "f32"), threads=2)
    text, questions = make_document(12)
    qa = _qa(model)
    cold = qa.answer(text, _reqs(questions[:4]))
    alone = qa.answer(text, _reqs(questions[:4]), reuse=False)
    assert cold.prefix == "miss" and alone.prefix == "off"
    assert _tokens(cold) == _tokens(alone)
    assert all(a.generated_tokens > 0 for a in cold.answers)
    warm = qa.answer(text, _reqs(questions[:4]))
    assert warm.prefix == "hit" and all(a.cache_hit for a in warm.answers)
    assert _tokens(warm) == _tokens(cold)


def test_shared_prefix_batch_equals_alone_int4(q4_model: Model) -> None:
    # The issue asks for >= 95% identical answers on int4; batch-invariant kernels and canonical
    # attention blocks make every answer identical, so that is what is asserted.
    text, questions = make_document(16, seed=1)
    qa = _qa(q4_model)
    shared = qa.answer(text, _reqs(questions))
    alone = qa.answer(text, _reqs(questions), reuse=False)
    same = sum(a == b for a, b in zip(_tokens(shared), _tokens(alone), strict=True))
    assert same == len(questions), f"only {same} of {len(questions)} answers identical"
    a0 = shared.answers[0]
    assert a0.context_tokens == shared.context_tokens and a0.question_tokens > 0
    assert a0.first_token_s > 0 and a0.total_s >= a0.first_token_s and a0.custom_id == "q0"
    assert {a.finish_reason for a in shared.answers} <= set(FINISH_REASONS)


def test_stop_strings_cut_answers_in_a_batch_as_alone(q4_model: Model) -> None:
    """The job path runs the same stop rules as generate(): each answer of a batch is cut before its
    stop string, exactly as the same question answered alone."""
    text, questions = make_document(6, seed=2)
    qa = _qa(q4_model)
    full = qa.answer(text, _reqs(questions))
    stops = [a.text.split()[2] for a in full.answers if len(a.text.split()) > 3]
    assert stops, [a.text for a in full.answers]
    params = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, stop=stops[:1])
    batch = qa.answer(text, _reqs(questions, params))
    alone = qa.answer(text, _reqs(questions, params), reuse=False)
    assert [(a.text, a.finish_reason) for a in batch.answers] == [(a.text, a.finish_reason) for a in alone.answers]
    cut = [a for a in batch.answers if a.finish_reason == "stop"]
    assert cut and all(stops[0] not in a.text for a in cut)
    for a, f in zip(batch.answers, full.answers, strict=True):
        assert f.text.startswith(a.text)


def test_prefix_and_batch_give_the_same_logits_bit_for_bit(q4_model: Model) -> None:
    """A question over a shared prefix KV, prefilled and decoded in a batch of three, yields the same
    logits, bit for bit, as the full prompt in one KV decoded alone: nothing stale, nothing rounded
    differently. The prefix length is not a multiple of the attention tile, so a tile straddles it."""
    m = q4_model
    text, questions = make_document(9, seed=4)
    ctx = m.encode(text)
    assert len(ctx) % 32 != 0
    qs = [np.asarray(m.encode(" " + q, add_special_tokens=False), np.int32) for q in questions[:3]]
    prefix = m.new_kv(len(ctx))
    m.prefill(ctx, prefix, want_logits=False)
    with pytest.raises(ValueError, match="phase"):  # rows after a prefix must know where they start
        m.prefill(qs[0], m.new_kv(len(qs[0])), prefix=prefix)
    own = [m.new_kv(len(q) + 8, start=len(ctx)) for q in qs]
    rows = np.cumsum([len(q) for q in qs]) - 1
    batch = m.forward(np.concatenate(qs), [(prefix, kv, len(q)) for kv, q in zip(own, qs, strict=True)], rows)
    alone_kv = [m.new_kv(len(ctx) + len(q) + 8) for q in qs]
    alone = [m.prefill(np.concatenate([ctx, q]), kv) for kv, q in zip(alone_kv, qs, strict=True)]
    for i in range(3):
        np.testing.assert_array_equal(batch[i], alone[i])
    toks = [int(np.argmax(b)) for b in batch]
    for _ in range(4):  # decode steps: the batch shares one prefix; alone, each has its own KV
        step = m.decode(toks, [(prefix, kv) for kv in own])
        single = [m.decode([t], [(None, kv)])[0] for t, kv in zip(toks, alone_kv, strict=True)]
        for i in range(3):
            np.testing.assert_array_equal(step[i], single[i])
        toks = [int(np.argmax(r)) for r in step]


def test_eviction_spills_and_a_miss_restores(q4_model: Model, tmp_path: Path) -> None:
    text, questions = make_document(6, seed=2)
    qa = _qa(q4_model, tmp_path, budget=0)  # nothing stays in memory once released
    first = qa.answer(text, _reqs(questions[:2]))
    assert qa.cache.stats.evicted == 1 and len(qa.cache) == 0 and qa.spill is not None
    assert qa.spill.stats.written == 1
    again = qa.answer(text, _reqs(questions[:2]))
    assert again.prefix == "restored" and again.prefix_computed_tokens == 0
    assert all(a.cache_hit for a in again.answers)
    assert _tokens(again) == _tokens(first)
    assert again.cache["restored"] == 1 and again.cache["spill"]["restored"] == 1


def test_restart_reuses_the_spill_directory(q4_model: Model, tmp_path: Path) -> None:
    text, questions = make_document(6, seed=3)
    before = _qa(q4_model, tmp_path)
    first = before.answer(text, _reqs(questions[:2]))
    before.close()  # clean shutdown: every cached prefix goes to disk
    assert len(list(tmp_path.glob("*.kv"))) == 1
    after = _qa(q4_model, tmp_path)  # a new process: empty memory, same directory
    again = after.answer(text, _reqs(questions[:2]))
    assert again.prefix == "restored" and _tokens(again) == _tokens(first)


def test_corrupt_spill_is_discarded_and_recomputed(q4_model: Model, tmp_path: Path) -> None:
    text, questions = make_document(6, seed=4)
    qa = _qa(q4_model, tmp_path, budget=0)
    first = qa.answer(text, _reqs(questions[:2]))
    (path,) = tmp_path.glob("*.kv")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    again = qa.answer(text, _reqs(questions[:2]))
    assert again.prefix == "miss" and again.prefix_computed_tokens == again.context_tokens
    assert qa.spill is not None and qa.spill.stats.discarded == 1
    assert _tokens(again) == _tokens(first)
    # The recomputed prefix was spilled again, soundly this time.
    assert qa.answer(text, _reqs(questions[:2])).prefix == "restored"


def test_foreign_model_spill_is_not_used(q4_model: Model, tmp_path: Path) -> None:
    text, questions = make_document(4, seed=5)
    other = _qa(q4_model, tmp_path, digest="77" * 32)
    other.answer(text, _reqs(questions[:1]))
    other.close()
    qa = _qa(q4_model, tmp_path)
    assert qa.answer(text, _reqs(questions[:1])).prefix == "miss"  # another digest: another hash


def test_partial_reuse_extends_a_cached_prefix(q4_model: Model) -> None:
    text, questions = make_document(10, seed=6)
    head = text[: text.index(".", len(text) // 2) + 1]
    qa = _qa(q4_model)
    qa.answer(head, _reqs(questions[:1]))
    ext = qa.answer(text, _reqs(questions[:3]))
    assert ext.prefix == "partial"
    assert 0 < ext.prefix_computed_tokens < ext.context_tokens // 2 + 10
    fresh = _qa(q4_model).answer(text, _reqs(questions[:3]))
    assert fresh.prefix == "miss" and _tokens(ext) == _tokens(fresh)


def test_answer_many_shares_one_prefix_per_context(q4_model: Model) -> None:
    text1, qs1 = make_document(5, seed=7)
    text2, qs2 = make_document(5, seed=8)
    qa = _qa(q4_model)
    reqs = [DocRequest(text1, _reqs(qs1[:2])), DocRequest(text2, _reqs(qs2[:1])), DocRequest(text1, _reqs(qs1[2:4]))]
    docs = qa.answer_many(reqs)
    assert qa.cache.stats.misses == 2 and qa.cache.stats.inserted == 2
    assert docs[0].context_hash == docs[2].context_hash != docs[1].context_hash
    alone = [_qa(q4_model).answer(r.context, r.questions) for r in reqs]
    assert [_tokens(d) for d in docs] == [_tokens(d) for d in alone]


def test_salt_separates_tenants(q4_model: Model) -> None:
    text, questions = make_document(3, seed=9)
    qa = _qa(q4_model)
    a = qa.answer(text, _reqs(questions[:1]), cache_salt="tenant-a")
    b = qa.answer(text, _reqs(questions[:1]), cache_salt="tenant-b")
    assert a.prefix == b.prefix == "miss" and a.context_hash != b.context_hash


def test_limits_fail_before_any_compute(q4_model: Model) -> None:
    qa = DocQA(q4_model, PrefixCache(1 << 30), None, Limits(40, 64, 200), DIGEST)
    text, questions = make_document(8)
    with pytest.raises(LimitExceededError, match="share_length"):
        qa.answer(text, _reqs(questions[:1]))
    long_answer = SamplingParams(max_new_tokens=190)
    with pytest.raises(LimitExceededError, match="seq_length"):
        qa.answer("Short.", _reqs(["Why?"], long_answer))
    assert qa.cache.stats.misses == 0 and len(qa.cache) == 0
