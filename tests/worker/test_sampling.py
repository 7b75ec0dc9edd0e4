"""Sampling and stop rules: every mode's distribution against an independent reference, seeded
reproducibility, the seed demo's penalty_sample (its own torch head is the reference), and the stop
rules on real models (EOS, stop strings, max_new_tokens, seq_length), including the seed's two bugs
(a shrinking repeat_last_n, decoding past the end of the KV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_model

from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.bundle.loader import load_bundle
from seqshare.worker.answer import STOP_EOS, STOP_LENGTH, STOP_SEQ_LENGTH, STOP_STRING
from seqshare.worker.chat import chat_ids
from seqshare.worker.docqa import DocQA, DocRequest, QuestionRequest
from seqshare.worker.errors import KVCapacityError, LimitExceededError
from seqshare.worker.generate import generate
from seqshare.worker.model import Model
from seqshare.worker.params import SamplingParams
from seqshare.worker.prefix_cache import PrefixCache
from seqshare.worker.sampling import (
    PENALTY_MIN_KEEP,
    Sampler,
    penalty_distribution,
    penalty_window,
    sample,
    sample_distribution,
)

PROB_ATOL = 1e-12  # float64 reference vs float64 implementation
SEED_HEAD_ATOL = 2e-6  # the seed's float32 torch head vs our float64 probabilities
FREQ_TV_MAX = 0.02  # total-variation distance of 40k draws from their distribution (~0.006 expected)


def as_dict(dist: tuple[np.ndarray, np.ndarray]) -> dict[int, float]:
    return {int(i): float(p) for i, p in zip(*dist, strict=True)}


def reference_sample_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                                  min_p: float) -> dict[int, float]:
    """Written from the definitions, independently of worker/sampling.py: sort, cut, renormalise."""
    z = logits.astype(np.float64) / temperature
    order = sorted(range(z.size), key=lambda i: (-z[i], i))
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    n = p.size
    if top_p < 1.0:  # the smallest head whose mass reaches top_p
        n = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    kept = [(order[i], p[i]) for i in range(min(n, p.size)) if p[i] >= min_p * p[0]]
    total = sum(q for _, q in kept)
    return {i: q / total for i, q in kept}


def seed_penalty_head(logits: np.ndarray, input_ids: list[int], top_p: float, temperature: float,
                      penalty: float) -> dict[int, float]:
    """The seed demo's PenaltySampleHead (LLM-TPU export script), as it was written, in torch."""
    import torch

    m_logits = torch.tensor(logits[None], dtype=torch.float32)
    ids = torch.tensor([input_ids], dtype=torch.int64)
    picked = torch.gather(m_logits, 1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    m_logits.scatter_(1, ids, picked)
    values, token = torch.topk(m_logits.float(), 50)
    values = values / temperature
    keep_matrix = torch.zeros((1, 50), dtype=torch.bool)
    keep_matrix[0, :5] = True
    mask = (values.softmax(dim=1).cumsum(dim=1) < top_p) + keep_matrix
    probs = torch.where(mask, values, torch.FloatTensor([-1000.0])).softmax(dim=1)
    return {int(t): float(p) for t, p in zip(token[0], probs[0], strict=True) if p > 0}


def assert_same_distribution(got: dict[int, float], want: dict[int, float], atol: float) -> None:
    assert set(got) == set(want)
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=0, atol=atol)


def random_logits(n: int, seed: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# --- distributions ---------------------------------------------------------------------------------
def test_greedy_is_the_argmax_and_draws_nothing() -> None:
    logits = random_logits(500, 0)
    logits[17] = logits[401] = logits.max() + 1.0  # a tie: the lower id wins
    s = Sampler(SamplingParams(mode="greedy", seed=3))
    state = s.rng.bit_generator.state
    assert s.pick(logits, [17, 17]) == 17  # no repetition penalty in greedy mode
    assert s.rng.bit_generator.state == state


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 40, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (0.8, 0, 0.5, 0.0),
     (1.0, 0, 1.0, 0.05), (0.9, 100, 0.95, 0.02), (1.0, 1, 1.0, 0.0), (2.0, 0, 0.3, 0.3)],
)
def test_sample_distribution_matches_reference(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    for seed in range(3):
        logits = random_logits(1000, seed)
        want = reference_sample_distribution(logits, temperature, top_k, top_p, min_p)
        got = as_dict(sample_distribution(logits, temperature, top_k, top_p, min_p))
        assert_same_distribution(got, want, PROB_ATOL)
        if top_k:
            assert len(got) <= top_k
        assert abs(sum(got.values()) - 1.0) < 1e-12


def test_sample_draws_follow_their_distribution() -> None:
    logits = random_logits(60, 7, scale=1.5)
    params = dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.01)
    want = reference_sample_distribution(logits, **params)
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, rng, **params) for _ in range(40_000)])
    assert set(np.unique(draws)) <= set(want)
    freq = np.bincount(draws, minlength=60) / draws.size
    tv = 0.5 * sum(abs(freq[i] - want.get(i, 0.0)) for i in range(60))
    assert tv < FREQ_TV_MAX


