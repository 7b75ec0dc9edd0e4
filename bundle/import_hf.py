"""Import a Hugging Face checkpoint directory (config.json + safetensors + tokenizer files).

Architectures: Llama (incl. SmolLM2), Qwen2/Qwen2.5, Qwen3, and the original Qwen-7B ("qwen", v1)
whose fused `c_attn` is split into q/k/v and whose MLP names map as w2 -> gate, w1 -> up,
c_proj -> down (Qwen v1 computes w1(x) * silu(w2(x))). Safetensors are read through one read-only
mmap per file, one tensor at a time, so conversion streams.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqshare.bundle.convert import Checkpoint, SpecialTokens, TensorPlan, from_rows, plan_tensor, target_format
from seqshare.bundle.hf_tokenizer import load_tokenizer_files
from seqshare.bundle.quant import QTensor, bf16_bits_to_f32
from seqshare.bundle.spec import ModelSpec
from seqshare.worker.errors import TruncatedBundleError, UnsupportedArchitectureError

SUPPORTED = "llama (incl. SmolLM2), qwen2 (Qwen2/Qwen2.5), qwen3, qwen (Qwen-7B v1)"
_ST_DTYPES = {"F32": ("<f4", "f32"), "F16": ("<f2", "f16"), "BF16": ("<u2", "bf16")}
_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_QWEN1_LAYER = {
    "ln_1.weight": "attn_norm",
    "attn.c_proj.weight": "wo",
    "ln_2.weight": "ffn_norm",
    "mlp.w2.weight": "w_gate",
    "mlp.w1.weight": "w_up",
    "mlp.c_proj.weight": "w_down",
}


@dataclass(frozen=True)
class _Source:
    """Where a canonical tensor's values are: a safetensors entry, optionally a row slice of it."""

    file: Path
    key: str
    rows: tuple[int, int] | None = None


