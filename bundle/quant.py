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
whole bytes: byte 32 * j + 4 * i + c (j < 8) holds column 32b + 4j + c of row 8p + i. q6, q4s,
q5s and q8p are symmetric: their minimum is -2^(bits - 1) x their scale (SYMMETRIC_ZERO), so they
have no mins plane. Scales and mins of the panel's 8 rows sit side by side per group. One kernel
reads one layout for any number of tokens, so a row's result never depends on how many tokens were
multiplied with it (batch invariance).

K-scale panels (q4k, q5k, q6k: GGUF Q4_K, Q5_K, Q6_K as stored) replace the float16 scale and mins
planes with one byte plane per 256-column super-block (KSCALE_BYTES, native/ops.h):

  q4k   qs     as q4                       value = d * sc * q - dmin * m: G = 32, sc and m 0..63
        scales uint8  [P, cols // 256, 160]  d float16 [8] (the panel's rows), dmin float16 [8], then
                                             sc [8 groups][8 rows], then m [8 groups][8 rows]
  q5k   qs as q5, scales as q4k
  q6k   qs     as q6                       value = d * sc * (q - 32): G = 16, sc int8
        scales uint8  [P, cols // 256, 144]  d float16 [8], then sc [16 groups][8 rows]

GGUF imports are lossless (bundle/gguf_blocks.py): Q4_1 (d, m) -> q4 (scale=d, min=m); Q4_0 (d) ->
q4s (scale=d); Q5_1 -> q5 (scale=d, min=m); Q5_0 -> q5s (scale=d); Q8_0 (d) -> q8p (scale=d,
q = qs + 128), or q8 for the output head (scale=d); Q4_K, Q5_K, Q6_K -> q4k, q5k, q6k. q8p multiplies
int8 activations as llama.cpp's Q8_0 does (VNNI's byte dot products: twice q8's multiply-adds per
instruction); q8 takes int16 activations, which keep more accuracy: for the head, whose argmax is
the answer, and for `--quant int8`. The bits and float16 values are moved, never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from seqshare.worker.errors import UnsupportedQuantError

WeightFormat = Literal["f32", "f16", "bf16", "q8", "q4", "q5", "q6", "q4s", "q5s", "q8p", "q4k", "q5k", "q6k"]
FORMATS: tuple[str, ...] = ("f32", "f16", "bf16", "q8", "q4", "q5", "q6", "q4s", "q5s", "q8p", "q4k", "q5k", "q6k")
PANEL_FORMATS = ("q4", "q5", "q6", "q4s", "q5s", "q8p", "q4k", "q5k", "q6k")  # stored in 8-row panels
_LEVELS = {"q4": 15, "q5": 31, "q4k": 15, "q5k": 31}
PANEL_BITS = {"q4": 4, "q5": 5, "q6": 6, "q4s": 4, "q5s": 5, "q8p": 8, "q4k": 4, "q5k": 5, "q6k": 6}
SUPER_COLS = 256  # a K-scale panel's super-block
K_GROUP = {"q4k": 32, "q5k": 32, "q6k": 16}  # the K-scale panels and their only group sizes
KSCALE_BYTES = {"q4k": 160, "q5k": 160, "q6k": 144}  # per super-block of a panel
# The value that stands for 0 in the symmetric panels: their minimum is -zero x their scale.
SYMMETRIC_ZERO = {"q4s": 8, "q5s": 16, "q6": 32, "q8p": 128}
PANEL_BLOCK_BYTES = {f: 128 + 32 * (b - 4) for f, b in PANEL_BITS.items()}  # bytes per 32 columns of a panel
GROUP_SIZES = (32, 64, 128)
Q6_GROUP = 16  # q6's only group size


def default_group(fmt: str) -> int:
    """The group size a format takes unless asked otherwise (q6 and the K-scale panels have one)."""
    return K_GROUP.get(fmt, Q6_GROUP if fmt == "q6" else 32)


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
    if fmt in K_GROUP:
        if group != K_GROUP[fmt] or cols % SUPER_COLS:
            raise UnsupportedQuantError(f"{fmt} takes groups of {K_GROUP[fmt]} in whole 256-column super-blocks")
    elif fmt == "q6":
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
    if fmt in K_GROUP:
        return _quantize_k(w, fmt)
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
    symmetric formats: mins None). K-scale panels have k_panel_values instead."""
    if t.fmt in K_GROUP:
        raise ValueError(f"{t.fmt} keeps K scales, not float16 planes: read it with k_panel_values")
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
    if t.fmt in K_GROUP:
        q, d, sc, dmin, m = k_panel_values(t)
        per = SUPER_COLS // G
        sc4 = (np.repeat(d.astype(np.float32), per, axis=1) * sc.astype(np.float32))[..., None]
        if dmin is None or m is None:
            mi = np.float32(-32) * sc4
        else:
            mi = -(np.repeat(dmin.astype(np.float32), per, axis=1) * m.astype(np.float32))[..., None]
        return (q.reshape(rows, cols // G, G).astype(np.float32) * sc4 + mi).reshape(rows, cols)
    if t.fmt in PANEL_FORMATS:
        q, scales, mins = panel_values(t)
        sc4 = scales.astype(np.float32)[..., None]
        mi = -SYMMETRIC_ZERO[t.fmt] * sc4 if mins is None else mins.astype(np.float32)[..., None]
        return (q.reshape(rows, cols // G, G).astype(np.float32) * sc4 + mi).reshape(rows, cols)
    raise UnsupportedQuantError(f"unknown weight format {t.fmt!r}")


# --- K-scale panels ----------------------------------------------------------------------------
def k_panel_tensor(fmt: str, q: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray | None = None,
                   m: np.ndarray | None = None) -> QTensor:
    """A K-scale panel QTensor from values q [rows, cols], float16 d (and dmin) [rows, cols // 256]
    and the groups' multiples sc (and m) [rows, cols // G] (q6k: sc int8, no dmin or m)."""
    rows, cols = q.shape
    if (dmin is None) != (fmt == "q6k") or (m is None) != (dmin is None):
        raise ValueError(f"{fmt}: dmin and m must be given exactly when the format has minimums")
    parts = [_panel_groups(np.asarray(d, np.float16)).view(np.uint8)]  # (P, supers, 16)
    if dmin is not None:
        parts.append(_panel_groups(np.asarray(dmin, np.float16)).view(np.uint8))
    per = SUPER_COLS // K_GROUP[fmt]
    for multiples in (sc, m):
        if multiples is not None:  # (P, cols // G, 8) -> (P, supers, per * 8): group-major, then row
            g = _panel_groups(np.asarray(multiples).view(np.uint8))
            parts.append(g.reshape(g.shape[0], cols // SUPER_COLS, per * PANEL))
    planes = {"qs": pack_panels(fmt, q), "scales": np.concatenate(parts, axis=2)}
    return QTensor(fmt, (rows, cols), K_GROUP[fmt], planes)


def k_panel_values(t: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(q, d, sc, dmin, m) of a K-scale panel QTensor, as k_panel_tensor takes them."""
    rows, cols = t.shape
    ks = np.asarray(t.planes["scales"])
    P, supers, _ = ks.shape
    per = SUPER_COLS // t.group_size

    def floats(at: int) -> np.ndarray:
        return _unpanel_groups(np.ascontiguousarray(ks[:, :, at : at + 16]).view(np.float16), rows)

    def multiples(at: int, dtype: type) -> np.ndarray:
        g = np.ascontiguousarray(ks[:, :, at : at + per * PANEL]).reshape(P, supers * per, PANEL)
        return _unpanel_groups(g, rows).view(dtype)

    q = unpack_panels(t.fmt, t.planes["qs"], rows, cols)
    if t.fmt == "q6k":
        return q, floats(0), multiples(16, np.int8), None, None
    return q, floats(0), multiples(32, np.uint8), floats(16), multiples(96, np.uint8)


def _quantize_k(w: np.ndarray, fmt: str) -> QTensor:
    """Float weights [rows, cols] to a K-scale panel, as llama.cpp's simplest K quantizer: each
    group's scale (and minimum, at most 0) rounded to a multiple of its super-block's d (dmin)."""
    rows, cols = w.shape
    G = K_GROUP[fmt]
    per, supers = SUPER_COLS // G, cols // SUPER_COLS
    g = w.reshape(rows, supers, per, G)
    if fmt == "q6k":  # q - 32 in -32..31: the largest magnitude at 31
        scale = np.abs(g).max(axis=3) / 31
        d = (scale.max(axis=2) / 127).astype(np.float16)
        sc = _multiples(scale, d, 127).astype(np.int8)
        s = d.astype(np.float32)[..., None] * sc
        q = np.clip(np.rint(_safe_div(g, s[..., None])), -32, 31) + 32
        return k_panel_tensor(fmt, q.astype(np.uint8).reshape(rows, cols), d, sc.reshape(rows, -1))
    levels = _LEVELS[fmt]
    mn = np.minimum(g.min(axis=3), 0)
    scale = (g.max(axis=3) - mn) / levels
    d = (scale.max(axis=2) / 63).astype(np.float16)
    dmin = ((-mn).max(axis=2) / 63).astype(np.float16)
    sc, m = _multiples(scale, d, 63), _multiples(-mn, dmin, 63)
    s = d.astype(np.float32)[..., None] * sc
    lo = dmin.astype(np.float32)[..., None] * m
    q = np.clip(np.rint(_safe_div(g + lo[..., None], s[..., None])), 0, levels)
    return k_panel_tensor(fmt, q.astype(np.uint8).reshape(rows, cols), d, sc.astype(np.uint8).reshape(rows, -1),
                          dmin, m.astype(np.uint8).reshape(rows, -1))


def _multiples(x: np.ndarray, unit: np.ndarray, top: int) -> np.ndarray:
    """x [rows, supers, per] as multiples 0..top of its super-block's float16 unit [rows, supers]."""
    return np.clip(np.rint(_safe_div(x, unit.astype(np.float32)[..., None])), 0, top)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a / np.where(b > 0, b, 1), 0)