@pytest.mark.parametrize(
    ("top_p", "temperature", "penalty"),
    [(0.999, 1.0, 1.2), (0.8, 1.0, 1.2), (0.9, 0.7, 2.0), (0.05, 1.0, 1.2), (0.6, 1.5, 1.0)],
)
def test_penalty_distribution_is_the_seed_head(top_p: float, temperature: float, penalty: float) -> None:
    for seed in range(3):
        logits = random_logits(2000, seed)
        order = np.argsort(-logits)
        # recent tokens among the likeliest (so the penalty matters), repeated, and some negative
        recent = [int(order[0]), int(order[3]), int(order[3]), int(order[-1]), int(order[10]), 5]
        want = seed_penalty_head(logits, recent, top_p, temperature, penalty)
        got = as_dict(penalty_distribution(logits, recent, penalty, temperature, top_p))
        assert_same_distribution(got, want, SEED_HEAD_ATOL)
        assert PENALTY_MIN_KEEP <= len(got) <= 50
        # top_p = 1 keeps all 50 (the seed's float32 cumsum drops or keeps the last one by rounding)
        assert len(penalty_distribution(logits, recent, penalty, temperature, 1.0)[0]) == 50


def test_penalty_window_is_the_last_n_and_never_shrinks() -> None:
    history = list(range(100, 200))
    assert penalty_window(history, 32).tolist() == history[-32:]
    assert penalty_window(history[:3], 32).tolist() == history[:3]
    assert penalty_window(history, 0).size == 0
    # The seed clamped repeat_last_n to the first (short) question for good. One sampler, a short
    # history first, then a long one: token 150 (20 back) must still be penalised.
    logits = random_logits(300, 0, scale=1.0)
    logits[150], logits[280] = 8.0, 6.0  # 280 was never generated
    s = Sampler(SamplingParams(mode="penalty_sample", repeat_penalty=4.0, repeat_last_n=32, seed=0))
    s.pick(logits, [101, 102, 103])
    dist = as_dict(s.distribution(logits, history[:71]))  # ends at 170: 150 is 21st from the end
    want = seed_penalty_head(logits, history[71 - 32 : 71], 1.0, 1.0, 4.0)
    assert_same_distribution(dist, want, SEED_HEAD_ATOL)
    assert dist[150] < dist[280]


@pytest.mark.parametrize("mode", ["sample", "penalty_sample"])
def test_seeded_modes_are_reproducible(mode: str) -> None:
    def run(seed: int) -> list[int]:
        s = Sampler(SamplingParams(mode=mode, seed=seed, top_k=40, top_p=0.95, temperature=1.1))
        history: list[int] = []
        for step in range(200):
            history.append(s.pick(random_logits(3000, step, scale=2.0), history))
        return history

    assert run(42) == run(42)
    assert run(42) != run(43)


# --- stop rules on real models ----------------------------------------------------------------------
def test_eos_ends_the_answer(q4_model: Model) -> None:
    gen = generate(q4_model, chat_ids(q4_model, "Name three primary colors."), SamplingParams(max_new_tokens=64))
    assert gen.stop_reason == STOP_EOS and 0 < len(gen.token_ids) < 64
    assert not set(gen.token_ids) & set(q4_model.eos_ids)  # the EOS token is not part of the answer
    assert gen.text == q4_model.decode_text(gen.token_ids)


def test_stop_string_cuts_the_text_and_stops(q4_model: Model) -> None:
    ids = chat_ids(q4_model, "List the days of the week.")
    full = generate(q4_model, ids, SamplingParams(max_new_tokens=40))
    assert "Friday" in full.text
    cut = generate(q4_model, ids, SamplingParams(max_new_tokens=40, stop=["Friday", "no such text"]))
    assert cut.stop_reason == STOP_STRING
    assert cut.text == full.text[: full.text.index("Friday")]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert "Friday" in q4_model.decode_text(cut.token_ids)  # the last token completed the stop string


def test_max_new_tokens(q4_model: Model) -> None:
    gen = generate(q4_model, chat_ids(q4_model, "List the days of the week."), SamplingParams(max_new_tokens=5))
    assert gen.stop_reason == STOP_LENGTH and len(gen.token_ids) == 5 and gen.decode_steps == 4


