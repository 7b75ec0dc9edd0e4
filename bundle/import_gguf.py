"""Import a GGUF file (llama, qwen2, qwen3) into a canonical Checkpoint.

GGUF stores Llama q/k rows permuted for llama.cpp's interleaved RoPE; we undo that permutation
(a pure row reorder, so it is lossless in every format) to get Hugging Face's rotate_half order.
Qwen2/Qwen3 files are written unpermuted (NeoX RoPE) and are taken as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from seqshare.bundle.convert import (
    EMBEDDINGS,
    Checkpoint,
    SpecialTokens,
    TensorPlan,
    from_rows,
    permute_rows,
    plan_tensor,
    target_format,
)
from seqshare.bundle.gguf_blocks import from_gguf_blocks
from seqshare.bundle.gguf_tokenizer import build_tokenizer_json
from seqshare.bundle.quant import QTensor, default_group
from seqshare.bundle.spec import ARCHES, ModelSpec
from seqshare.worker.errors import BadMagicError, TruncatedBundleError, UnsupportedArchitectureError

T = gguf.GGMLQuantizationType
# Imported block by block without a second quantization (gguf_blocks.from_gguf_blocks): exactly.
_DIRECT = {
    T.Q4_0: "q4s", T.Q4_1: "q4", T.Q8_0: "q8p", T.Q5_0: "q5s", T.Q5_1: "q5",
    T.Q4_K: "q4k", T.Q5_K: "q5k", T.Q6_K: "q6k",
}
_FLOAT = {T.F32: "f32", T.F16: "f16", T.BF16: "bf16"}
# Under `keep`, other block types are requantized to the nearest runtime format.
_LOW_BIT = {
    T.Q2_K,
    T.Q3_K,
    T.IQ2_XXS,
    T.IQ2_XS,
    T.IQ3_XXS,
    T.IQ1_S,
    T.IQ4_NL,
    T.IQ3_S,
    T.IQ2_S,
    T.IQ4_XS,
    T.IQ1_M,
    T.TQ1_0,
    T.TQ2_0,
}

_GLOBAL = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
_LAYER = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def canonical_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise UnsupportedArchitectureError(
        f"GGUF tensor {gguf_name!r} has no place in the supported model layout"
    )


def open_reader(path: Path) -> gguf.GGUFReader:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BadMagicError(f"{path} is neither a GGUF file nor a checkpoint directory (magic {magic!r})")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError) as e:
        raise TruncatedBundleError(f"{path}: unreadable GGUF ({e})") from e


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def qk_unpermute_order(rows: int, n_heads: int) -> np.ndarray:
    """Row order turning llama.cpp's interleaved q/k rows into rotate_half order (per head:
    new row k*half + j comes from old row 2*j + k)."""
    half = rows // n_heads // 2
    return np.arange(rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(rows)


def spec_from_metadata(meta: dict[str, Any], names: set[str], path: Path) -> ModelSpec:
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise UnsupportedArchitectureError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return v

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedArchitectureError(f"{path}: partial rotary embeddings are not supported")
    if f"{arch}.rope.scaling.type" in meta and meta[f"{arch}.rope.scaling.type"] not in ("none",):
        raise UnsupportedArchitectureError(
            f"{path}: RoPE scaling {meta[f'{arch}.rope.scaling.type']} unsupported"
        )
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    return ModelSpec(
        arch=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position=int(get("context_length")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )


def _stored_format(qtype: T, group_size: int, name: str) -> tuple[str, int]:
    if qtype == T.Q8_0 and name in EMBEDDINGS:
        # The output head decides the argmax: int16 activations (q8) keep its top-1, where int8 ones
        # (q8p) cost 1.6 points of it on tests/worker/test_model_block_types.py's file.
        return "q8", 32
    if qtype in _DIRECT:
        return _DIRECT[qtype], default_group(_DIRECT[qtype])
    if qtype in _FLOAT:
        return _FLOAT[qtype], 0
    return ("q4" if qtype in _LOW_BIT else "q8"), group_size


class _GGUFProducer:
    """Turns one planned tensor into runtime layout from the memory-mapped GGUF."""

    def __init__(self, reader: gguf.GGUFReader, spec: ModelSpec, by_name: dict[str, Any]):
        self.spec, self.by_name = spec, by_name

    def __call__(self, p: TensorPlan) -> QTensor:
        t = self.by_name[p.name]
        qtype = T(t.tensor_type)
        rows = p.shape[0]
        cols = p.shape[1] if len(p.shape) == 2 else 0
        # Repacked as stored where the plan kept the format `keep` stores this tensor's blocks in.
        direct = len(p.shape) == 2 and qtype in _DIRECT and \
            (p.fmt, p.group_size) == _stored_format(qtype, p.group_size, p.name)
        if direct:
            out = from_gguf_blocks(qtype.name, np.asarray(t.data), rows, cols, p.fmt)
        else:
            data = np.asarray(t.data)  # GGUF rows are whole blocks, so row slices dequantize alone
            out = from_rows(lambda r0, r1: gguf.quants.dequantize(data[r0:r1], qtype), p)
        return self._unpermute(p.name, out)

    def _unpermute(self, name: str, t: QTensor) -> QTensor:
        if self.spec.arch != "llama" or not name.endswith((".wq", ".wk")):
            return t
        heads = self.spec.num_heads if name.endswith(".wq") else self.spec.num_kv_heads
        return permute_rows(t, qk_unpermute_order(t.shape[0], heads))


def load_gguf(path: Path, quant: str, group_size: int) -> Checkpoint:
    reader = open_reader(path)
    meta = metadata(reader)
    by_gguf = {t.name: t for t in reader.tensors}
    spec = spec_from_metadata(meta, set(by_gguf), path)
    by_name = {canonical_name(n): t for n, t in by_gguf.items()}
    missing = [n for n in spec.tensor_names() if n not in by_name]
    if missing:
        raise UnsupportedArchitectureError(f"{path}: tensors missing for {spec.arch}: {missing[:5]}")
    plan = []
    for name in spec.tensor_names():
        t = by_name[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        stored, g = _stored_format(T(t.tensor_type), group_size, name)
        fmt = target_format(quant, stored, name)
        plan.append(plan_tensor(name, shape, fmt, g if quant == "keep" else group_size))
    ctx = spec.max_position
    specials = SpecialTokens(
        bos=spec.bos_token_id,
        eos=spec.eos_token_ids,
        pad=meta.get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    return Checkpoint(
        spec=spec,
        tokenizer_json=build_tokenizer_json(meta),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens=specials,
        context_length=ctx,
        quant=quant,
        group_size=group_size,
        source=path,
        plan=plan,
        _produce=_GGUFProducer(reader, spec, by_name),
    )
