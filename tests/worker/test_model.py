"""The engine against independent references.

- f32 bundle of the default model vs transformers on the same GGUF (dequantized by transformers):
  logits at every position of three prompts, and 64 greedy tokens.
- Random tiny Qwen2 (q/k/v bias) and Qwen3 (q/k norm) made here by transformers: the same bounds.
- int8 / int4 bundles vs the f32 bundle over teacher-forced positions.
- Batch decode (and decode against a shared prefix) vs each sequence decoded alone, f32 and Q4_1.
- Golden: the shipped Q4_1 model at greedy answers a fixed chat prompt with llama.cpp's text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import make_model

from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.bundle.loader import load_bundle
from seqshare.worker.answer import STOP_EOS
from seqshare.worker.chat import chat_ids
from seqshare.worker.generate import generate
from seqshare.worker.model import Model
from seqshare.worker.params import SamplingParams

# Named bounds (from issue 4). Relative error = max |ours - ref| / max |ref|, per position.
LOGITS_RTOL = 1e-4  # f32 weights, f32 KV vs transformers float32
GREEDY_TOKENS = 64
QUANT_TOP1_MIN = 0.97  # int8/int4 argmax agreement with the f32 bundle, teacher-forced
QUANT_COSINE_MIN = 0.995  # mean cosine of int8/int4 logits with the f32 bundle's
BATCH_RTOL_F32 = 1e-5  # a sequence decoded in a batch vs alone (f32 weights and KV)

SHORT = "Question: what is the capital of France? Answer:"
MEDIUM = (
    "The lighthouse keeper woke before dawn, as he had every day for thirty years. He climbed the narrow "
    "stairs, trimmed the wick and polished the great lens until it shone. Outside, the sea was calm and grey, "
    "and a few fishing boats were already heading out past the rocks. His daughter had written from the city: "
    "she would come home in the spring, bringing her two children, who had never seen the ocean. He read the "
    "letter twice, folded it carefully and put it in the drawer with the others. In the afternoon he walked "
    "along the cliffs to the village, bought bread, coffee and a newspaper, and listened to the baker complain "
    "about the price of flour. The wind was rising when he returned, and by evening a storm had gathered. "
    "He lit the lamp early. All night the beam swept across the water, and all night he sat by the window, "
    "watching for ships in trouble and thinking about the years that had passed so quickly."
)
LONG_TOKENS = 700

# Golden answer of the default Q4_1 GGUF, quant keep, f16 KV, greedy, to GOLDEN_PROMPT as one chat user
# turn (the GGUF's template, no system message; chat_ids renders it). Obtained once from llama.cpp, not
# from seqshare: llama-cpp-python 0.3.36, Llama(model_path=<the GGUF>, n_ctx=512, n_threads=2,
# logits_all=True), eval(the same prompt token ids), then argmax of the last logits, eval(token), until
# EOS (21 tokens). test_golden_text_is_llama_cpp_greedy (slow) re-derives it. The prompt was picked
# because both engines agree on it with a margin: of 9 short chat prompts tried, 4-5 gave the same
# greedy answer in both engines (4 with the first kernels, 5 after the q4 panel rewrite); on this one
# the smallest top-1/top-2 logit gap along the answer is 0.22-0.34 (seqshare) and 0.21 (llama.cpp). On
# the others the engines part at a near tie (gaps of 0.001-0.07 logits): int8-activation rounding
# noise, which both engines have (each is ~96% top-1 against f32 on teacher-forced text).
GOLDEN_PROMPT = "Name three primary colors."
GOLDEN_TEXT = "The primary colors are:\n\nRed (R)\nBlue (B)\nYellow (Y)"


def gazetteer(n_facts: int) -> str:
    """A made-up document (nothing is downloaded)."""
    rng = np.random.default_rng(4)
    syll = ["ka", "lo", "mi", "ren", "tor", "va", "shi", "bel", "dun", "ar", "os", "qui"]
    goods = ["salt", "copper", "wool", "amber", "glass", "honey", "timber", "silk"]
    facts = []
    for _ in range(n_facts):
        town = "".join(rng.choice(syll, 3)).capitalize()
        facts.append(f"The town of {town} was founded in {int(rng.integers(1100, 1900))}. It has "
                     f"{int(rng.integers(200, 9000))} inhabitants and trades mostly in {rng.choice(goods)}.")
    return " ".join(facts)


def all_logits(model: Model, ids: np.ndarray) -> np.ndarray:
    """Logits (S, vocab) of every position, prefilled in the model's chunks (float64)."""
    kv = model.new_kv(len(ids))
    out = []
    for s in range(0, len(ids), model.chunk):
        part = np.asarray(ids[s : s + model.chunk], dtype=np.int32)
        out.append(model.forward(part, [(None, kv, part.size)], np.arange(part.size, dtype=np.int32)))
    return np.concatenate(out).astype(np.float64)


