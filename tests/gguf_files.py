"""GGUF files made here from the default model (nothing is downloaded): its metadata and tokenizer as
they are, its matrices requantized by the gguf package's own quantizer to the block types a test needs
(Q6_K, Q4_K and Q5_K, which the package only decodes, by quantize_q6_k and quantize_q4_k)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from seqshare.bundle.gguf_blocks import _Q4_K, _Q5_K, _Q6_K
from seqshare.bundle.quant import k_panel_values, quantize

T = gguf.GGMLQuantizationType


def requantize_gguf(src: Path, out: Path, qtype_of: Callable[[str], T]) -> None:
    """Copy `src` to `out` with every 2-D tensor dequantized and quantized again to qtype_of(name)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if len(t.shape) == 1:
            w.add_tensor(t.name, gguf.quants.dequantize(data, T(t.tensor_type)).reshape(-1))
            continue
        qtype = qtype_of(t.name)
        floats = gguf.quants.dequantize(data, T(t.tensor_type))
        if qtype == T.Q6_K:
            blocks = quantize_q6_k(floats)
        elif qtype in (T.Q4_K, T.Q5_K):
            blocks = quantize_q4_k(floats, five=qtype == T.Q5_K)
        else:
            blocks = gguf.quants.quantize(floats, qtype)
        w.add_tensor(t.name, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Float rows (columns a multiple of 256) -> Q6_K block bytes (rows, cols / 256 * 210): the values,
    d and int8 sc of seqshare's own K-scale quantizer, packed as gguf lays them out. Tests read them
    back with the gguf package's dequantize."""
    rows, cols = w.shape
    q, d, sc, _, _ = k_panel_values(quantize(np.asarray(w, np.float32), "q6k", 16))
    # value 128n + 64 nib + 32k + l: nibble `nib` of ql[64n + 32k + l], bits 2(2 nib + k) of qh[32n + l]
    q = q.reshape(-1, 2, 2, 2, 32)  # (super-block, n, nib, k, l)
    b = np.zeros(rows * cols // 256, _Q6_K)
    b["ql"] = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(-1, 128)
    shift = 2 * (2 * np.arange(2).reshape(1, 1, 2, 1, 1) + np.arange(2).reshape(1, 1, 1, 2, 1))
    b["qh"] = (((q >> 4) & 3).astype(np.uint16) << shift).sum(axis=(2, 3)).astype(np.uint8).reshape(-1, 64)
    b["scales"] = sc.reshape(-1, 16)
    b["d"] = d.reshape(-1)
    return b.view(np.uint8).reshape(rows, -1)


def quantize_q4_k(w: np.ndarray, five: bool = False) -> np.ndarray:
    """Float rows (columns a multiple of 256) -> Q4_K (Q5_K) block bytes: the values, d, dmin and six-bit
    sc and m of seqshare's own K-scale quantizer, packed as gguf lays them out. Tests read them back
    with the gguf package's dequantize."""
    rows, cols = w.shape
    q, d, sc, dmin, m = k_panel_values(quantize(np.asarray(w, np.float32), "q5k" if five else "q4k", 32))
    sc, m = sc.reshape(-1, 8), m.reshape(-1, 8)  # (super-block, group)
    b = np.zeros(rows * cols // 256, _Q5_K if five else _Q4_K)
    b["d"], b["dmin"] = d.reshape(-1), dmin.reshape(-1)
    # bytes 0-3: sc 0-3 and the top two bits of sc 4-7; 4-7: the same for m; 8-11: low nibbles of sc/m 4-7
    b["scales"] = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                                  (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    v = q.reshape(-1, 4, 2, 32)  # (super-block, chunk j, group 2j + h, value l)
    b["qs"] = ((v[:, :, 0] & 15) | ((v[:, :, 1] & 15) << 4)).reshape(-1, 128)
    if five:  # bit 2j + h of qh[l]: the 16 of value l of group 2j + h
        bit = np.arange(8, dtype=np.uint16).reshape(1, 4, 2, 1)
        b["qh"] = (((v >> 4) & 1).astype(np.uint16) << bit).sum(axis=(1, 2)).astype(np.uint8)
    return b.view(np.uint8).reshape(rows, -1)
