"""The tokenizer built from GGUF metadata against transformers' own GGUF tokenizer.

One known difference: SmolLM2's GGUF says `tokenizer.ggml.pre = smollm`, which (in llama.cpp, and in
SmolLM2's original tokenizer.json) splits digits one by one *before* the GPT-2 byte-level split.
transformers' GGUF builder skips that step, which only matters where whitespace meets a numeric
character: "  1" is ["ĠĠ", "1"] in the original, ["Ġ", "Ġ", "1"] in transformers; " ²" is ["Ġ", "Â²"]
against ["ĠÂ", "²"]. So we check: equal to transformers wherever that pattern is absent, and equal
everywhere to transformers' tokenizer given SmolLM2's original pre-tokenizer.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from seqshare.bundle.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, build_tokenizer
from seqshare.bundle.import_gguf import metadata
from seqshare.worker.errors import UnsupportedArchitectureError

SAMPLE = [
    "Hello world! It's a test; we'll see: 3.14159, 1e-9, -42, 1,000,000 and 0x1F.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n-1) + fib(n-2)\n\n\tprint(fib(10))",
    "naïve café — Größe, 東京タワー, 北京, Привет мир, مرحبا, 🚀🔥👍🏽, ﬁ ligature,"
    " e\u0301, \u200b zero width",
    "  leading spaces\n\n\nmultiple\r\n\r\nlines   trailing   \t\t tabs ",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "price: $12.50 (was $15) — 20% off!! 2024-01-15T10:30:00Z, phone +1 (555) 010-9999",
    "x  1 y\t2 z\n3 w   44\n\n7",
    "SELECT * FROM t WHERE id IN (1, 2, 3) AND name LIKE '%a%';  -- comment",
    '<div class="a">&nbsp;</div>\n{"key": [1, 2.5e10, null, true]}',
    "I'M SHOUTING, they'RE not; DON'T. ¿Qué? «Ça va?» 1½ ² ³ ٣ ७",
    "   ",
    "",
    "a",
    "1234567890",
    " 1",
    "  1",
    "a\n\n1",
    "a \n1",
]


def space_before_number(s: str) -> bool:
    """Where the two splits can differ: a whitespace run of two or more before a numeric character
    (GPT-2 gives the last space to the number), or a space before a non-ASCII numeric character
    (the vocabulary has merges like "ĠÂ" but none like "Ġ1")."""
    for i, (a, b) in enumerate(itertools.pairwise(s)):
        if b.isnumeric() and a.isspace() and ((i > 0 and s[i - 1].isspace()) or not b.isascii()):
            return True
    return False


@pytest.fixture(scope="module")
def meta(default_gguf: Path) -> dict[str, Any]:
    return metadata(gguf.GGUFReader(default_gguf))


@pytest.fixture(scope="module")
def ours(meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_str(build_tokenizer(meta).to_str())


@pytest.fixture(scope="module")
def theirs(default_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


def test_matches_transformers_gguf_tokenizer(ours: Tokenizer, theirs: Any) -> None:
    plain = [s for s in SAMPLE if not space_before_number(s)]
    assert len(plain) >= 12
    for s in plain:
        assert ours.encode(s).ids == theirs(s)["input_ids"], s


def test_matches_transformers_with_the_original_pre_tokenizer(ours: Tokenizer, theirs: Any) -> None:
    backend = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for s in SAMPLE:
        assert ours.encode(s).ids == backend.encode(s).ids, s


def test_round_trip_and_special_tokens(ours: Tokenizer) -> None:
    for s in SAMPLE:
        assert ours.decode(ours.encode(s).ids, skip_special_tokens=False) == s
    ids = ours.encode("<|im_start|>user<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 3
    assert ours.encode("  1").tokens == ["ĠĠ", "1"]


def test_split_rules_match_the_reference_regexes() -> None:
    from transformers.integrations.gguf import gguf_tokenizer_mapping as ref

    assert QWEN2_SPLIT == ref._QWEN2_SPLIT and LLAMA3_SPLIT == ref._LLAMA3_SPLIT


def test_unknown_pre_tokenizer_and_model_are_refused(meta: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"pre-tokenizer 'mystery'.*smollm"):
        build_tokenizer({**meta, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(UnsupportedArchitectureError, match="tokenizer model 'llama'"):
        build_tokenizer({**meta, "tokenizer.ggml.model": "llama"})