@pytest.mark.parametrize("mode", ["sample", "penalty_sample"])
def test_seeded_generation_is_reproducible_end_to_end(q4_model: Model, mode: str) -> None:
    ids = chat_ids(q4_model, "Write one sentence about the sea.")

    def run(seed: int) -> list[int]:
        params = SamplingParams(mode=mode, seed=seed, max_new_tokens=24, temperature=1.2, top_k=100)
        return generate(q4_model, ids, params).token_ids

    first = run(5)
    assert run(5) == first and run(6) != first


@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A tiny model whose bundle allows 40 positions in all (share 16 + unshare 8 + answers)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", d)
    write_bundle(load_checkpoint(d, "f32"), d / "short.ssb", Limits(16, 8, 40))
    return Model(load_bundle(d / "short.ssb", share=False), threads=2)


@pytest.mark.parametrize("mode", ["greedy", "sample", "penalty_sample"])
def test_generation_never_runs_past_seq_length(short_model: Model, mode: str) -> None:
    assert short_model.seq_length == 40
    params = SamplingParams(mode=mode, max_new_tokens=1000, seed=1, repeat_penalty=1.0)
    prompt = np.random.default_rng(0).integers(3, 300, 30).tolist()
    gen = generate(short_model, prompt, params)
    if gen.stop_reason != STOP_EOS:
        assert gen.stop_reason == STOP_SEQ_LENGTH and len(gen.token_ids) == 10
    assert gen.prompt_tokens + len(gen.token_ids) <= 40
    assert len(generate(short_model, prompt + prompt[:9], params).token_ids) <= 1
    with pytest.raises(LimitExceededError, match="seq_length"):
        generate(short_model, prompt + prompt[:10], params)


def test_a_full_kv_refuses_to_decode(short_model: Model) -> None:
    kv = short_model.new_kv(4)
    short_model.prefill([5, 6, 7, 8], kv)
    with pytest.raises(KVCapacityError, match="short by 1"):
        short_model.decode([9], [(None, kv)])
    assert kv.length == 4


# --- penalty_sample through doc QA: the context is never in the penalty window ----------------------
def test_docqa_penalises_question_and_answer_only(default_gguf: Path) -> None:
    """Seeded penalty_sample answers through a shared prefix, replayed on the full prompt with
    Sampler(history = question + answer), must match token for token. Controls show the replay can
    tell: with the context's tail in the history, or with the window clamped to the first (short)
    question as the seed did, the same draws give other tokens."""
    model = Model(load_checkpoint(default_gguf, "f32"), threads=2, kv_dtype="f32")
    context = ("The river Alder rises in the northern hills, runs past the mill town of Brackley and the "
               "old abbey, and reaches the sea at Portwen, where ferries leave for the islands. ") * 2 + \
        "The river Alder is the longest river in the region."
    questions = ["Which river is the longest?",
                 "Describe in detail the course of the river, the towns and the buildings along it, "
                 "and say where the ferries leave for and what the old abbey is near, in full sentences."]
    params = SamplingParams(mode="penalty_sample", max_new_tokens=16, repeat_penalty=3.0, top_p=0.9, seed=11)
    qa = DocQA(model, PrefixCache(1 << 30), None, Limits(1000, 200, 1400), "ab" * 32)
    request = DocRequest(context, [QuestionRequest(q, params) for q in questions])
    doc = qa.answer(request.context, request.questions)
    prompt, _ = qa.prepare(request)
    ctx = prompt.context_ids.tolist()
    short, long = (q.tolist() for q in prompt.question_ids)
    assert len(short) < params.repeat_last_n < len(long)
    for q, ans in zip((short, long), doc.answers, strict=True):
        assert len(ans.token_ids) > 0
        assert replay(model, ctx, q, params, ans.token_ids, q) == ans.token_ids
    assert replay(model, ctx, short, params, doc.answers[0].token_ids, ctx + short) != doc.answers[0].token_ids
    clamped = params.model_copy(update={"repeat_last_n": len(short)})
    assert replay(model, ctx, long, clamped, doc.answers[1].token_ids, long) != doc.answers[1].token_ids


def replay(model: Model, ctx: list[int], q: list[int], params: SamplingParams, answer: list[int],
           history: list[int]) -> list[int]:
    """Sample as many tokens as `answer` has from the full prompt (one KV, no shared prefix), feeding
    back our own picks; the repetition penalty sees `history` + the picks."""
    kv = model.new_kv(len(ctx) + len(q) + len(answer))
    logits = model.prefill(ctx + q, kv)
    sampler, history, out = Sampler(params), list(history), []
    while len(out) < len(answer):
        tok = sampler.pick(logits, history)
        if tok in model.eos_ids:
            break
        out.append(tok)
        history.append(tok)
        logits = model.decode([tok], [(None, kv)])[0]
    return out
