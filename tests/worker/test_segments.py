"""Splitting a request into context and questions, the context hash, and the admission limits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from seqshare.bundle.convert import Checkpoint, load_checkpoint
from seqshare.bundle.format import Limits
from seqshare.worker.errors import LimitExceededError, PromptSplitError
from seqshare.worker.segments import (
    RAW_TEMPLATE_ID,
    check_limits,
    context_hash,
    render,
    segment,
    split_chat,
    template_identity,
    tokenizer_identity,
)

SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
DOC = "The lighthouse keeper logged 42 ships in March.\nMost came from the north."


@pytest.fixture(scope="module")
def ck(default_gguf: Path) -> Checkpoint:
    return load_checkpoint(default_gguf)


@pytest.fixture(scope="module")
def tok(ck: Checkpoint) -> Tokenizer:
    return Tokenizer.from_str(ck.tokenizer_json)


def test_split_is_exactly_the_templates_rendering(ck: Checkpoint) -> None:
    assert ck.chat_template is not None
    questions = ["How many ships?", "From where did most come?"]
    ctx, qs = split_chat(ck.chat_template, DOC, questions, SPECIAL)
    for q, part in zip(questions, qs, strict=True):
        full = render(ck.chat_template, [{"role": "user", "content": DOC + "\n\n" + q}], SPECIAL)
        assert ctx + part == full
        assert part == "\n\n" + q + "<|im_end|>\n<|im_start|>assistant\n"
    # The seed's cut: system prompt + user-turn opening + document in the shared part.
    assert ctx.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert ctx.endswith("<|im_start|>user\n" + DOC)


def test_split_with_messages_and_system(ck: Checkpoint) -> None:
    assert ck.chat_template is not None
    msgs = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": DOC}]
    ctx, parts = split_chat(ck.chat_template, msgs, ["Why?"], SPECIAL)
    assert len(parts) == 1
    assert ctx.startswith("<|im_start|>system\nAnswer tersely.<|im_end|>\n<|im_start|>user\n")
    same, _ = split_chat(ck.chat_template, DOC, ["Why?"], SPECIAL, system="Answer tersely.")
    assert same == ctx
    with pytest.raises(PromptSplitError, match="last message"):
        split_chat(ck.chat_template, [{"role": "system", "content": "x"}], ["q"], SPECIAL)


def test_template_that_repeats_the_turn_is_refused() -> None:
    twice = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(PromptSplitError, match="exactly once"):
        split_chat(twice, DOC, ["q"], {})


def test_segment_tokenizes_parts_separately(ck: Checkpoint, tok: Tokenizer) -> None:
    p = segment(tok, DOC, ["How many ships?", "Where from?"], ck.chat_template, SPECIAL)
    assert p.context_ids.dtype == np.int32 and len(p.question_ids) == 2
    assert p.context_ids.tolist() == tok.encode(p.context_text, add_special_tokens=False).ids
    assert p.question_ids[0].tolist() == tok.encode(p.question_texts[0], add_special_tokens=False).ids
    assert tok.decode(p.context_ids.tolist() + p.question_ids[1].tolist(), skip_special_tokens=False) \
        == p.context_text + p.question_texts[1]
    assert p.template_id == template_identity(ck.chat_template) != RAW_TEMPLATE_ID


def test_raw_segments_and_errors(tok: Tokenizer) -> None:
    p = segment(tok, "Plain context.", [" Question one?"])
    assert p.context_text == "Plain context." and p.template_id == RAW_TEMPLATE_ID
    with pytest.raises(PromptSplitError, match="empty"):
        segment(tok, "", ["q"])
    with pytest.raises(PromptSplitError, match="question 1 is empty"):
        segment(tok, "ctx", ["q", ""])
    with pytest.raises(PromptSplitError, match="plain text"):
        segment(tok, [{"role": "user", "content": "x"}], ["q"])


def test_context_hash_inputs_and_stability(tok: Tokenizer) -> None:
    ids = np.arange(100, 200, dtype=np.int32)
    tid = tokenizer_identity(tok)
    h = context_hash("d" * 64, tid, "raw", ids)
    assert len(h) == 64 and h == context_hash("d" * 64, tid, "raw", ids.astype(np.int64).tolist())  # type: ignore[arg-type]
    changed = ids.copy()
    changed[-1] += 1
    variants = {
        context_hash("e" * 64, tid, "raw", ids),
        context_hash("d" * 64, "x" + tid[1:], "raw", ids),
        context_hash("d" * 64, tid, template_identity("t"), ids),
        context_hash("d" * 64, tid, "raw", changed),
        context_hash("d" * 64, tid, "raw", ids[:-1]),
        context_hash("d" * 64, tid, "raw", ids, cache_salt="tenant-a"),
        context_hash("d" * 64, tid, "raw", ids, cache_salt=""),
    }
    assert h not in variants and len(variants) == 7
    # Another process (another hash seed) computes the same digest.
    code = ("import numpy as np; from seqshare.worker.segments import context_hash; "
            f"print(context_hash('d'*64, '{tid}', 'raw', np.arange(100, 200, dtype=np.int32)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == h


def test_tokenizer_identity_equal_for_equal_tokenizers(ck: Checkpoint, tok: Tokenizer) -> None:
    assert tokenizer_identity(tok) == tokenizer_identity(Tokenizer.from_str(ck.tokenizer_json))


@pytest.mark.parametrize(("n_ctx", "q", "new", "limit", "excess"), [
    (101, 5, 5, "share_length", 1),
    (100, 21, 5, "unshare_length", 1),
    (100, 20, 31, "seq_length", 1),
    (50, 20, 90, "seq_length", 10),
])
def test_limits_name_the_limit_and_the_excess(n_ctx: int, q: int, new: int, limit: str, excess: int) -> None:
    limits = Limits(share_length=100, unshare_length=20, seq_length=150)
    check_limits(limits, 100, [20, 1], [30, 49])  # exactly at every limit: fine
    with pytest.raises(LimitExceededError) as ei:
        check_limits(limits, n_ctx, [1, q], [1, new])
    assert ei.value.limit == limit and ei.value.value - ei.value.maximum == excess
    assert limit in str(ei.value) and f"by {excess}" in str(ei.value)
