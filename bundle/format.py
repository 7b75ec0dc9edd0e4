"""The seqshare bundle: one self-describing file with a model's weights in runtime layout.

Plain bundle, format version 1 (little-endian):

  [0, 64)            preamble: magic b"SEQSHRB\\0", u32 version, u32 flags (0), u64 header_len,
                     u64 data_offset, u64 data_len, 24 reserved zero bytes
  [64, 64+hlen)      header: UTF-8 JSON (spec, quant, limits, tokenizer, chat template, special
                     tokens, tensor table, weight_bytes, weight_digest)
  [data_offset, ..)  tensor planes; data_offset is a multiple of 4096 and every plane's offset
                     (relative to data_offset) a multiple of 64, so a page-aligned mmap gives
                     64-byte-aligned arrays the kernels read in place.

The weight digest is SHA-256 over, for each tensor in table order, its name, format, shape and
group size, then for each plane its name, dtype, shape and bytes. It ignores offsets, limits,
tokenizer and templates, so bundles of one checkpoint and quant share it whatever else differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqshare.bundle.convert import Checkpoint, TensorPlan
from seqshare.bundle.quant import KSCALE_BYTES, PANEL_BLOCK_BYTES, SUPER_COLS, SYMMETRIC_ZERO, QTensor
from seqshare.worker.errors import BadMagicError, TruncatedBundleError, UnsupportedVersionError

MAGIC = b"SEQSHRB\0"
VERSION = 2  # 2: q4 weights in 8-row panels (bundle/quant.py)
PREAMBLE = struct.Struct("<8sIIQQQ24x")  # 64 bytes
DATA_ALIGN = 4096
PLANE_ALIGN = 64
_DIGEST_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class Limits:
    """Admission limits and memory-plan inputs (not shapes): share + unshare + generated <= seq."""

    share_length: int
    unshare_length: int
    seq_length: int

    @classmethod
    def default(
        cls, context_length: int, share: int | None = None, unshare: int | None = None, seq: int | None = None
    ) -> Limits:
        seq = seq or context_length
        unshare = unshare or max(1, seq // 8)
        share = share or max(1, seq - unshare - seq // 8)
        return cls(share, unshare, seq).validated(context_length)

    def validated(self, context_length: int) -> Limits:
        if min(self.share_length, self.unshare_length, self.seq_length) < 1:
            raise ValueError(f"limits must be positive: {self}")
        if self.seq_length > context_length:
            raise ValueError(f"seq_length {self.seq_length} exceeds the model's context of {context_length}")
        if self.share_length + self.unshare_length >= self.seq_length:
            raise ValueError(
                f"share_length {self.share_length} + unshare_length {self.unshare_length} leave no room "
                f"to generate within seq_length {self.seq_length}"
            )
        return self


def plane_layout(fmt: str, shape: tuple[int, ...], group: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(plane, numpy dtype, shape) of each plane of a tensor, in file order (see bundle/quant.py)."""
    if len(shape) == 1 or fmt == "f32":
        return [("data", "<f4", shape)]
    rows, cols = shape
    if fmt in ("f16", "bf16"):
        return [("data", "<u2", shape)]
    if fmt == "q8":
        return [("qs", "i1", shape), ("scales", "<f2", (rows, cols // group))]
    if fmt in KSCALE_BYTES:
        panels = -(-rows // 8)
        return [("qs", "u1", (panels, cols // 32, PANEL_BLOCK_BYTES[fmt])),
                ("scales", "u1", (panels, cols // SUPER_COLS, KSCALE_BYTES[fmt]))]
    if fmt in PANEL_BLOCK_BYTES:
        panels = -(-rows // 8)
        planes: list[tuple[str, str, tuple[int, ...]]] = [
            ("qs", "u1", (panels, cols // 32, PANEL_BLOCK_BYTES[fmt])),
            ("scales", "<f2", (panels, cols // group, 8)),
        ]
        return planes if fmt in SYMMETRIC_ZERO else [*planes, ("mins", "<f2", (panels, cols // group, 8))]
    raise ValueError(f"unknown format {fmt}")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def tensor_table(plan: list[TensorPlan]) -> tuple[list[dict[str, Any]], int]:
    """The header's tensor table with plane offsets, and the data section's length."""
    table, off = [], 0
    for p in plan:
        planes = []
        for name, dtype, shape in plane_layout(p.fmt, p.shape, p.group_size):
            off = _align(off, PLANE_ALIGN)
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            planes.append(
                {"name": name, "dtype": dtype, "shape": list(shape), "offset": off, "nbytes": nbytes}
            )
            off += nbytes
        table.append(
            {
                "name": p.name,
                "fmt": p.fmt,
                "shape": list(p.shape),
                "group_size": p.group_size,
                "planes": planes,
            }
        )
    return table, off


def _digest_update(h: Any, entry: dict[str, Any], planes: dict[str, np.ndarray]) -> None:
    h.update(f"{entry['name']}\0{entry['fmt']}\0{entry['shape']}\0{entry['group_size']}\0".encode())
    for pl in entry["planes"]:
        h.update(f"{pl['name']}\0{pl['dtype']}\0{pl['shape']}\0".encode())
        h.update(np.ascontiguousarray(planes[pl["name"]]).view(np.uint8).data)


def build_header(
    ck: Checkpoint, limits: Limits, table: list[dict[str, Any]], data_len: int
) -> dict[str, Any]:
    return {
        "format_version": VERSION,
        "spec": ck.spec.to_dict(),
        "param_count": ck.param_count,
        "quant": ck.quant,
        "group_size": ck.group_size,
        "limits": asdict(limits),
        "context_length": ck.context_length,
        "tokenizer": ck.tokenizer_json,
        "chat_template": ck.chat_template,
        "special_tokens": ck.special_tokens.to_dict(),
        "source": {"name": ck.source.name, "kind": "hf" if ck.source.is_dir() else "gguf"},
        "tensors": table,
        "weight_bytes": data_len,
        "weight_digest": _DIGEST_PLACEHOLDER,
    }


def _encode(header: dict[str, Any]) -> bytes:
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()


def write_bundle(
    ck: Checkpoint, out: Path, limits: Limits, on_tensor: Callable[[str, int], object] | None = None
) -> dict[str, Any]:
    """Stream `ck` into a new bundle at `out` (atomically: temp file, fsync, rename); return its header."""
    table, data_len = tensor_table(ck.plan)
    header = build_header(ck, limits.validated(ck.context_length), table, data_len)
    hbytes = _encode(header)
    data_offset = _align(PREAMBLE.size + len(hbytes), DATA_ALIGN)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    h = hashlib.sha256(b"seqshare-weights-v1\0")
    try:
        with tmp.open("wb") as f:
            f.write(PREAMBLE.pack(MAGIC, VERSION, 0, len(hbytes), data_offset, data_len))
            f.write(hbytes)
            for entry, (name, t) in zip(table, ck.iter_tensors(), strict=True):
                assert entry["name"] == name
                _digest_update(h, entry, t.planes)
                for pl in entry["planes"]:
                    f.seek(data_offset + pl["offset"])
                    f.write(np.ascontiguousarray(t.planes[pl["name"]]).view(np.uint8).data)
                if on_tensor:
                    on_tensor(name, t.nbytes)
            f.truncate(data_offset + data_len)
            header["weight_digest"] = h.hexdigest()
            f.seek(PREAMBLE.size)
            f.write(_encode(header))  # same length: the digest replaced a placeholder of equal size
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return header


@dataclass(frozen=True)
class ParsedBundle:
    header: dict[str, Any]
    data_offset: int
    data_len: int

    @property
    def weight_digest(self) -> str:
        return str(self.header["weight_digest"])


def parse_preamble(head: bytes, what: str) -> tuple[int, int, int]:
    """(header_len, data_offset, data_len) after checking magic and version."""
    if len(head) < PREAMBLE.size:
        raise TruncatedBundleError(f"{what}: {len(head)} bytes is shorter than a bundle preamble")
    magic, version, _flags, hlen, data_offset, data_len = PREAMBLE.unpack_from(head)
    if magic != MAGIC:
        raise BadMagicError(f"{what} is not a seqshare bundle (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise UnsupportedVersionError(
            f"{what} has bundle format version {version}; this build reads version {VERSION}: recompile it"
        )
    return hlen, data_offset, data_len


def parse_bundle(buf: Any, total: int, what: str) -> ParsedBundle:
    """Validate a plain bundle held in `buf` (bytes, mmap or memoryview) of `total` bytes."""
    hlen, data_offset, data_len = parse_preamble(bytes(buf[: PREAMBLE.size]), what)
    if total < PREAMBLE.size + hlen or total < data_offset + data_len:
        raise TruncatedBundleError(
            f"{what} is {total} bytes but its preamble describes {data_offset + data_len}: "
            "the file is cut short"
        )
    header = json.loads(bytes(buf[PREAMBLE.size : PREAMBLE.size + hlen]))
    return ParsedBundle(header, data_offset, data_len)


def tensor_views(pb: ParsedBundle, buf: Any) -> dict[str, QTensor]:
    """Numpy views of every tensor's planes into `buf` (no copy; read-only if `buf` is)."""
    out = {}
    for e in pb.header["tensors"]:
        planes = {
            pl["name"]: np.frombuffer(
                buf,
                dtype=np.dtype(pl["dtype"]),
                count=int(np.prod(pl["shape"])),
                offset=pb.data_offset + pl["offset"],
            ).reshape(pl["shape"])
            for pl in e["planes"]
        }
        out[e["name"]] = QTensor(e["fmt"], tuple(e["shape"]), e["group_size"], planes)
    return out


def compute_digest(pb: ParsedBundle, tensors: dict[str, QTensor]) -> str:
    """Recompute the weight digest from the tensor data (to verify a bundle)."""
    h = hashlib.sha256(b"seqshare-weights-v1\0")
    for e in pb.header["tensors"]:
        _digest_update(h, e, tensors[e["name"]].planes)
    return h.hexdigest()


def iter_table(header: dict[str, Any]) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    for e in header["tensors"]:
        yield e["name"], e["fmt"], tuple(e["shape"])
