"""GGUF blocks into the runtime formats of bundle/quant.py without a second quantization: the values
and float16 scales move as they are (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), and the K-quants keep their
six- or eight-bit multiples of each super-block's float16 d (and dmin) as K-scale panels (q4k, q5k,
q6k), so every weight is gguf's own dequantization of it.
"""

from __future__ import annotations

import numpy as np

from seqshare.bundle.quant import QTensor, k_panel_tensor, panel_tensor
from seqshare.worker.errors import UnsupportedQuantError

GGUF_BLOCK = 32


def gguf_q4_values(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 block bytes [rows, nblocks, 16] -> values [rows, nblocks * 32]: byte i of a block holds
    column i in its low nibble and column i + 16 in its high nibble."""
    rows = qs.shape[0]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, -1)


_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
_Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)])
_Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
QK_K = 256  # values per K-quant super-block


def _gguf_q5_values(b: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Values 0..31 [rows, cols] of Q5_0 / Q5_1 blocks: nibbles as Q4's, bit j of qh is column j's 16."""
    low = gguf_q4_values(np.asarray(b["qs"]).reshape(rows, cols // GGUF_BLOCK, 16))
    high = (np.asarray(b["qh"]).reshape(rows, cols // GGUF_BLOCK, 1) >> np.arange(32, dtype=np.uint32)) & 1
    return (low | (high.reshape(rows, cols) << 4).astype(np.uint8)).astype(np.uint8)


def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int, fmt: str | None = None) -> QTensor:
    """Repack GGUF block bytes of a [rows, cols] tensor into panel or q8 planes without quantizing
    again, every weight gguf's own dequantization of it (Q6_K: up to float32 rounding, as
    d sc q - 32 d sc). Q8_0 becomes q8p, or q8 where `fmt` asks."""
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
    """Q4_K / Q5_K super-blocks (256 values: 8 groups of 32, each d * sc * q - dmin * m) as q4k / q5k:
    values, d, dmin, sc and m as they are."""
    if cols % QK_K:
        raise UnsupportedQuantError(f"{cols} columns are not a multiple of the {kind} super-block size {QK_K}")
    nsb = rows * cols // QK_K
    b = raw.view(_Q4_K if kind == "Q4_K" else _Q5_K)[:nsb]
    sc, m = q4_k_scales_mins(np.asarray(b["scales"]))
    # qs: 4 chunks of 32 bytes; chunk j holds group 2j in its low nibbles and group 2j + 1 in its high.
    qs = np.asarray(b["qs"]).reshape(nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = qs & 0x0F  # (super-block, chunk, nibble, 32)
    if kind == "Q5_K":  # bit 2j + h of qh[l] is the 16 of value l of group 2j + h
        bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        q = q | (((np.asarray(b["qh"]).reshape(nsb, 1, 1, 32) >> bit) & 1) << 4)
    per_row = cols // QK_K
    return k_panel_tensor("q4k" if kind == "Q4_K" else "q5k", q.astype(np.uint8).reshape(rows, cols),
                          np.ascontiguousarray(b["d"]).reshape(rows, per_row), sc.reshape(rows, per_row * 8),
                          np.ascontiguousarray(b["dmin"]).reshape(rows, per_row), m.reshape(rows, per_row * 8))


def _from_q6_k(raw: np.ndarray, rows: int, cols: int) -> QTensor:
    """Q6_K super-blocks (256 values: 16 groups of 16, each d * sc * (q - 32), q 6-bit, sc int8) as q6k:
    values, d and sc as they are."""
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
    q = nib | (((qh >> (2 * (2 * n + k))) & 3) << 4)
    per_row = cols // QK_K
    d = np.ascontiguousarray(b["d"]).reshape(rows, per_row)
    return k_panel_tensor("q6k", q.astype(np.uint8).reshape(rows, cols), d,
                          np.ascontiguousarray(b["scales"]).reshape(rows, per_row * 16))
