"""GGUF files made here from the default model (nothing is downloaded): its metadata and tokenizer as
they are, its matrices requantized by the gguf package's own quantizer to the block types a test needs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

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
        w.add_tensor(t.name, gguf.quants.quantize(floats, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
