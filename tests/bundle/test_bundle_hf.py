"""HF checkpoint import: tiny random Llama / Qwen2 / Qwen3 made by transformers, and Qwen v1's fused
layout synthesised from a Qwen2 one; refusal of other architectures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import COMMON, TEMPLATE, make_model, write_tokenizer
from tokenizers import Tokenizer

from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.bundle.loader import bundle_info, load_bundle
from seqshare.bundle.quant import dequantize
from seqshare.worker.errors import UnsupportedArchitectureError


def canonical_from_hf(sd: dict[str, torch.Tensor], name: str) -> np.ndarray:
    m = {
        "attn_norm": "input_layernorm.weight",
        "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight",
        "wv": "self_attn.v_proj.weight",
        "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias",
        "q_norm": "self_attn.q_norm.weight",
        "k_norm": "self_attn.k_norm.weight",
        "wo": "self_attn.o_proj.weight",
        "ffn_norm": "post_attention_layernorm.weight",
        "w_gate": "mlp.gate_proj.weight",
        "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight",
    }
    g = {
        "tok_embeddings": "model.embed_tokens.weight",
        "norm": "model.norm.weight",
        "output": "lm_head.weight",
    }
    if name in g:
        key = g[name]
    else:
        _, i, k = name.split(".")
        key = f"model.layers.{i}.{m[k]}"
    return sd[key].float().numpy()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_hf_import_f32_is_exact(kind: str, tmp_path: Path) -> None:
    model = make_model(kind, tmp_path)
    ck = load_checkpoint(tmp_path, "f32")
    s = ck.spec
    assert s.arch == kind and s.qkv_bias == (kind == "qwen2") and s.qk_norm == (kind == "qwen3")
    assert s.head_dim == (32 if kind == "qwen3" else 16) and s.num_kv_heads == 2
    sd = model.state_dict()
    for name, t in ck.iter_tensors():
        assert np.array_equal(
            dequantize(t) if len(t.shape) == 2 else t.planes["data"], canonical_from_hf(sd, name)
        )
    assert ck.special_tokens.eos[0] == 2 and ck.chat_template == TEMPLATE
    assert Tokenizer.from_str(ck.tokenizer_json).encode("the lazy fox").ids


def test_bf16_keep_is_bit_exact_and_ties_stay_tied(tmp_path: Path) -> None:
    model = make_model("qwen2", tmp_path, torch.bfloat16, tie=True)
    ck = load_checkpoint(tmp_path, "keep")
    assert ck.spec.tie_embeddings and "output" not in ck.tensors
    emb = ck.tensors["tok_embeddings"]
    assert emb.fmt == "bf16"
    ref = model.state_dict()["model.embed_tokens.weight"].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(emb.planes["data"], ref)


def test_qwen_v1_fused_layout_maps_exactly(tmp_path: Path) -> None:
    """Qwen-7B (v1) has no transformers class: build its layout from a Qwen2 model (no GQA, untied)."""
    import transformers as tf

    torch.manual_seed(1)
    cfg = tf.Qwen2Config(num_key_value_heads=4, tie_word_embeddings=False, **COMMON)
    q2 = tf.Qwen2ForCausalLM(cfg)
    (tmp_path / "q2").mkdir()
    q2.save_pretrained(tmp_path / "q2")
    write_tokenizer(tmp_path / "q2")
    sd = q2.state_dict()
    v1: dict[str, torch.Tensor] = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        v1[b + "ln_1.weight"] = sd[a + "input_layernorm.weight"]
        for suffix in ("weight", "bias"):
            v1[b + "attn.c_attn." + suffix] = torch.cat(
                [sd[f"{a}self_attn.{x}_proj.{suffix}"] for x in "qkv"]
            )
        v1[b + "attn.c_proj.weight"] = sd[a + "self_attn.o_proj.weight"]
        v1[b + "ln_2.weight"] = sd[a + "post_attention_layernorm.weight"]
        v1[b + "mlp.w1.weight"] = sd[a + "mlp.up_proj.weight"]
        v1[b + "mlp.w2.weight"] = sd[a + "mlp.gate_proj.weight"]
        v1[b + "mlp.c_proj.weight"] = sd[a + "mlp.down_proj.weight"]
    d = tmp_path / "v1"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in v1.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen",
                "architectures": ["QWenLMHeadModel"],
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "intermediate_size": 256,
                "kv_channels": 16,
                "layer_norm_epsilon": 1e-6,
                "rotary_emb_base": 10000,
                "rotary_pct": 1.0,
                "seq_length": 256,
                "vocab_size": 320,
                "no_bias": True,
                "tie_word_embeddings": False,
                "use_logn_attn": True,
                "use_dynamic_ntk": True,
            }
        )
    )
    write_tokenizer(d)
    a_ck, b_ck = load_checkpoint(tmp_path / "q2", "f32"), load_checkpoint(d, "f32")
    assert b_ck.spec.to_dict() | {"eos_token_ids": [], "bos_token_id": None} == a_ck.spec.to_dict() | {
        "eos_token_ids": [],
        "bos_token_id": None,
    }
    assert list(a_ck.tensors) == list(b_ck.tensors)
    for name, t in a_ck.tensors.items():
        assert np.array_equal(t.planes["data"], b_ck.tensors[name].planes["data"]), name


def test_compile_qwen3_int4_bundle_and_info(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    make_model("qwen3", tmp_path / "m")
    ck = load_checkpoint(tmp_path / "m", "int4", group_size=32)
    write_bundle(ck, tmp_path / "b.ssb", Limits.default(ck.context_length))
    b = load_bundle(tmp_path / "b.ssb", share=False)
    assert b.spec == ck.spec and b.tensors["layers.0.wq"].fmt == "q4"
    assert bundle_info(tmp_path / "b.ssb")["architecture"] == "qwen3"


def test_other_architectures_are_refused_by_name(tmp_path: Path) -> None:
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(
        UnsupportedArchitectureError, match=r"GPT2LMHeadModel.*supported: llama.*qwen2.*qwen3"
    ):
        load_checkpoint(tmp_path, "f32")
