"""Weight formats: the runtime layouts the native kernels read, and their numpy reference
(quantize, dequantize, lossless import of GGUF blocks). This module is the contract between the
bundle compiler (which writes these arrays) and the kernels (which read them in place).

Every 2-D weight is logically [rows=out_features, cols=in_features] and stored as named planes:

  f32   data   float32 [rows, cols]
  f16   data   uint16  [rows, cols]        IEEE binary16 bits
  bf16  data   uint16  [rows, cols]        bfloat16 bits (upper half of the float32)
  q8    qs     int8    [rows, cols]        value = scales[r, c // G] * qs[r, c]   (symmetric)
        scales float16 [rows, cols // G]
  q4    qs     uint8   [P, cols // 32, 128]  value = scale * q + min, q in 0..15, in 8-row panels
        scales float16 [P, cols // G, 8]
        mins   float16 [P, cols // G, 8]
  q5    qs     uint8   [P, cols // 32, 160]  as q4 with q in 0..31: the nibbles, then the fifth bits
        scales, mins as q4
  q6    qs     uint8   [P, cols // 32, 192]  value = scale * (q - 32), q in 0..63, G = 16: the
        scales float16 [P, cols // 16, 8]      nibbles, then the two high bits, in pairs
  q4s   qs, scales as q4                   value = scale * (q - 8): symmetric, no mins plane
  q5s   qs, scales as q5                   value = scale * (q - 16): symmetric, no mins plane
  q8p   qs     uint8   [P, cols // 32, 256]  value = scale * (q - 128), q in 0..255: q8 in panels, for
        scales as q4                         the int8-activation kernels; symmetric, no mins plane

q4 and q5 are stored in panels of 8 rows (P = ceil(rows / 8); the rows past the end are zero), the
layout the int8 kernels consume without repacking: for panel p and block b of 32 columns, byte
32 * j + 4 * i + c (j < 4, row i < 8, c < 4) holds column 32b + 4j + c of row 8p + i in its low
nibble and column 32b + 16 + 4j + c in its high nibble; a q5 block then has 32 more bytes, whose
byte 4 * i + c holds in bit 2 * j + h the fifth bit (16) of the value in nibble h of byte
32 * j + 4 * i + c. A q6 block has 64 more bytes instead, for the values' two high bits (16 and
32) side by side: byte 128 + 32 * (j // 2) + 4 * i + c holds in bits 2 * (2 * (j % 2) + h) and the
next one those of the value in nibble h of byte 32 * j + 4 * i + c. A q6 group
(16 columns, GGUF Q6_K's sub-block) is thus the low or the high nibbles of a block. A q8p block is
whole bytes: byte 32 * j + 4 * i + c (j < 8) holds column 32b + 4j + c of row 8p + i. q6, q4s, q5s
and q8p are symmetric: their minimum is -2^(bits - 1) x their scale (SYMMETRIC_ZERO), so they have no mins
plane. Scales and mins of the panel's 8 rows sit side by side per group. One kernel
reads one layout for any number of tokens, so a row's result never depends on how many tokens were
multiplied with it (batch invariance).

GGUF imports are lossless: Q4_1 (d, m) -> q4 (scale=d, min=m); Q4_0 (d) -> q4s (scale=d); Q5_1 ->
q5 (scale=d, min=m); Q5_0 -> q5s (scale=d); Q8_0 (d) -> q8p (scale=d, q = qs + 128), or q8 for the
output head (scale=d). All at G = 32. q8p multiplies int8 activations as llama.cpp's Q8_0 does
(VNNI's byte dot products: twice q8's multiply-adds per instruction); q8 takes int16 activations,
which keep more accuracy: for the head, whose argmax is the answer, and for `--quant int8`. The bits and
float16 values are moved, never recomputed. Q4_K and Q5_K keep their values and round each
32-column group's scale and min to float16 once (Q4_K_F16_REL_ERR), and Q6_K each 16-column
group's scale (q6, the same bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from seqshare.worker.errors import UnsupportedQuantError

WeightFormat = Literal["f32", "f16", "bf16", "q8", "q4", "q5", "q6", "q4s", "q5s", "q8p"]
FORMATS: tuple[str, ...] = ("f32", "f16", "bf16", "q8", "q4", "q5", "q6", "q4s", "q5s", "q8p")
PANEL_FORMATS = ("q4", "q5", "q6", "q4s", "q5s", "q8p")  # stored in 8-row panels
_LEVELS = {"q4": 15, "q5": 31}
PANEL_BITS = {"q4": 4, "q5": 5, "q6": 6, "q4s": 4, "q5s": 5, "q8p": 8}
# The value that stands for 0 in the symmetric panels: their minimum is -zero x their scale.
SYMMETRIC_ZERO = {"q4s": 8, "q5s": 16, "q6": 32, "q8p": 128}
PANEL_BLOCK_BYTES = {f: 128 + 32 * (b - 4) for f, b in PANEL_BITS.items()}  # bytes per 32 columns of a panel
GROUP_SIZES = (32, 64, 128)
Q6_GROUP = 16  # q6's only group size
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


def _check_group(cols: int, group: int, fmt: str) -> None:
    if fmt == "q6":
        if group != Q6_GROUP:
            raise UnsupportedQuantError(f"q6 groups are {Q6_GROUP} columns, not {group}")
    elif group not in GROUP_SIZES:
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
    _check_group(cols, group, fmt)
    if cols % 32:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of 32")
    g = w.reshape(rows, cols // group, group)
    if fmt == "q8":
        amax = np.abs(g).max(axis=2)
        scales = (amax / 127.0).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        q = np.where(s > 0, np.rint(g / np.where(s > 0, s, 1)), 0)
        qs = np.clip(q, -127, 127).astype(np.int8).reshape(rows, cols)
        return QTensor("q8", (rows, cols), group, {"qs": qs, "scales": scales})
    if fmt in SYMMETRIC_ZERO:  # q - zero in -zero..zero - 1, the largest magnitude at +-(zero - 1)
        zero = SYMMETRIC_ZERO[fmt]
        scales = (np.abs(g).max(axis=2) / (zero - 1)).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        q = np.where(s > 0, np.rint(g / np.where(s > 0, s, 1)), 0)
        q = (np.clip(q, -zero, zero - 1) + zero).astype(np.uint8)
        return panel_tensor(fmt, q.reshape(rows, cols), scales, None, group)
    if fmt in PANEL_FORMATS:
        levels = _LEVELS[fmt]
        mn = g.min(axis=2)
        mx = g.max(axis=2)
        mins = mn.astype(np.float16)
        scales = ((mx - mins.astype(np.float32)) / levels).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        q = np.where(s > 0, np.rint((g - mins.astype(np.float32)[..., None]) / np.where(s > 0, s, 1)), 0)
        q = np.clip(q, 0, levels).astype(np.uint8)
        return panel_tensor(fmt, q.reshape(rows, cols), scales, mins, group)
    raise UnsupportedQuantError(f"unknown weight format {fmt!r} (choose one of {FORMATS})")


PANEL = 8  # rows per panel


def kernel_args(t: QTensor) -> dict[str, object]:
    """The keyword arguments of `_native.linear` / `_native.embedding` for a weight (tests, benchmarks)."""
    p = t.planes
    if t.fmt in ("f32", "f16", "bf16"):
        return {"fmt": t.fmt, "data": p["data"]}
    kw: dict[str, object] = {"fmt": t.fmt, "data": p["qs"], "scales": p["scales"], "group": t.group_size}
    if t.fmt in PANEL_FORMATS:
        kw["mins"] = p.get("mins")
        kw["rows"] = t.shape[0]
    return kw


def panel_tensor(fmt: str, q: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, group: int) -> QTensor:
    """A panel QTensor from values q [rows, cols] (0..15, 0..31, 0..63 or 0..255) and float16 scales and
    mins [rows, cols // G] (the symmetric formats: mins None)."""
    rows, cols = q.shape
    if (mins is None) != (fmt in SYMMETRIC_ZERO):
        raise ValueError(f"{fmt}: mins must be given exactly when the format has a mins plane")
    planes = {"qs": pack_panels(fmt, q), "scales": _panel_groups(scales)}
    if mins is not None:
        planes["mins"] = _panel_groups(mins)
    return QTensor(fmt, (rows, cols), group, planes)


def panel_values(t: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q [rows, cols] uint8, scales, mins [rows, cols // G] float16) of a panel QTensor (the
    symmetric formats: mins None)."""
    rows, cols = t.shape
    mins = t.planes.get("mins")
    return (unpack_panels(t.fmt, t.planes["qs"], rows, cols), _unpanel_groups(t.planes["scales"], rows),
            None if mins is None else _unpanel_groups(mins, rows))


def pack_panels(fmt: str, q: np.ndarray) -> np.ndarray:
    """Values [rows, cols] -> panel bytes [P, cols // 32, PANEL_BLOCK_BYTES[fmt]] (see the module doc)."""
    rows, cols = q.shape
    P = -(-rows // PANEL)
    v = np.zeros((P * PANEL, cols), np.uint8)
    v[:rows] = q
    if PANEL_BITS[fmt] == 8:  # (p, i, b, j, c) with column = 32b + 4j + c  ->  (p, b, j, i, c)
        return np.ascontiguousarray(v.reshape(P, PANEL, cols // 32, 8, 4).transpose(0, 2, 3, 1, 4)
                                    .reshape(P, cols // 32, 256))
    # (p, i, b, half, j, c) with column = 32b + 16 half + 4j + c  ->  (p, b, j, i, c, half)
    v = v.reshape(P, PANEL, cols // 32, 2, 4, 4).transpose(0, 2, 4, 1, 5, 3)
    nib = (v[..., 0] & 0x0F) | ((v[..., 1] & 0x0F) << 4)  # (p, b, j, i, c)
    out = np.empty((P, cols // 32, PANEL_BLOCK_BYTES[fmt]), np.uint8)
    out[:, :, :128] = nib.reshape(P, cols // 32, 128)
    if PANEL_BITS[fmt] == 5:  # byte 4i + c, bit 2j + half
        bits = ((v >> 4) & 1).transpose(0, 1, 3, 4, 2, 5).reshape(P, cols // 32, 32, 8).astype(np.uint16)
        out[:, :, 128:] = (bits << np.arange(8, dtype=np.uint16)).sum(axis=3).astype(np.uint8)
    if PANEL_BITS[fmt] == 6:  # byte 32 (j // 2) + 4i + c, bits 2 (2 (j % 2) + half) and up
        pairs = ((v >> 4) & 3).transpose(0, 1, 3, 4, 2, 5).reshape(P, cols // 32, 32, 2, 4).astype(np.uint16)
        packed = (pairs << (2 * np.arange(4, dtype=np.uint16))).sum(axis=4).astype(np.uint8)
        out[:, :, 128:] = packed.transpose(0, 1, 3, 2).reshape(P, cols // 32, 64)  # (p, b, j // 2, 4i + c)
    return out


def unpack_panels(fmt: str, qs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Panel bytes [P, cols // 32, PANEL_BLOCK_BYTES[fmt]] -> values [rows, cols]."""
    P = qs.shape[0]
    qs = np.asarray(qs)
    if PANEL_BITS[fmt] == 8:  # (p, b, j, i, c) -> (p, i, b, j, c)
        v8 = qs.reshape(P, cols // 32, 8, PANEL, 4).transpose(0, 3, 1, 2, 4).reshape(P * PANEL, cols)
        return np.ascontiguousarray(v8[:rows])
    b = qs[:, :, :128].reshape(P, cols // 32, 4, PANEL, 4, 1)
    v = np.concatenate([b & 0x0F, b >> 4], axis=5)  # (p, b, j, i, c, half)
    j = np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1, 1, 1)
    half = np.arange(2, dtype=np.uint8).reshape(1, 1, 1, 1, 1, 2)
    if PANEL_BITS[fmt] == 5:
        plane = qs[:, :, 128:].reshape(P, cols // 32, 1, PANEL, 4, 1)
        v = v | (((plane >> (2 * j + half)) & 1) << 4).astype(np.uint8)
    if PANEL_BITS[fmt] == 6:
        planes = qs[:, :, 128:].reshape(P, cols // 32, 2, PANEL, 4)[:, :, [0, 0, 1, 1], :, :, None]
        v = v | (((planes >> (2 * (2 * (j % 2) + half))) & 3) << 4).astype(np.uint8)
    # (p, b, j, i, c, half) -> (p, i, b, half, j, c)
    return np.ascontiguousarray(v.transpose(0, 3, 1, 5, 2, 4).reshape(P * PANEL, cols)[:rows])


def _panel_groups(a: np.ndarray) -> np.ndarray:
    """[rows, ng] -> [P, ng, 8] (zero rows past the end)."""
    rows, ng = a.shape
    P = -(-rows // PANEL)
    out = np.zeros((P * PANEL, ng), a.dtype)
    out[:rows] = a
    return np.ascontiguousarray(out.reshape(P, PANEL, ng).transpose(0, 2, 1))


def _unpanel_groups(a: np.ndarray, rows: int) -> np.ndarray:
    P, ng, _ = a.shape
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 1).reshape(P * PANEL, ng)[:rows])


def gguf_q4_values(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 block bytes [rows, nblocks, 16] -> values [rows, nblocks * 32]: byte i of a block holds
    column i in its low nibble and column i + 16 in its high nibble."""
    rows = qs.shape[0]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, -1)


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
    if t.fmt == "q8":
        sc = p["scales"].astype(np.float32).reshape(rows, cols // G, 1)
        return (p["qs"].astype(np.float32).reshape(rows, cols // G, G) * sc).reshape(rows, cols)
    if t.fmt in PANEL_FORMATS:
        q, scales, mins = panel_values(t)
        sc4 = scales.astype(np.float32)[..., None]
        mi = -SYMMETRIC_ZERO[t.fmt] * sc4 if mins is None else mins.astype(np.float32)[..., None]
        return (q.reshape(rows, cols // G, G).astype(np.float32) * sc4 + mi).reshape(rows, cols)
    raise UnsupportedQuantError(f"unknown weight format {t.fmt!r}")


# --- direct GGUF block import ------------------------------------------------------------------
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
_Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)])
_Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
QK_K = 256  # values per K-quant super-block
# Q4_K's and Q5_K's per-32 scale d * sc and minimum dmin * m (sc, m 6-bit), and Q6_K's per-16 scale
# d * sc (sc int8), rounded to our float16 planes: each weight is then within this fraction of
# |d * sc * q| + |dmin * m| (Q6_K: |d * sc * (q - 32)|) of gguf's own dequantization, while the
# products stay in float16's normal range (at least 2^-14).
Q4_K_F16_REL_ERR = 2.0**-11


def _gguf_q5_values(b: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Values 0..31 [rows, cols] of Q5_0 / Q5_1 blocks: nibbles as Q4's, bit j of qh is column j's 16."""
    low = gguf_q4_values(np.asarray(b["qs"]).reshape(rows, cols // GGUF_BLOCK, 16))
    high = (np.asarray(b["qh"]).reshape(rows, cols // GGUF_BLOCK, 1) >> np.arange(32, dtype=np.uint32)) & 1
    return (low | (high.reshape(rows, cols) << 4).astype(np.uint8)).astype(np.uint8)


def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int, fmt: str | None = None) -> QTensor:
    """Repack GGUF block bytes of a [rows, cols] tensor into panel or q8 planes without quantizing
    again: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 exactly, Q4_K, Q5_K and Q6_K up to
    Q4_K_F16_REL_ERR (their scale products in float16). Q8_0 becomes q8p, or q8 where `fmt` asks."""
    if cols % GGUF_BLOCK:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of the GGUF block size 32")
    nb = rows * cols // GGUF_BLOCK
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    shape2 = (rows, cols // GGUF_BLOCK)
    if kind == "Q4_1":
        b = raw.view(_Q4_1)[:nb]
        q = gguf_q4_values(np.asarray(b["qs"]).reshape(rows, cols // GGUF_BLOCK, 16))
        return panel_tensor("q4", q, np.asarray(b["d"]).reshape(shape2), np.asarray(b["m"]).reshape(shape2), 32)
    if kind == "Q4_0":  # d * (q - 8)
        b = raw.view(_Q4_0)[:nb]
        q = gguf_q4_values(np.asarray(b["qs"]).reshape(rows, cols // GGUF_BLOCK, 16))
        return panel_tensor("q4s", q, np.ascontiguousarray(b["d"]).reshape(shape2), None, 32)
    if kind == "Q5_0":  # d * (q - 16)
        b = raw.view(_Q5_0)[:nb]
        return panel_tensor("q5s", _gguf_q5_values(b, rows, cols), np.ascontiguousarray(b["d"]).reshape(shape2),
                            None, 32)
    if kind == "Q5_1":
        b = raw.view(_Q5_1)[:nb]
        return panel_tensor("q5", _gguf_q5_values(b, rows, cols), np.asarray(b["d"]).reshape(shape2),
                            np.asarray(b["m"]).reshape(shape2), 32)
    if kind in ("Q4_K", "Q5_K"):
        return _from_k_quant(kind, raw, rows, cols)
    if kind == "Q6_K":
        return _from_q6_k(raw, rows, cols)
    if kind == "Q8_0" and fmt == "q8":
        b = raw.view(_Q8_0)[:nb]
        return QTensor("q8", (rows, cols), 32, {
            "qs": np.ascontiguousarray(b["qs"]).reshape(rows, cols),
            "scales": np.ascontiguousarray(b["d"]).reshape(shape2),
        })
    if kind == "Q8_0":  # d * qs, qs int8: stored as qs + 128
        b = raw.view(_Q8_0)[:nb]
        q = (np.asarray(b["qs"]).reshape(rows, cols).astype(np.int16) + 128).astype(np.uint8)
        return panel_tensor("q8p", q, np.ascontiguousarray(b["d"]).reshape(shape2), None, 32)
    raise UnsupportedQuantError(
        f"GGUF type {kind} has no direct import (only Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")


def q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and minimums of Q4_K super-blocks from their 12 packed bytes [n, 12]:
    bytes 0-3 hold sc 0-3 (low 6 bits), 4-7 m 0-3, 8-11 the low 4 bits of sc/m 4-7, whose high 2
    bits sit in the top bits of bytes 0-3 (sc) and 4-7 (m)."""
    b = packed.astype(np.uint8)
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _from_k_quant(kind: str, raw: np.ndarray, rows: int, cols: int) -> QTensor:
    """Q4_K / Q5_K super-blocks (256 values: 8 groups of 32, each d * sc * q - dmin * m) as q4 / q5
    with group 32: the values as they are, scale and minimum per group rounded once to float16."""
    if cols % QK_K:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of the {kind} super-block size {QK_K}")
    nsb = rows * cols // QK_K
    b = raw.view(_Q4_K if kind == "Q4_K" else _Q5_K)[:nsb]
    sc, m = q4_k_scales_mins(np.asarray(b["scales"]))
    scale = np.asarray(b["d"]).astype(np.float32)[:, None] * sc
    minimum = -(np.asarray(b["dmin"]).astype(np.float32)[:, None] * m)
    # qs: 4 chunks of 32 bytes; chunk j holds group 2j in its low nibbles and group 2j + 1 in its high.
    qs = np.asarray(b["qs"]).reshape(nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = qs & 0x0F  # (super-block, chunk, nibble, 32)
    if kind == "Q5_K":  # bit 2j + h of qh[l] is the 16 of value l of group 2j + h
        bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        q = q | (((np.asarray(b["qh"]).reshape(nsb, 1, 1, 32) >> bit) & 1) << 4)
    ng = cols // GGUF_BLOCK
    scales16, mins16 = scale.astype(np.float16), minimum.astype(np.float16)
    if not (np.all(np.isfinite(scales16)) and np.all(np.isfinite(mins16))):
        raise UnsupportedQuantError(f"a {kind} scale or minimum is too large for float16")
    fmt = "q4" if kind == "Q4_K" else "q5"
    return panel_tensor(fmt, q.astype(np.uint8).reshape(rows, cols), scales16.reshape(rows, ng),
                        mins16.reshape(rows, ng), 32)


def _from_q6_k(raw: np.ndarray, rows: int, cols: int) -> QTensor:
    """Q6_K super-blocks (256 values: 16 groups of 16, each d * sc * (q - 32), q 6-bit) as q6: the
    values as they are, each group's scale rounded once to float16."""
    if cols % QK_K:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of the Q6_K super-block size {QK_K}")
    nsb = rows * cols // QK_K
    b = raw.view(_Q6_K)[:nsb]
    # Each half of a super-block (128 values) has 64 ql bytes and 32 qh bytes: value 64n + 32k + l
    # (n the nibble, k the ql chunk, l < 32) is nibble n of ql[32k + l] with bits 2(2n + k), +1 of
    # qh[l] above it.
    ql = np.asarray(b["ql"]).reshape(nsb, 2, 1, 2, 32)
    nib = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)) & 0x0F  # (sb, half, n, k, l)
    qh = np.asarray(b["qh"]).reshape(nsb, 2, 1, 1, 32)
    n, k = np.arange(2, dtype=np.uint8).reshape(1, 1, 2, 1, 1), np.arange(2, dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    shift = 2 * (2 * n + k)
    q = nib | (((qh >> shift) & 3) << 4)
    scale = np.asarray(b["d"]).astype(np.float32)[:, None] * np.asarray(b["scales"]).astype(np.float32)
    scales16 = scale.astype(np.float16)
    if not np.all(np.isfinite(scales16)):
        raise UnsupportedQuantError("a Q6_K scale is too large for float16")
    return panel_tensor("q6", q.astype(np.uint8).reshape(rows, cols), scales16.reshape(rows, cols // Q6_GROUP),
                        None, Q6_GROUP)