class SafetensorsDir:
    """Read-only, lazy access to every tensor in a checkpoint's safetensors files."""

    def __init__(self, root: Path):
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise UnsupportedArchitectureError(f"{root} has no *.safetensors weights")
        self.entries: dict[str, tuple[Path, dict[str, Any]]] = {}
        self._maps: dict[Path, tuple[mmap.mmap, int]] = {}
        for f in files:
            with f.open("rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            if len(mm) < 8:
                raise TruncatedBundleError(f"{f} is too short to be a safetensors file")
            (hlen,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8 : 8 + hlen])
            header.pop("__metadata__", None)
            self._maps[f] = (mm, 8 + hlen)
            for k, v in header.items():
                self.entries[k] = (f, v)

    def stored(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(runtime float format, shape) of an entry."""
        _, e = self.entries[key]
        if e["dtype"] not in _ST_DTYPES:
            raise UnsupportedArchitectureError(
                f"tensor {key} has dtype {e['dtype']}; supported: F32, F16, BF16"
            )
        return _ST_DTYPES[e["dtype"]][1], tuple(e["shape"])

    def read_f32(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        f, e = self.entries[key]
        mm, base = self._maps[f]
        start, end = e["data_offsets"]
        if base + end > len(mm):
            raise TruncatedBundleError(f"{f}: tensor {key} runs past the end of the file")
        raw = np.frombuffer(
            mm, dtype=_ST_DTYPES[e["dtype"]][0], count=int(np.prod(e["shape"])), offset=base + start
        )
        a = raw.reshape(e["shape"])
        if rows is not None:
            a = a[rows[0] : rows[1]]
        return bf16_bits_to_f32(a) if e["dtype"] == "BF16" else a.astype(np.float32)


def _rope_theta(cfg: dict[str, Any]) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedArchitectureError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
    return float(cfg.get("rope_theta", rp.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))))


def spec_from_config(cfg: dict[str, Any], root: Path, names: set[str]) -> ModelSpec:
    mt = cfg.get("model_type")
    if mt not in ("llama", "qwen2", "qwen3", "qwen"):
        arch = (cfg.get("architectures") or [mt])[0]
        raise UnsupportedArchitectureError(
            f"{root}: architecture {arch!r} is not supported (supported: {SUPPORTED})"
        )
    if (
        cfg.get("hidden_act", "silu") != "silu"
        or cfg.get("mlp_bias")
        or (mt == "llama" and cfg.get("attention_bias"))
    ):
        raise UnsupportedArchitectureError(f"{root}: only SiLU MLPs without biases are supported")
    if mt == "qwen2" and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"{root}: sliding-window attention is not supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    qwen1 = mt == "qwen"
    if qwen1 and float(cfg.get("rotary_pct", 1.0)) != 1.0:
        raise UnsupportedArchitectureError(f"{root}: partial rotary embeddings are not supported")
    eos = cfg.get("eos_token_id")
    return ModelSpec(
        arch="qwen2" if qwen1 else mt,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]) // (2 if qwen1 else 1),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=heads if qwen1 else int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("kv_channels" if qwen1 else "head_dim") or hidden // heads),
        rope_theta=_rope_theta(cfg),
        rms_norm_eps=float(cfg.get("layer_norm_epsilon" if qwen1 else "rms_norm_eps", 1e-6)),
        # Qwen v1's logn/NTK tricks only act beyond seq_length, so up to it the model is plain.
        max_position=int(cfg["seq_length"] if qwen1 else cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or ("lm_head.weight" not in names),
        qkv_bias=qwen1 or mt == "qwen2",
        qk_norm=mt == "qwen3",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
    )


def tensor_sources(spec: ModelSpec, qwen1: bool) -> dict[str, _Source | str]:
    """Canonical name -> safetensors key (or a row slice of Qwen v1's fused c_attn)."""
    out: dict[str, Any] = {}
    pre = "transformer." if qwen1 else "model."
    out["tok_embeddings"] = pre + ("wte.weight" if qwen1 else "embed_tokens.weight")
    out["norm"] = pre + ("ln_f.weight" if qwen1 else "norm.weight")
    if not spec.tie_embeddings:
        out["output"] = "lm_head.weight"
    q, kv = spec.num_heads * spec.head_dim, spec.kv_dim
    cuts = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    for i in range(spec.num_layers):
        if qwen1:
            base = f"transformer.h.{i}."
            for k, v in _QWEN1_LAYER.items():
                out[f"layers.{i}.{v}"] = base + k
            for x in "qkv":
                out[f"layers.{i}.w{x}"] = _Source(Path(), base + "attn.c_attn.weight", cuts[x])
                out[f"layers.{i}.b{x}"] = _Source(Path(), base + "attn.c_attn.bias", cuts[x])
        else:
            for k, v in _LAYER.items():
                out[f"layers.{i}.{v}"] = f"model.layers.{i}.{k}"
    return {n: out[n] for n in spec.tensor_names()}


class _HFProducer:
    def __init__(self, st: SafetensorsDir, sources: dict[str, _Source | str]):
        self.st, self.sources = st, sources

    def __call__(self, p: TensorPlan) -> QTensor:
        src = self.sources[p.name]
        key, base = (src, 0) if isinstance(src, str) else (src.key, src.rows[0] if src.rows else 0)
        return from_rows(lambda r0, r1: self.st.read_f32(key, (base + r0, base + r1)), p)


def load_hf(root: Path, quant: str, group_size: int) -> Checkpoint:
    try:
        cfg = json.loads((root / "config.json").read_text())
    except FileNotFoundError as e:
        raise UnsupportedArchitectureError(f"{root} has no config.json: not a Hugging Face checkpoint") from e
    st = SafetensorsDir(root)
    spec = spec_from_config(cfg, root, set(st.entries))
    sources = tensor_sources(spec, cfg.get("model_type") == "qwen")
    missing = sorted({s if isinstance(s, str) else s.key for s in sources.values()} - set(st.entries))
    if missing:
        raise UnsupportedArchitectureError(f"{root}: tensors missing for {spec.arch}: {missing[:5]}")
    plan = []
    for name, src in sources.items():
        stored, shape = st.stored(src if isinstance(src, str) else src.key)
        if isinstance(src, _Source) and src.rows:
            shape = (src.rows[1] - src.rows[0], *shape[1:])
        plan.append(plan_tensor(name, shape, target_format(quant, stored, name), group_size))
    tok = load_tokenizer_files(root, cfg)
    specials = SpecialTokens(
        bos=tok.bos if tok.bos is not None else spec.bos_token_id,
        eos=tuple(dict.fromkeys([*spec.eos_token_ids, *tok.eos])),
        pad=tok.pad,
        add_bos=tok.add_bos,
    )
    spec = ModelSpec.from_dict(
        {**spec.to_dict(), "bos_token_id": specials.bos, "eos_token_ids": specials.eos}
    )
    return Checkpoint(
        spec=spec,
        tokenizer_json=tok.json,
        chat_template=tok.chat_template,
        special_tokens=specials,
        context_length=spec.max_position,
        quant=quant,
        group_size=group_size,
        source=root,
        plan=plan,
        _produce=_HFProducer(st, sources),
    )
