"""The engine's model: weights handed once to the native forward pass, KV caches, prefill and decode.

`Model.prefill` appends a token sequence to a KV (after an optional shared prefix KV) in chunks, so a
progress or cancel callback runs between native calls; `Model.decode` runs one step for a batch of
sequences, grouping those that share a prefix so each prefix is read once per layer. Logits are
computed only for the rows that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from seqshare import _native
from seqshare.bundle.quant import QTensor
from seqshare.bundle.spec import ModelSpec
from seqshare.worker.errors import KVCapacityError
from seqshare.worker.kv_arena import KVArena, slot_rows

if TYPE_CHECKING:
    from seqshare.worker.debug_dump import DumpWriter

KV = _native.KV
KV_DTYPES = ("f16", "f32")
_NO_ROWS = np.zeros(0, dtype=np.int32)

# (prefix KV or None, own KV): one sequence of a decode step.
SeqKV = tuple["_native.KV | None", "_native.KV"]
Progress = Callable[[int, int], None]


class WeightSource(Protocol):
    """What a Checkpoint (bundle/convert.py) and a LoadedBundle (bundle/loader.py) both provide."""

    spec: ModelSpec
    chat_template: str | None

    @property
    def tensors(self) -> dict[str, QTensor]: ...


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from, for reports and cache keys."""

    path: str
    weight_digest: str | None
    quant: str


def native_weights(tensors: dict[str, QTensor]) -> dict[str, Any]:
    """Canonical tensors as the native constructor takes them: vectors as arrays, matrices as
    (fmt, data, scales, mins, group). The arrays are passed by reference, never copied."""
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        if len(t.shape) == 1:
            out[name] = t.planes["data"]
            continue
        data = t.planes["qs"] if "qs" in t.planes else t.planes["data"]
        out[name] = (t.fmt, data, t.planes.get("scales"), t.planes.get("mins"), t.group_size)
    return out


def _tokenizer_of(src: Any) -> Tokenizer:
    tok = getattr(src, "tokenizer", None)
    if not isinstance(tok, Tokenizer):
        tok = Tokenizer.from_str(src.tokenizer_json)
    _return_free_heap()
    return tok


