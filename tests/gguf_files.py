"""GGUF files made here from the default model (nothing is downloaded): its metadata and tokenizer as
they are, its matrices requantized by the gguf package's own quantizer to the block types a test needs
(Q6_K, which the package only decodes, by quantize_q6_k)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from seqshare.bundle.quant import _Q6_K

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
        blocks = quantize_q6_k(floats) if qtype == T.Q6_K else gguf.quants.quantize(floats, qtype)
        w.add_tensor(t.name, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Float rows (columns a multiple of 256) -> Q6_K block bytes (rows, cols / 256 * 210): per 16
    values a scale amax / 31 as int8 multiples of the super-block's d, values q - 32 in -32..31.
    Only the bytes come from here; tests read them back with the gguf package's dequantize."""
    rows = w.shape[0]
    x = np.asarray(w, np.float32).reshape(-1, 16, 16)  # (super-block, sub-block, value)
    sub = np.abs(x).max(axis=2) / 31.0
    d = (sub.max(axis=1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(sub, d32, out=np.zeros_like(sub), where=d32 > 0)), -128, 127)
    step = (d32 * sc)[..., None]
    q = np.clip(np.rint(np.divide(x, step, out=np.zeros_like(x), where=step > 0)), -32, 31).astype(np.int16) + 32
    # value 128n + 64 nib + 32k + l: nibble `nib` of ql[64n + 32k + l], bits 2(2 nib + k) of qh[32n + l]
    q = q.reshape(-1, 2, 2, 2, 32).astype(np.uint8)  # (super-block, n, nib, k, l)
    b = np.zeros(len(x), _Q6_K)
    b["ql"] = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(-1, 128)
    shift = 2 * (2 * np.arange(2).reshape(1, 1, 2, 1, 1) + np.arange(2).reshape(1, 1, 1, 2, 1))
    b["qh"] = (((q >> 4) & 3).astype(np.uint16) << shift).sum(axis=(2, 3)).astype(np.uint8).reshape(-1, 64)
    b["scales"] = sc.astype(np.int8)
    b["d"] = d
    return b.view(np.uint8).reshape(rows, -1)
