"""Tiny random checkpoints made in-process by transformers (no hub), with a small trained BPE
tokenizer, for the bundle tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)


def write_tokenizer(d: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog. 0123456789 def f(x): return x"] * 50
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(d / "tokenizer.json"))
    cfg = {
        "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>",
        "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_model(
    kind: str, d: Path, dtype: torch.dtype = torch.float32, tie: bool = False, **over: Any
) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=tie, **(COMMON | over))
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=tie, **(COMMON | over))
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        cfg = tf.Qwen3Config(num_key_value_heads=2, head_dim=32, tie_word_embeddings=tie, **(COMMON | over))
        model = tf.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # random biases / norms, so a mix-up of them cannot go unnoticed
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(d)
    write_tokenizer(d)
    return model
