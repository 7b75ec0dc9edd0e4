"""Chat prompts from the bundle's template, rendered by transformers' chat-template machinery (the
same sandboxed jinja environment `apply_chat_template` uses), and tokenized without adding special
tokens again (the template writes them as text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from seqshare.worker.errors import NoChatTemplateError

Message = dict[str, Any]


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def of(cls, template: str | None, tokenizer: Tokenizer, bos: int | None, eos: tuple[int, ...]) -> ChatTemplate:
        if not template:
            raise NoChatTemplateError("this model has no chat template; drop --chat and give a raw prompt")
        name = tokenizer.id_to_token
        return cls(template, name(bos) if bos is not None else None, name(eos[0]) if eos else None)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered = render_jinja_template(
            [messages],
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return str(rendered[0][0])  # (renderings, generation indices)


def user_turn(text: str, system: str | None = None) -> list[Message]:
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": text}]


def chat_ids(model: Any, text: str, system: str | None = None) -> list[int]:
    """Token ids of `text` as one user turn followed by the assistant's opening."""
    st = model.special_tokens
    tmpl = ChatTemplate.of(model.chat_template, model.tokenizer, st.bos, tuple(st.eos))
    return list(model.tokenizer.encode(tmpl.render(user_turn(text, system)), add_special_tokens=False).ids)
