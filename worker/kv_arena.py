"""The KV arena: the own rows of every sequence a model decodes at once, allocated once at load.

A question's own KV holds its prompt rows and its answer rows; the document's rows are in the
prefix cache. Allocating those per question made every answer pay an allocation (and its page
faults) and left the memory plan's "KV arena" a number on paper. The arena holds `slots` KVs
(the model's max_batch), each of `rows` rows: seq_length - share_length, the most a question and
its answer can take after a document (the memory plan counts exactly these). A slot is reset, not
reallocated, for the next sequence; attention reads rows [0, length) only, so nothing of its last
user is ever seen.

A sequence too long for a slot (a whole prompt answered without a shared prefix) or one beyond the
slots gets a KV of its own, as before the arena.
"""

from __future__ import annotations

from seqshare import _native
from seqshare.bundle.spec import ModelSpec

TILE = 32  # K rows per transposed tile (native/kv.h kKVTile)


def kv_bytes_per_token(spec: ModelSpec, dtype: str, pair_tiles: bool = True) -> int:
    """What one token position takes in this process's caches: K and V of every layer, and where
    they keep BF16 pair tiles (`pair_tiles`, and the attention in force reads them: the avx512 and
    amx levels, native/kv.h), those too: twice."""
    copies = 2 if pair_tiles and _native.kv_keeps_pairs(dtype, spec.head_dim) else 1
    return spec.kv_bytes_per_token(dtype) * copies


def slot_rows(seq_length: int, share_length: int) -> int:
    """Rows of one slot: what a question and its answer can take after a document."""
    return max(seq_length - share_length, 1)


def slot_allocated_rows(rows: int) -> int:
    """Rows a slot allocates: its rows plus 31 spare for any tile phase, in whole tiles."""
    return (rows + TILE - 1 + TILE - 1) // TILE * TILE


class KVArena:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: str, slots: int, rows: int,
                 pairs: bool | None = None):
        self.dims = (n_layers, n_kv_heads, head_dim)
        self.dtype, self.rows, self.pairs = dtype, rows, pairs  # pairs: KV's (None: where read)
        # Each slot: (n_layers, 2 [K, V], n_kv_heads, rows + 31, head_dim) elements of `dtype`; the 31
        # spare rows let a reset put row 0 at any phase of its K tile.
        self._free = [_native.KV(*self.dims, rows, dtype, 0, slot=True, pairs=pairs) for _ in range(slots)]
        self._mine = {id(kv) for kv in self._free}
        self.nbytes = sum(kv.nbytes for kv in self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, capacity: int, start: int) -> _native.KV:
        """An empty KV for `capacity` rows whose row 0 is at absolute position `start`."""
        if capacity <= self.rows and self._free:
            kv = self._free.pop()
            kv.reset(start)
            return kv
        return _native.KV(*self.dims, capacity, self.dtype, start, pairs=self.pairs)

    def give(self, kv: _native.KV) -> None:
        """Return a KV from `take` (one of its own goes back to the free slots)."""
        if id(kv) in self._mine:
            self._free.append(kv)
