"""The tokenizer of a Hugging Face checkpoint directory: tokenizer.json plus the special tokens and
chat template from tokenizer_config.json, chat_template.jinja and generation_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from seqshare.worker.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class TokenizerFiles:
    json: str
    chat_template: str | None
    bos: int | None
    eos: tuple[int, ...]
    pad: int | None
    add_bos: bool


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _template(root: Path, tcfg: dict[str, Any]) -> str | None:
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    t = tcfg.get("chat_template") or _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(t, list):  # named templates: take the default one
        t = next((x["template"] for x in t if x.get("name") == "default"), None)
    return t


def _ids(v: Any) -> list[int]:
    return [] if v is None else [int(x) for x in v] if isinstance(v, list) else [int(v)]


def load_tokenizer_files(root: Path, cfg: dict[str, Any]) -> TokenizerFiles:
    path = root / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedArchitectureError(
            f"{root} has no tokenizer.json (a fast tokenizer file is required next to the weights)"
        )
    text = path.read_text()
    tok = Tokenizer.from_str(text)
    tcfg = _read_json(root / "tokenizer_config.json")
    gen = _read_json(root / "generation_config.json")

    def tid(name: str) -> int | None:
        s = _content(tcfg.get(name))
        return tok.token_to_id(s) if s else None

    bos = tid("bos_token")
    bos = bos if bos is not None else next(iter(_ids(gen.get("bos_token_id", cfg.get("bos_token_id")))), None)
    eos = [*_ids(gen.get("eos_token_id")), *([tid("eos_token")] if tid("eos_token") is not None else [])]
    pad = tid("pad_token")
    return TokenizerFiles(
        json=text,
        chat_template=_template(root, tcfg),
        bos=bos,
        eos=tuple(dict.fromkeys(e for e in eos if e is not None)),
        pad=pad if pad is not None else next(iter(_ids(gen.get("pad_token_id"))), None),
        add_bos=bool(tcfg.get("add_bos_token", False)),
    )