def _return_free_heap() -> None:
    """Parsing a tokenizer's JSON leaves ~25 MiB of freed heap that glibc keeps mapped for good;
    a resident worker would carry it forever. Elsewhere than glibc this is a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class Model:
    """A loaded model ready to run. Not thread-safe: one caller drives it."""

    def __init__(
        self,
        source: Any,
        *,
        threads: int = 0,
        kv_dtype: str = "f16",
        max_batch: int = 32,
        chunk: int = 256,
        kv_pair_tiles: bool = True,
    ) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        if threads > 0 and threads != _native.get_threads():
            _native.set_threads(threads)
        self.spec: ModelSpec = source.spec
        self.kv_dtype = kv_dtype
        self.kv_pairs: bool | None = None if kv_pair_tiles else False  # None: where the attention reads them
        self.chunk = chunk
        self.max_batch = max_batch
        self.tokenizer = _tokenizer_of(source)
        self.chat_template: str | None = source.chat_template
        st = source.special_tokens
        self.special_tokens = st
        self.eos_ids: tuple[int, ...] = tuple(sorted(set(st.eos) | set(self.spec.eos_token_ids)))
        limits = getattr(source, "limits", None)
        self.seq_length: int = limits.seq_length if limits is not None else int(source.context_length)
        self.limits = limits
        self.info = SourceInfo(
            str(getattr(source, "path", getattr(source, "source", ""))),
            getattr(source, "weight_digest", None),
            str(getattr(source, "quant", "")),
        )
        self._source = source  # keeps the weight planes (mmap or arrays) alive
        self._native = _native.Model(self.spec.to_dict(), native_weights(source.tensors), max(chunk, max_batch))
        share = limits.share_length if limits is not None else 0
        self.arena = KVArena(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, kv_dtype, max_batch,
                             slot_rows(self.seq_length, share), self.kv_pairs)

    @classmethod
    def from_checkpoint(
        cls, source: Any, threads: int = 0, kv_dtype: str = "f16", max_batch: int = 32, chunk: int = 256,
        kv_pair_tiles: bool = True,
    ) -> Model:
        """A model over a Checkpoint or a LoadedBundle (anything with spec, tensors, tokenizer)."""
        return cls(source, threads=threads, kv_dtype=kv_dtype, max_batch=max_batch, chunk=chunk,
                   kv_pair_tiles=kv_pair_tiles)

    # ---- KV caches ------------------------------------------------------------------------------
    def new_kv(self, capacity: int, start: int = 0) -> _native.KV:
        """An empty KV with room for `capacity` token positions. `start` is the absolute position of
        its first row: the length of the prefix KV its rows will follow (0 for a whole prompt)."""
        return KV(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, capacity, self.kv_dtype, start,
                  pairs=self.kv_pairs)

    @staticmethod
    def _check_room(kv: _native.KV, n: int) -> None:
        if kv.length + n > kv.capacity:
            raise KVCapacityError(
                f"the KV holds {kv.length} of {kv.capacity} rows; {n} more do not fit "
                f"(short by {kv.length + n - kv.capacity})"
            )

    # ---- forward ----------------------------------------------------------------------------------
    def prefill(
        self,
        tokens: Sequence[int] | np.ndarray,
        kv: _native.KV,
        prefix: _native.KV | None = None,
        want_logits: bool = True,
        dump: DumpWriter | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray | None:
        """Append `tokens` to `kv`, continuing at position prefix.length + kv.length. Returns the
        logits (vocab,) of the last token, or None when not wanted. `progress(done, total)` runs
        between chunks; an exception it raises stops the prefill (the KV keeps the finished chunks)."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(kv, ids.size)
        start_row = kv.length
        logits = None
        for start in range(0, ids.size, self.chunk):
            part = ids[start : start + self.chunk]
            last = start + part.size == ids.size
            rows = np.array([part.size - 1], dtype=np.int32) if last and want_logits else _NO_ROWS
            hidden = None
            if dump is not None:
                hidden = np.empty((self.spec.num_layers, part.size, self.spec.hidden_size), np.float32)
            out = self._native.forward(part, [(prefix, kv, part.size)], rows, hidden)
            if hidden is not None and dump is not None:
                dump.add_hidden(hidden)
            if last and want_logits:
                logits = out[0]
            if progress is not None:
                progress(start + part.size, ids.size)
        if dump is not None:
            dump.finish(kv, start_row, self.spec)
        return logits

    def decode(self, tokens: Sequence[int] | np.ndarray, seqs: Sequence[SeqKV]) -> np.ndarray:
        """One step for B sequences: tokens[b] is appended to seqs[b]'s own KV (after its prefix).
        Returns logits (B, vocab). Sequences sharing a prefix KV object read it once per layer."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        if ids.size != len(seqs):
            raise ValueError(f"decode got {ids.size} tokens for {len(seqs)} sequences")
        for _, kv in seqs:
            self._check_room(kv, 1)
        step = self._native.max_tokens
        parts = []
        for b0 in range(0, ids.size, step):
            group = [(pre, kv, 1) for pre, kv in seqs[b0 : b0 + step]]
            rows = np.arange(len(group), dtype=np.int32)
            parts.append(self._native.forward(ids[b0 : b0 + step], group, rows))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def forward(
        self, tokens: np.ndarray, seqs: Sequence[tuple[_native.KV | None, _native.KV, int]], logit_rows: np.ndarray
    ) -> np.ndarray:
        """The general native call: several sequences' rows at once (e.g. the questions of one
        document prefilled together against its prefix). At most `max_tokens` rows."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        for _, kv, n in seqs:
            self._check_room(kv, n)
        rows = np.ascontiguousarray(logit_rows, dtype=np.int32).reshape(-1)
        return self._native.forward(ids, list(seqs), rows)

    @property
    def max_tokens(self) -> int:
        """Rows one native call can take (the larger of the prefill chunk and the decode batch)."""
        return int(self._native.max_tokens)

    # ---- text -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
