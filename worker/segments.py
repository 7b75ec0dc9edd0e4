"""A request as the seed splits it: one shared context and, per question, its own unshared part.

With a chat template: context = system prompt + user-turn opening + document; question = separator
+ question text + end of user turn + assistant opening. The context ends exactly where the document
does, so a document with text appended later extends the cached context (partial reuse). The cut is
found by rendering the whole conversation with a sentinel between document and question, so context text + question text
is exactly the template's rendering of the conversation (checked). Without a template the caller's
context and question strings are used as they are.

Context and questions are tokenized separately (positions of a question continue at the context's
length). The context hash binds everything that determines the prefix KV: weight digest, tokenizer
and template identity, the context token ids and an optional tenant salt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from seqshare.worker.errors import LimitExceededError, PromptSplitError

SEPARATOR = "\n\n"  # between the document and the question inside the user turn (question side)
_SENTINEL = "\x00seqshare-cut\x00"
RAW_TEMPLATE_ID = "raw"


class LimitsLike(Protocol):
    @property
    def share_length(self) -> int: ...
    @property
    def unshare_length(self) -> int: ...
    @property
    def seq_length(self) -> int: ...


@dataclass(frozen=True)
class Prompt:
    """The token ids of one request, split."""

    context_text: str
    question_texts: list[str]
    context_ids: np.ndarray  # (n,) int32
    question_ids: list[np.ndarray]  # each (m_i,) int32
    template_id: str  # RAW_TEMPLATE_ID or the SHA-256 of the chat template used


def _messages(context: str | Sequence[Any], system: str | None) -> list[dict[str, str]]:
    if isinstance(context, str):
        opening = [{"role": "system", "content": system}] if system is not None else []
        return [*opening, {"role": "user", "content": context}]
    items: Sequence[Any] = context
    msgs: list[dict[str, Any]] = [m.model_dump() if hasattr(m, "model_dump") else dict(m) for m in items]
    if system is not None:
        raise PromptSplitError("give the system prompt either as a message or as `system`, not both")
    if not msgs or msgs[-1].get("role") != "user":
        raise PromptSplitError("the last message of the context must be the user turn holding the document")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]


def render(template: str, messages: list[dict[str, str]], special: Mapping[str, str | None]) -> str:
    """The template's text for `messages` with the assistant opening (transformers' renderer)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs: dict[str, Any] = {k: v for k, v in special.items() if v is not None}
    rendered = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **kwargs)
    return str(rendered[0][0])  # (renderings, generation indices)


def split_chat(template: str, context: str | Sequence[Any], questions: Sequence[str],
               special: Mapping[str, str | None] | None = None, system: str | None = None,
               separator: str = SEPARATOR) -> tuple[str, list[str]]:
    """(context text, [question text]) whose concatenations are the template's renderings."""
    special = special or {}
    base = _messages(context, system)
    opening, document = base[:-1], base[-1]["content"]
    context_text: str | None = None
    parts = []
    for q in questions:
        def convo(cut: str, q: str = q) -> list[dict[str, str]]:
            return [*opening, {"role": "user", "content": document + cut + separator + q}]

        marked = render(template, convo(_SENTINEL), special)
        if marked.count(_SENTINEL) != 1:
            raise PromptSplitError("the chat template does not render the user turn exactly once")
        head, tail = marked.split(_SENTINEL)
        if head + tail != render(template, convo(""), special):
            raise PromptSplitError("the chat template renders the document differently when a question follows")
        if context_text is not None and head != context_text:
            raise PromptSplitError("the chat template renders the shared context differently per question")
        context_text = head
        parts.append(tail)
    if context_text is None:  # no question: the context alone (e.g. to warm the cache)
        marked = render(template, [*opening, {"role": "user", "content": document + _SENTINEL}], special)
        context_text = marked.split(_SENTINEL)[0]
    return context_text, parts


class _Encoder(Protocol):
    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...


def encode(tokenizer: _Encoder, text: str, add_special_tokens: bool) -> np.ndarray:
    """Token ids of `text` from a `tokenizers.Tokenizer` or a transformers tokenizer."""
    out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = out.ids if hasattr(out, "ids") else out
    return np.asarray(ids, dtype=np.int32)


def tokenizer_identity(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's canonical JSON (equal for bundles of one checkpoint)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def template_identity(template: str | None) -> str:
    return RAW_TEMPLATE_ID if template is None else hashlib.sha256(template.encode()).hexdigest()


def segment(tokenizer: _Encoder, context: str | Sequence[Any], questions: Sequence[str],
            template: str | None = None, special: Mapping[str, str | None] | None = None,
            system: str | None = None) -> Prompt:
    """Split and tokenize one request. `template=None` means raw: strings are used as given."""
    if template is not None:
        ctx_text, q_texts = split_chat(template, context, questions, special, system)
        # The rendering holds any BOS the template wants; the tokenizer must not add another.
        ctx_ids = encode(tokenizer, ctx_text, add_special_tokens=False)
    else:
        if not isinstance(context, str) or system is not None:
            raise PromptSplitError("without a chat template the context must be plain text (no messages)")
        ctx_text, q_texts = context, list(questions)
        ctx_ids = encode(tokenizer, ctx_text, add_special_tokens=True)
    if len(ctx_ids) == 0:
        raise PromptSplitError("the context is empty: there is nothing to share")
    q_ids = [encode(tokenizer, q, add_special_tokens=False) for q in q_texts]
    for i, ids in enumerate(q_ids):
        if len(ids) == 0:
            raise PromptSplitError(f"question {i} is empty")
    return Prompt(ctx_text, q_texts, ctx_ids, q_ids, template_identity(template))


def context_hash(weight_digest: str, tokenizer_id: str, template_id: str, context_ids: np.ndarray,
                 cache_salt: str | None = None) -> str:
    """Stable across processes and restarts: a length-prefixed SHA-256 of every input."""
    h = hashlib.sha256(b"seqshare-context-v1\0")
    salt = b"" if cache_salt is None else b"\1" + cache_salt.encode()
    for part in (weight_digest.encode(), tokenizer_id.encode(), template_id.encode(), salt):
        h.update(len(part).to_bytes(8, "little") + part)
    ids = np.ascontiguousarray(context_ids, dtype="<i4")
    h.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return h.hexdigest()


def check_limits(limits: LimitsLike, n_context: int, question_lens: Sequence[int],
                 max_new_tokens: Sequence[int]) -> None:
    """Raise LimitExceededError naming the first limit a request breaks; nothing is truncated."""
    if n_context > limits.share_length:
        raise LimitExceededError("share_length", n_context, limits.share_length, "the context")
    for i, (n_q, n_new) in enumerate(zip(question_lens, max_new_tokens, strict=True)):
        if n_q > limits.unshare_length:
            raise LimitExceededError("unshare_length", n_q, limits.unshare_length, f"question {i}")
        total = n_context + n_q + n_new
        if total > limits.seq_length:
            raise LimitExceededError("seq_length", total, limits.seq_length,
                                     f"context + question {i} + max_new_tokens")
