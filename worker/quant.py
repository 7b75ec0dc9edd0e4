"""Weight formats: the runtime layouts the native kernels read, and their numpy reference
(quantize, dequantize, lossless import of GGUF blocks). This module is the contract between the
bundle compiler (which writes these arrays) and the kernels (which read them in place).

Every 2-D weight is [rows=out_features, cols=in_features], row-major, stored as named planes:

  f32   data   float32 [rows, cols]
  f16   data   uint16  [rows, cols]        IEEE binary16 bits
  bf16  data   uint16  [rows, cols]        bfloat16 bits (upper half of the float32)
  q8    qs     int8    [rows, cols]        value = scales[r, c // G] * qs[r, c]   (symmetric)
        scales float16 [rows, cols // G]
  q4    qs     uint8   [rows, cols // 2]   value = scales[r, g] * q + mins[r, g],  q in 0..15
        scales float16 [rows, cols // G]
        mins   float16 [rows, cols // G]

q4 nibble order, per group of G columns (the group's G/2 bytes): byte i holds column i of the group
in its low nibble and column i + G/2 in its high nibble. That is GGUF's Q4_0/Q4_1 order at G=32,
so those blocks repack without touching a value; SIMD unpacks a group's low then high half.

GGUF imports are lossless: Q4_1 (d, m) -> q4 (scale=d, min=m); Q4_0 (d) -> q4 (scale=d, min=-8d, an
exact power-of-two multiple in float16); Q8_0 (d) -> q8 (scale=d). All at G = 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import UnsupportedQuantError

WeightFormat = Literal["f32", "f16", "bf16", "q8", "q4"]
FORMATS: tuple[str, ...] = ("f32", "f16", "bf16", "q8", "q4")
GROUP_SIZES = (32, 64, 128)
GGUF_BLOCK = 32


@dataclass(frozen=True)
class QTensor:
    """One weight in runtime layout: its format, logical shape, group size and planes."""

    fmt: str
    shape: tuple[int, ...]  # (rows, cols); 1-D vectors (norms, biases) are f32 with shape (n,)
    group_size: int  # 0 for the float formats
    planes: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.planes.values())


def _check_group(cols: int, group: int) -> None:
    if group not in GROUP_SIZES:
        raise UnsupportedQuantError(f"group size {group} is not supported (choose one of {GROUP_SIZES})")
    if cols % group:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of the group size {group}")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def quantize(w: np.ndarray, fmt: str, group: int = 32) -> QTensor:
    """Quantize a float matrix [rows, cols] into `fmt`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise UnsupportedQuantError(f"only 2-D weights are quantized, got shape {w.shape}")
    rows, cols = w.shape
    if fmt == "f32":
        return QTensor("f32", (rows, cols), 0, {"data": w})
    if fmt == "f16":
        return QTensor("f16", (rows, cols), 0, {"data": w.astype(np.float16).view(np.uint16)})
    if fmt == "bf16":
        return QTensor("bf16", (rows, cols), 0, {"data": f32_to_bf16_bits(w)})
    _check_group(cols, group)
    g = w.reshape(rows, cols // group, group)
    if fmt == "q8":
        amax = np.abs(g).max(axis=2)
        scales = (amax / 127.0).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        q = np.where(s > 0, np.rint(g / np.where(s > 0, s, 1)), 0)
        qs = np.clip(q, -127, 127).astype(np.int8).reshape(rows, cols)
        return QTensor("q8", (rows, cols), group, {"qs": qs, "scales": scales})
    if fmt == "q4":
        mn = g.min(axis=2)
        mx = g.max(axis=2)
        mins = mn.astype(np.float16)
        scales = ((mx - mins.astype(np.float32)) / 15.0).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        q = np.where(s > 0, np.rint((g - mins.astype(np.float32)[..., None]) / np.where(s > 0, s, 1)), 0)
        q = np.clip(q, 0, 15).astype(np.uint8)
        return QTensor("q4", (rows, cols), group, {"qs": pack_q4(q, group), "scales": scales, "mins": mins})
    raise UnsupportedQuantError(f"unknown weight format {fmt!r} (choose one of {FORMATS})")


def pack_q4(q: np.ndarray, group: int) -> np.ndarray:
    """[rows, ngroups, G] values 0..15 -> [rows, cols/2] bytes in the documented nibble order."""
    rows, ng, _ = q.shape
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return np.ascontiguousarray(packed.reshape(rows, ng * half), dtype=np.uint8)


def unpack_q4(qs: np.ndarray, group: int) -> np.ndarray:
    """[rows, cols/2] bytes -> [rows, ngroups, G] values 0..15."""
    rows = qs.shape[0]
    half = group // 2
    b = qs.reshape(rows, -1, half)
    return np.concatenate([b & 0x0F, b >> 4], axis=2)


def dequantize(t: QTensor) -> np.ndarray:
    """The float32 matrix a QTensor stands for (the reference every kernel must agree with)."""
    rows, cols = t.shape
    p = t.planes
    if t.fmt == "f32":
        return np.asarray(p["data"], dtype=np.float32).reshape(rows, cols)
    if t.fmt == "f16":
        return p["data"].view(np.float16).astype(np.float32).reshape(rows, cols)
    if t.fmt == "bf16":
        return bf16_bits_to_f32(p["data"]).reshape(rows, cols)
    G = t.group_size
    sc = p["scales"].astype(np.float32).reshape(rows, cols // G, 1)
    if t.fmt == "q8":
        return (p["qs"].astype(np.float32).reshape(rows, cols // G, G) * sc).reshape(rows, cols)
    if t.fmt == "q4":
        mi = p["mins"].astype(np.float32).reshape(rows, cols // G, 1)
        return (unpack_q4(p["qs"], G).astype(np.float32) * sc + mi).reshape(rows, cols)
    raise UnsupportedQuantError(f"unknown weight format {t.fmt!r}")


# --- lossless GGUF block import ---------------------------------------------------------------
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])


def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int) -> QTensor:
    """Repack GGUF Q4_0 / Q4_1 / Q8_0 block bytes of a [rows, cols] tensor into q4 / q8 planes."""
    if cols % GGUF_BLOCK:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of the GGUF block size 32")
    nb = rows * cols // GGUF_BLOCK
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    shape2 = (rows, cols // GGUF_BLOCK)
    if kind == "Q4_1":
        b = raw.view(_Q4_1)[:nb]
        return QTensor("q4", (rows, cols), 32, {
            "qs": np.ascontiguousarray(b["qs"]).reshape(rows, cols // 2),
            "scales": np.ascontiguousarray(b["d"]).reshape(shape2),
            "mins": np.ascontiguousarray(b["m"]).reshape(shape2),
        })
    if kind == "Q4_0":
        b = raw.view(_Q4_0)[:nb]
        d = np.ascontiguousarray(b["d"]).reshape(shape2)
        mins = (d.astype(np.float32) * -8.0).astype(np.float16)
        if not np.all(np.isfinite(mins)):
            raise UnsupportedQuantError("a Q4_0 scale is too large to represent its minimum in float16")
        return QTensor("q4", (rows, cols), 32, {
            "qs": np.ascontiguousarray(b["qs"]).reshape(rows, cols // 2), "scales": d, "mins": mins,
        })
    if kind == "Q8_0":
        b = raw.view(_Q8_0)[:nb]
        return QTensor("q8", (rows, cols), 32, {
            "qs": np.ascontiguousarray(b["qs"]).reshape(rows, cols),
            "scales": np.ascontiguousarray(b["d"]).reshape(shape2),
        })
    raise UnsupportedQuantError(f"GGUF type {kind} has no lossless import (only Q4_0, Q4_1, Q8_0)")
