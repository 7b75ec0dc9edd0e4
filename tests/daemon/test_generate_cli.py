"""`seqshare generate`: one prompt (--json through the installed console script), chat prompts as
transformers renders them, and document QA through one shared prefix (issue 5's CLI), which must
answer exactly like --no-reuse on the f32 path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tiny_models import make_model

from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.daemon.cli import cli
from seqshare.worker.chat import chat_ids, user_turn
from seqshare.worker.generate import generate
from seqshare.worker.model import Model
from seqshare.worker.params import SamplingParams

SINGLE_KEYS = {"text", "token_ids", "prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"}
ANSWER_KEYS = {"question", "text", "token_ids", "context_tokens", "question_tokens", "generated_tokens",
               "first_token_s", "total_s", "cache_hit", "finish_reason"}
DOCUMENT = (
    "The town of Kalomi was founded in 1342. It has 4200 inhabitants and trades mostly in salt. "
    "The town of Renvashi was founded in 1520. It has 880 inhabitants and trades mostly in amber. "
    "The town of Torbel was founded in 1711. It has 6100 inhabitants and trades mostly in wool. "
) * 3
QUESTIONS = ["When was Kalomi founded?", "What does Torbel trade in?", "How many people live in Renvashi?"]


def cli_run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_json_of_one_prompt_via_the_console_script(default_gguf: Path, q4_model: Model) -> None:
    seqshare = Path(sys.executable).with_name("seqshare")
    out = subprocess.run(
        [str(seqshare), "generate", str(default_gguf), "--prompt", "Name three primary colors.", "--chat",
         "--max-new-tokens", "12", "--threads", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    got = json.loads(out.stdout)
    assert set(got) >= SINGLE_KEYS
    ids = chat_ids(q4_model, "Name three primary colors.")
    want = generate(q4_model, ids, SamplingParams(max_new_tokens=12))  # the API the CLI wraps
    assert got["token_ids"] == want.token_ids and got["text"] == want.text
    assert got["prompt_tokens"] == len(ids) and 0 < len(got["token_ids"]) <= 12
    assert got["prefill_tokens_per_s"] > 0 and got["decode_tokens_per_s"] > 0
    assert 50 << 20 < got["peak_rss_bytes"] < 4 << 30  # the weights alone are ~95 MB


def test_chat_prompt_is_transformers_apply_chat_template(default_gguf: Path, q4_model: Model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    for text, system in (("Name three primary colors.", None), ("Hi there", "Answer briefly.")):
        ref = tok.apply_chat_template(user_turn(text, system), add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert chat_ids(q4_model, text, system) == list(ref)


def docqa(gguf: Path, doc: Path, *extra: str) -> dict[str, Any]:
    args = ["generate", str(gguf), "--quant", "f32", "--kv-dtype", "f32", "--threads", "2", "--context-file",
            str(doc), "--max-new-tokens", "16", "--json", *extra]
    for q in QUESTIONS:
        args += ["--question", q]
    res = cli_run(*args)
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.stdout))


def test_document_questions_shared_prefix_equals_no_reuse_f32(default_gguf: Path, tmp_path: Path) -> None:
    doc = tmp_path / "towns.txt"
    doc.write_text(DOCUMENT)
    shared = docqa(default_gguf, doc)
    alone = docqa(default_gguf, doc, "--no-reuse")
    for out in (shared, alone):
        assert {"answers", "prefix", "totals", "cache", "peak_rss_bytes"} <= set(out)
        assert [a["question"] for a in out["answers"]] == QUESTIONS
        for a in out["answers"]:
            assert set(a) >= ANSWER_KEYS
            assert 0 < a["generated_tokens"] == len(a["token_ids"]) <= 16
            # first_token_s is rounded to 0.1 ms: a fast machine may show 0.0
            assert a["first_token_s"] >= 0 and a["total_s"] >= a["first_token_s"] and a["cache_hit"] is False
        t = out["totals"]
        assert t["questions"] == 3 and t["generated_tokens"] == sum(a["generated_tokens"] for a in out["answers"])
        assert t["context_tokens"] == out["answers"][0]["context_tokens"] > 100
    assert [a["token_ids"] for a in shared["answers"]] == [a["token_ids"] for a in alone["answers"]]
    assert shared["prefix"]["status"] == "miss"
    assert shared["prefix"]["computed_tokens"] == shared["totals"]["context_tokens"]
    assert shared["cache"]["misses"] == 1 and shared["cache"]["entries"] == 1
    assert alone["prefix"]["status"] == "off" and alone["cache"]["misses"] == 0
    assert any("1342" in a["text"] for a in shared["answers"])  # the model did read the document


def test_document_answers_as_text(default_gguf: Path, tmp_path: Path) -> None:
    doc = tmp_path / "towns.txt"
    doc.write_text(DOCUMENT)
    res = cli_run("generate", str(default_gguf), "--context-file", str(doc), "--question", QUESTIONS[0],
                  "--question", QUESTIONS[1], "--max-new-tokens", "8", "--threads", "2")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"Q: {QUESTIONS[0]}\nA: ") and f"\n\nQ: {QUESTIONS[1]}\nA: " in res.stdout


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    make_model("qwen2", d)
    write_bundle(load_checkpoint(d, "f32"), d / "tiny.ssb", Limits(40, 16, 80))
    return d / "tiny.ssb"


@pytest.mark.parametrize(("args", "message"), [
    ((), "give --prompt, or --context-file"),
    (("--prompt", "x", "--question", "q"), "--question and --no-reuse go with --context-file"),
    (("--context-file", "DOC"), "needs at least one --question"),
    (("--context-file", "DOC", "--question", "q", "--prompt", "x"), "exclude each other"),
    (("--prompt", "x", "--quant", "int8"), "a bundle keeps its own"),
])
def test_usage_errors(tiny_bundle: Path, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.")
    res = cli_run("generate", str(tiny_bundle), *[str(doc) if a == "DOC" else a for a in args])
    assert res.exit_code == 2 and message in res.output


def test_document_over_share_length_is_a_named_error(tiny_bundle: Path, tmp_path: Path) -> None:
    doc = tmp_path / "long.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    res = cli_run("generate", str(tiny_bundle), "--context-file", str(doc), "--question", "Why?", "--raw")
    assert res.exit_code == 1 and "LimitExceededError" in res.output and "share_length limit of 40" in res.output
