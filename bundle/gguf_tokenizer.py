"""Build a `tokenizers` tokenizer from GGUF metadata (byte-level BPE, `tokenizer.ggml.model = gpt2`).

A GGUF carries no tokenizer.json: only the vocabulary, the merges, token types and the name of the
pre-tokenizer (`tokenizer.ggml.pre`). The pre-tokenizer names are llama.cpp's; each stands for a
split rule that the vocabulary's merges were learned with, which we restate here:

  smollm, starcoder, refact, ...   digits one by one, then the GPT-2 byte-level split
  qwen2, deepseek-r1-qwen          Qwen2's split regex (single digits, newline runs)
  llama-bpe (Llama 3), dbrx, ...   Llama 3's split regex (digits in runs of up to three)
  default, gpt2, gpt-2             the GPT-2 byte-level split

Token types 3 (control) become special added tokens, 4 (user-defined) plain added tokens, so both
are matched whole in the text, as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from seqshare.worker.errors import UnsupportedArchitectureError

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_QWEN2 = {"qwen2", "deepseek-r1-qwen", "megrez"}
_LLAMA3 = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"}
_GPT2 = {"default", "gpt2", "gpt-2"}
SUPPORTED_PRE = sorted(_DIGITS_THEN_GPT2 | _QWEN2 | _LLAMA3 | _GPT2)
CONTROL, USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _QWEN2 or pre in _LLAMA3:
        split = QWEN2_SPLIT if pre in _QWEN2 else LLAMA3_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise UnsupportedArchitectureError(
        f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})"
    )


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer the GGUF metadata describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == USER_DEFINED
        ]
    )
    tok.post_processor = _post_processor(meta, tokens)
    return tok


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)
    pre = [f"{tokens[int(bos)]}:0"] if add_bos and bos is not None else []
    post = [f"{tokens[int(eos)]}:0"] if add_eos and eos is not None else []
    specials = [
        (tokens[i], i)
        for i in {bos, eos}
        if i is not None and ((i == bos and add_bos) or (i == eos and add_eos))
    ]
    single = " ".join([*pre, "$A:0", *post])
    pair = " ".join([*pre, "$A:0", *post, *pre, "$B:1", *post])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_tokenizer_json(meta: dict[str, Any]) -> str:
    return build_tokenizer(meta).to_str()
