"""The architecture of a model, independent of where its weights came from.

Canonical tensor names (every importer produces exactly these; the engine reads exactly these):

  tok_embeddings          [vocab, hidden]            any weight format
  layers.{i}.attn_norm    [hidden]                   f32
  layers.{i}.wq           [n_heads * head_dim, hidden]
  layers.{i}.wk           [n_kv_heads * head_dim, hidden]
  layers.{i}.wv           [n_kv_heads * head_dim, hidden]
  layers.{i}.bq / bk / bv [out]                      f32, only when qkv_bias (Qwen2, Qwen v1)
  layers.{i}.q_norm       [head_dim]                 f32, only when qk_norm (Qwen3)
  layers.{i}.k_norm       [head_dim]                 f32, only when qk_norm
  layers.{i}.wo           [hidden, n_heads * head_dim]
  layers.{i}.ffn_norm     [hidden]                   f32
  layers.{i}.w_gate       [intermediate, hidden]
  layers.{i}.w_up         [intermediate, hidden]
  layers.{i}.w_down       [hidden, intermediate]
  norm                    [hidden]                   f32
  output                  [vocab, hidden]            absent when tie_embeddings

q/k rows are in Hugging Face order: RoPE rotates dimension i with i + head_dim/2 ("rotate_half",
NeoX style). Importers undo GGUF's interleaved permutation of Llama q/k so one convention holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Arch = Literal["llama", "qwen2", "qwen3"]
ARCHES: tuple[str, ...] = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_dtype: str = "f16") -> int:
        """K and V of every layer for one token position."""
        return 2 * self.num_layers * self.kv_dim * (2 if kv_dtype == "f16" else 4)

    def tensor_names(self) -> list[str]:
        names = ["tok_embeddings"]
        for i in range(self.num_layers):
            p = f"layers.{i}."
            names += [p + n for n in ("attn_norm", "wq", "wk", "wv")]
            if self.qkv_bias:
                names += [p + n for n in ("bq", "bk", "bv")]
            if self.qk_norm:
                names += [p + "q_norm", p + "k_norm"]
            names += [p + n for n in ("wo", "ffn_norm", "w_gate", "w_up", "w_down")]
        names.append("norm")
        if not self.tie_embeddings:
            names.append("output")
        return names
