"""A checkpoint in canonical form: spec, tokenizer and a stream of weights in runtime layout.

`load_checkpoint(src, quant, group_size)` reads a Hugging Face checkpoint directory or a GGUF file
and returns a `Checkpoint`. Weights are produced lazily, one tensor at a time, in the order of
`spec.tensor_names()`, so a compiler can stream them to disk with peak memory near the largest
tensor; `.tensors` materialises them all for callers that want a dict.

Requested quant schemes (the CLI spellings): f32, f16, bf16, int8 (-> q8), int4 (-> q4), keep.
`keep` repacks GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks losslessly (Q8_0 as q8p, for int8 activations;
`int8` gives q8, for int16 ones) and Q4_K/Q5_K/Q6_K blocks with their scales as stored (K-scale
panels), and leaves float tensors in their stored float format; other block types (Q2_K, Q3_K, the
IQ types, ...) are dequantized and quantized again. 1-D tensors (norms, biases) are always f32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from seqshare.bundle.quant import (
    GROUP_SIZES,
    K_GROUP,
    PANEL,
    PANEL_FORMATS,
    QTensor,
    k_panel_tensor,
    k_panel_values,
    panel_tensor,
    panel_values,
    quantize,
)
from seqshare.bundle.spec import ModelSpec
from seqshare.worker.errors import UnsupportedQuantError

QUANTS: tuple[str, ...] = ("f32", "f16", "bf16", "int8", "int4", "keep")
_SCHEME_FORMAT = {
    "f32": "f32",
    "f16": "f16",
    "bf16": "bf16",
    "int8": "q8",
    "int4": "q4",
    "q8": "q8",
    "q4": "q4",
}


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the engine and the chat template need."""

    bos: int | None
    eos: tuple[int, ...]
    pad: int | None = None
    add_bos: bool = False  # whether plain encoding prepends BOS (already in the tokenizer JSON)

    def to_dict(self) -> dict[str, Any]:
        return {"bos": self.bos, "eos": list(self.eos), "pad": self.pad, "add_bos": self.add_bos}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpecialTokens:
        return cls(d.get("bos"), tuple(d.get("eos", ())), d.get("pad"), bool(d.get("add_bos", False)))


@dataclass(frozen=True)
class TensorPlan:
    """What one canonical tensor will be, known before any weight is read."""

    name: str
    fmt: str
    shape: tuple[int, ...]
    group_size: int  # 0 for float formats


@dataclass
class Checkpoint:
    spec: ModelSpec
    tokenizer_json: str
    chat_template: str | None
    special_tokens: SpecialTokens
    context_length: int
    quant: str  # the requested scheme (one of QUANTS)
    group_size: int
    source: Path
    plan: list[TensorPlan]
    # Produces one tensor in runtime layout; called once per plan entry while streaming.
    _produce: Callable[[TensorPlan], QTensor] = field(repr=False)

    def iter_tensors(self) -> Iterator[tuple[str, QTensor]]:
        for p in self.plan:
            t = self._produce(p)
            if t.fmt != p.fmt or t.shape != p.shape or t.group_size != p.group_size:
                raise AssertionError(f"{p.name}: produced {t.fmt}{t.shape}/g{t.group_size}, planned {p}")
            yield p.name, t

    @cached_property
    def tensors(self) -> dict[str, QTensor]:
        return dict(self.iter_tensors())

    @property
    def param_count(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.plan)


def check_quant(quant: str, group_size: int) -> None:
    if quant not in QUANTS and quant not in _SCHEME_FORMAT:
        raise UnsupportedQuantError(f"unknown quant scheme {quant!r} (choose one of {', '.join(QUANTS)})")
    if group_size not in GROUP_SIZES:
        raise UnsupportedQuantError(f"group size {group_size} is not supported (choose one of {GROUP_SIZES})")


# The token embedding (and the output head it is tied to) stays at 8 bits in an int4 bundle, as
# in llama.cpp's 4-bit files: at 4 bits it alone drops the top-1 agreement with f32 to ~0.8.
EMBEDDINGS = ("tok_embeddings", "output")