def hf_logits(hf: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids, dtype=np.int64)[None])).logits[0].double().numpy()


def hf_greedy(hf: Any, ids: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
    new = out[0, len(ids) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def rel_err_per_position(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)


# --- the default model, f32 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_default(default_gguf: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def bundles(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """f32, int8 and int4 bundles of the default model (int8/int4 re-quantize its dequantized weights)."""
    d = tmp_path_factory.mktemp("bundles")
    out = {}
    for quant in ("f32", "int8", "int4"):
        ck = load_checkpoint(default_gguf, quant)
        out[quant] = d / f"{quant}.ssb"
        write_bundle(ck, out[quant], Limits.default(ck.context_length))
    return out


@pytest.fixture(scope="module")
def f32_model(bundles: dict[str, Path]) -> Model:
    return Model(load_bundle(bundles["f32"], share=False), threads=2, kv_dtype="f32")


@pytest.fixture(scope="module")
def prompts(f32_model: Model) -> dict[str, np.ndarray]:
    long = f32_model.encode(gazetteer(60))
    assert len(long) >= LONG_TOKENS
    ids = {"short": f32_model.encode(SHORT), "medium": f32_model.encode(MEDIUM), "long": long[:LONG_TOKENS]}
    assert len(ids["short"]) < 16 and 180 < len(ids["medium"]) < 250
    return {k: np.asarray(v, dtype=np.int32) for k, v in ids.items()}


@pytest.mark.parametrize("which", ["short", "medium", "long"])
def test_f32_logits_match_transformers(which: str, f32_model: Model, hf_default: Any,
                                       prompts: dict[str, np.ndarray]) -> None:
    ids = prompts[which]
    ours = all_logits(f32_model, ids)
    ref = hf_logits(hf_default, ids)
    assert ours.shape == ref.shape == (len(ids), f32_model.spec.vocab_size)
    err = rel_err_per_position(ours, ref)
    assert err.max() <= LOGITS_RTOL, f"worst position {int(err.argmax())}: {err.max():.2e}"
    last = f32_model.prefill(ids, f32_model.new_kv(len(ids)))  # the engine's own prefill path
    assert last is not None and rel_err_per_position(last[None], ref[-1:])[0] <= LOGITS_RTOL


def test_f32_greedy_tokens_match_transformers(f32_model: Model, hf_default: Any) -> None:
    ids = chat_ids(f32_model, "List the days of the week.")
    ours = generate(f32_model, ids, SamplingParams(max_new_tokens=GREEDY_TOKENS))
    assert len(ours.token_ids) == GREEDY_TOKENS
    assert ours.token_ids == hf_greedy(hf_default, ids, GREEDY_TOKENS, f32_model.eos_ids)


# --- random tiny Qwen2 / Qwen3 -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_tiny_models_match_transformers(kind: str, tmp_path: Path) -> None:
    hf = make_model(kind, tmp_path).eval()
    ck = load_checkpoint(tmp_path, "f32")
    assert (ck.spec.qkv_bias, ck.spec.qk_norm) == (kind == "qwen2", kind == "qwen3")
    model = Model(ck, threads=2, kv_dtype="f32", chunk=64)  # chunk 64: the long prompt spans chunks
    rng = np.random.default_rng(1)
    for n in (10, 60, 180):
        ids = rng.integers(3, ck.spec.vocab_size, n).astype(np.int32)
        err = rel_err_per_position(all_logits(model, ids), hf_logits(hf, ids))
        assert err.max() <= LOGITS_RTOL, f"{kind} n={n}: {err.max():.2e}"
    prompt = rng.integers(3, ck.spec.vocab_size, 20).tolist()
    ours = generate(model, prompt, SamplingParams(max_new_tokens=GREEDY_TOKENS))
    assert ours.token_ids == hf_greedy(hf, prompt, GREEDY_TOKENS, model.eos_ids)
    assert len(ours.token_ids) >= 32  # a real comparison, not an immediate EOS


# --- int8 / int4 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_forced(f32_model: Model, prompts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: all_logits(f32_model, ids) for k, ids in prompts.items()}


def quant_agreement(path: Path, prompts: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[float, float]:
    model = Model(load_bundle(path, share=False), threads=2, kv_dtype="f32")
    got = np.concatenate([all_logits(model, prompts[k]) for k in prompts])
    want = np.concatenate([ref[k] for k in prompts])
    top1 = float(np.mean(got.argmax(1) == want.argmax(1)))
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return top1, float(cos.mean())


@pytest.fixture(scope="module")
def agreement(bundles: dict[str, Path], prompts: dict[str, np.ndarray],
              teacher_forced: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    return {q: quant_agreement(bundles[q], prompts, teacher_forced) for q in ("int8", "int4")}


# What it took to meet these bounds (measured on these prompts):
# - int8: q8 weights take int16 activations (int8 activations flipped near-tie argmaxes: top-1
#   0.962 where the same weights in exact float arithmetic give 0.986).
# - int4: the tied embedding / output head stays q8 (at 4 bits it alone gives top-1 0.81).
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_cosine(quant: str, agreement: dict[str, tuple[float, float]]) -> None:
    top1, cos = agreement[quant]
    assert cos >= QUANT_COSINE_MIN, f"{quant}: mean cosine {cos:.5f} (top-1 {top1:.4f})"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_top1_agreement(quant: str, agreement: dict[str, tuple[float, float]]) -> None:
    top1, cos = agreement[quant]
    assert top1 >= QUANT_TOP1_MIN, f"{quant}: top-1 {top1:.4f} (mean cosine {cos:.5f})"


# --- batch decode ---------------------------------------------------------------------------------------
# The shipped Q4_1 model is held to the f32 bound too: the q4 kernels read one panel layout for any
# number of tokens, so a row's result does not depend on the batch (bundle/quant.py), and the int8
# activation rounding would otherwise amplify last-bit differences into ~1e-2 (measured before).
@pytest.mark.parametrize("which", ["f32", "q4_1"])
def test_batch_decode_equals_each_alone(which: str, request: pytest.FixtureRequest,
                                        prompts: dict[str, np.ndarray]) -> None:
    """Four sequences of different lengths, two of them on one shared prefix KV (read once per step
    and merged by log-sum-exp), decoded together, against each decoded alone on its full prompt."""
    m: Model = request.getfixturevalue("f32_model" if which == "f32" else "q4_model")
    steps = 6
    long = prompts["long"]
    prefix_ids, tails = long[:300], [long[300:310], long[400:437]]
    alone_prompts = [prompts["short"], prompts["medium"], *[np.concatenate([prefix_ids, t]) for t in tails]]
    forced = np.random.default_rng(0).integers(0, m.spec.vocab_size, (4, steps)).astype(np.int32)

    def alone(ids: np.ndarray, toks: np.ndarray) -> np.ndarray:
        kv = m.new_kv(len(ids) + steps)
        m.prefill(ids, kv, want_logits=False)
        return np.stack([m.decode([t], [(None, kv)])[0] for t in toks])

    want = np.stack([alone(p, f) for p, f in zip(alone_prompts, forced, strict=True)], axis=1)
    prefix = m.new_kv(len(prefix_ids))
    m.prefill(prefix_ids, prefix, want_logits=False)
    seqs = []
    for pre, ids in ((None, prompts["short"]), (None, prompts["medium"]), (prefix, tails[0]), (prefix, tails[1])):
        kv = m.new_kv(len(ids) + steps, start=0 if pre is None else pre.length)
        m.prefill(ids, kv, prefix=pre, want_logits=False)
        seqs.append((pre, kv))
    got = np.stack([m.decode(forced[:, s], seqs) for s in range(steps)])  # (steps, 4, vocab)
    err = np.abs(got - want).max(axis=(0, 2)) / np.abs(want).max(axis=(0, 2))
    assert err.max() <= BATCH_RTOL_F32, f"per sequence: {err}"


# --- golden ----------------------------------------------------------------------------------------------
def test_golden_q4_chat_answer(q4_model: Model) -> None:
    gen = generate(q4_model, chat_ids(q4_model, GOLDEN_PROMPT), SamplingParams(max_new_tokens=64))
    assert gen.text == GOLDEN_TEXT
    assert gen.stop_reason == STOP_EOS and len(gen.token_ids) == 21


@pytest.mark.slow
def test_golden_text_is_llama_cpp_greedy(q4_model: Model, default_gguf: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-derives GOLDEN_TEXT with llama.cpp, the way it was first obtained."""
    llama_cpp = pytest.importorskip("llama_cpp")
    # llama.cpp's plain CPU path, where GOLDEN_TEXT came from: x86 has no repack for Q4_1, so only
    # an AMX CPU takes another one (its extra buffer types), and there llama-cpp-python built by gcc 12
    # crashes (SIGSEGV on ldtilecfg, BENCHMARKS.md). Llama() has no argument for this.
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def plain_cpu_params() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_cpu_params)
    llm = llama_cpp.Llama(model_path=str(default_gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    ids = chat_ids(q4_model, GOLDEN_PROMPT)
    llm.eval(ids)
    answer: list[int] = []
    while len(answer) < 64:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in q4_model.eos_ids:
            break
        answer.append(tok)
        llm.eval([tok])
    assert q4_model.decode_text(answer) == GOLDEN_TEXT


@pytest.mark.slow
def test_f32_logits_match_transformers_across_many_chunks(f32_model: Model, hf_default: Any) -> None:
    ids = np.asarray(f32_model.encode(gazetteer(200))[:2000], dtype=np.int32)
    err = rel_err_per_position(all_logits(f32_model, ids), hf_logits(hf_default, ids))
    assert err.max() <= LOGITS_RTOL, f"worst position {int(err.argmax())}: {err.max():.2e}"


def test_weight_names_are_a_checked_contract(default_gguf: Path) -> None:
    """The native model takes exactly the names bundle/spec.py's tensor_names() lists: a missing or an
    unknown one is refused by name, never left unused."""
    from seqshare import _native
    from seqshare.worker.model import native_weights

    ck = load_checkpoint(default_gguf, "keep")
    weights = native_weights(ck.tensors)
    assert sorted(weights) == sorted(ck.spec.tensor_names())
    config = ck.spec.to_dict()
    with pytest.raises(ValueError, match=r"weight 'layers\.3\.extra' is not one this architecture has"):
        _native.Model(config, {**weights, "layers.3.extra": weights["norm"]}, 8)
    del weights["layers.7.wk"]
    with pytest.raises(ValueError, match=r"weight 'layers\.7\.wk' is missing"):
        _native.Model(config, weights, 8)
