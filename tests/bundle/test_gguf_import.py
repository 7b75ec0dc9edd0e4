"""GGUF import of the default model against `gguf`'s own dequantization and transformers' loader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from seqshare.bundle.convert import Checkpoint, load_checkpoint
from seqshare.bundle.import_gguf import canonical_name, qk_unpermute_order
from seqshare.bundle.quant import dequantize, panel_values
from seqshare.worker.errors import UnsupportedQuantError

_HF = {
    "attn_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    if name == "tok_embeddings":
        return "model.embed_tokens.weight"
    if name == "norm":
        return "model.norm.weight"
    _, i, k = name.split(".")
    return f"model.layers.{i}.{_HF[k]}.weight"


@pytest.fixture(scope="module")
def keep(default_gguf: Path) -> Checkpoint:
    return load_checkpoint(default_gguf, "keep")


@pytest.fixture(scope="module")
def reader(default_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(default_gguf)


def test_keep_is_lossless_against_gguf_dequantization(keep: Checkpoint, reader: gguf.GGUFReader) -> None:
    spec = keep.spec
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        name = canonical_name(t.name)
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        if name.endswith((".wq", ".wk")):
            heads = spec.num_heads if name.endswith(".wq") else spec.num_kv_heads
            ref = ref[qk_unpermute_order(ref.shape[0], heads)]
        qt = keep.tensors[name]
        got = dequantize(qt) if len(qt.shape) == 2 else qt.planes["data"]
        assert got.shape == ref.shape, name
        assert np.array_equal(got, ref), name
        kinds[qt.fmt] = kinds.get(qt.fmt, 0) + 1
    assert kinds == {"q4": 210, "q8": 1, "f32": 61}


def test_keep_repacks_blocks_without_touching_them(keep: Checkpoint, reader: gguf.GGUFReader) -> None:
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")  # not permuted
    blocks = np.asarray(t.data).reshape(-1, 20)  # Q4_1 block: f16 d, f16 m, 16 bytes of nibbles
    q = keep.tensors["layers.0.w_down"]
    assert q.fmt == "q4" and q.group_size == 32
    # Every nibble and every float16 bit pattern moves into the 8-row panels unchanged. A block's
    # byte i holds column i (low nibble) and column i + 16 (high nibble).
    nib = blocks[:, 4:]
    want = np.concatenate([nib & 0x0F, nib >> 4], axis=1).reshape(q.shape)
    values, scales, mins = panel_values(q)
    assert np.array_equal(values, want)
    assert np.array_equal(scales.reshape(-1).view(np.uint8).reshape(-1, 2), blocks[:, 0:2])
    assert np.array_equal(mins.reshape(-1).view(np.uint8).reshape(-1, 2), blocks[:, 2:4])


def test_spec_and_tokens_of_default_model(keep: Checkpoint) -> None:
    s = keep.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    assert s.tie_embeddings and "output" not in keep.tensors
    assert keep.context_length == 8192
    assert keep.special_tokens.bos == 1 and keep.special_tokens.eos == (2,)
    assert keep.chat_template and "<|im_start|>" in keep.chat_template
    assert list(keep.tensors) == s.tensor_names()


def test_f32_equals_transformers_gguf_state_dict(default_gguf: Path) -> None:
    """transformers dequantizes and un-permutes q/k itself; our f32 import must agree bit for bit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ck = load_checkpoint(default_gguf, "f32")
    for name, t in ck.iter_tensors():
        assert t.fmt == "f32"
        assert np.array_equal(t.planes["data"], sd[hf_name(name)]), name
    assert np.array_equal(sd["lm_head.weight"], ck.tensors["tok_embeddings"].planes["data"])


def test_int4_group_that_does_not_divide_hidden_is_refused(default_gguf: Path) -> None:
    with pytest.raises(UnsupportedQuantError, match="576 columns"):
        load_checkpoint(default_gguf, "int4", group_size=128)