def target_format(quant: str, stored: str, name: str = "") -> str:
    """The runtime format of a 2-D weight: the requested one, or under `keep` the stored one."""
    if quant == "keep":
        return stored
    fmt = _SCHEME_FORMAT[quant]
    return "q8" if fmt == "q4" and name in EMBEDDINGS else fmt


def plan_tensor(name: str, shape: tuple[int, ...], fmt: str, group_size: int) -> TensorPlan:
    if len(shape) == 1:
        return TensorPlan(name, "f32", shape, 0)
    if fmt in ("q8", *PANEL_FORMATS):
        if shape[1] % group_size:
            raise UnsupportedQuantError(
                f"{name} has {shape[1]} columns, not a multiple of the group size {group_size}; "
                f"choose a group size dividing it (supported: {GROUP_SIZES})"
            )
        return TensorPlan(name, fmt, shape, group_size)
    return TensorPlan(name, fmt, shape, 0)


ROW_BLOCK = 1024  # rows converted at a time (whole panels): bounds the float temporaries


def from_float(w: np.ndarray, p: TensorPlan) -> QTensor:
    """Convert a float array to the planned format (1-D vectors stay f32)."""
    return from_rows(lambda r0, r1: w[r0:r1], p)


def from_rows(read: Callable[[int, int], np.ndarray], p: TensorPlan) -> QTensor:
    """Convert a tensor given as a row reader, ROW_BLOCK rows at a time, into preallocated planes,
    so peak memory is the output plus one block of float temporaries."""
    if len(p.shape) == 1:
        data = np.ascontiguousarray(read(0, p.shape[0]), dtype=np.float32).reshape(p.shape)
        return QTensor("f32", p.shape, 0, {"data": data})
    rows = p.shape[0]

    def lead(n: int) -> int:  # planes are indexed by row, panel planes by 8-row panel
        return -(-n // PANEL) if p.fmt in PANEL_FORMATS else n

    planes: dict[str, np.ndarray] = {}
    for r0 in range(0, rows, ROW_BLOCK):
        r1 = min(rows, r0 + ROW_BLOCK)
        part = quantize(np.asarray(read(r0, r1)).reshape(r1 - r0, p.shape[1]), p.fmt, p.group_size or 32)
        for k, v in part.planes.items():
            if k not in planes:
                planes[k] = np.empty((lead(rows), *v.shape[1:]), dtype=v.dtype)
            planes[k][lead(r0) : lead(r0) + v.shape[0]] = v
    return QTensor(p.fmt, p.shape, p.group_size, planes)


def permute_rows(t: QTensor, order: np.ndarray) -> QTensor:
    """Reorder the rows of a weight; lossless (panel values, scales and mins move, nothing is requantized)."""
    if t.fmt in K_GROUP:
        q, d, sc, dmin, m = k_panel_values(t)
        return k_panel_tensor(t.fmt, q[order], d[order], sc[order], None if dmin is None else dmin[order],
                              None if m is None else m[order])
    if t.fmt in PANEL_FORMATS:
        q, scales, mins = panel_values(t)
        return panel_tensor(t.fmt, q[order], scales[order], None if mins is None else mins[order], t.group_size)
    return QTensor(
        t.fmt, t.shape, t.group_size, {k: np.ascontiguousarray(v[order]) for k, v in t.planes.items()}
    )


def load_checkpoint(src: Path, quant: str = "keep", group_size: int = 32) -> Checkpoint:
    """Open a HF checkpoint directory or a GGUF file as a canonical Checkpoint (weights lazy)."""
    src = Path(src)
    check_quant(quant, group_size)
    if src.is_dir():
        from seqshare.bundle.import_hf import load_hf

        return load_hf(src, quant, group_size)
    from seqshare.bundle.import_gguf import load_gguf

    return load_gguf(src, quant, group_size)
