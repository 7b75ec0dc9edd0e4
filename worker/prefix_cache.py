"""The prefix cache: which document prefixes are in memory, who uses them, and which to drop.

Pure bookkeeping, no model: an entry is a context hash, the context's token ids, an opaque value
(the prefix KV) and its size in bytes. Entries in use carry a reference count and are never evicted;
when the byte budget is exceeded the least recently used unreferenced entries go, each handed to
`on_evict` (the spill to disk) on its way out.

Partial reuse: every entry is also indexed by a chained digest of its full token blocks
(h_k = SHA-256(h_{k-1} || block_k), as nano-vllm does), so the longest cached context that is a
strict token prefix of a new one is found by walking the new context's chain from its end and
checking the few candidates' tokens exactly.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

BLOCK = 64  # tokens per chained block of the partial-reuse index


def as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a read-only contiguous int32 array (the one form entries keep)."""
    arr = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
    arr.flags.writeable = False
    return arr


def block_chain(tokens: np.ndarray, block: int = BLOCK) -> list[bytes]:
    """chain[k] = digest of the first k full blocks (chain[0] = the empty chain)."""
    chain = [b""]
    h = b""
    for k in range(len(tokens) // block):
        h = hashlib.sha256(h + tokens[k * block:(k + 1) * block].tobytes()).digest()
        chain.append(h)
    return chain


@dataclass(eq=False)
class Entry:
    """One cached prefix. `value` is whatever the engine keeps (a KV object); the cache never reads it."""

    key: str
    tokens: np.ndarray  # (n,) int32, the context token ids
    value: Any = field(repr=False)
    nbytes: int
    refs: int = 0
    chain_key: bytes = field(default=b"", repr=False)  # digest of its full blocks (index key)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class CacheStats:
    hits: int = 0  # lookups answered from memory
    misses: int = 0  # lookups not in memory (they may then be restored or partially reused)
    partial_hits: int = 0  # misses served by extending a cached strict prefix
    restored: int = 0  # entries brought back from the spill directory
    evicted: int = 0  # entries dropped to stay within the budget
    inserted: int = 0
    tokens_saved: int = 0  # context tokens not prefilled thanks to a hit, a restore or a partial hit

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class PrefixCache:
    """Entries by context hash under a byte budget, LRU among the unreferenced."""

    def __init__(self, budget_bytes: int, on_evict: Callable[[Entry], None] | None = None,
                 block: int = BLOCK):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.on_evict = on_evict
        self.block = block
        self.stats = CacheStats()
        self.used_bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        # chain digest of an entry's full blocks -> keys of the entries with exactly those blocks
        self._index: dict[bytes, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def peek(self, key: str) -> Entry | None:
        """The entry without counting a lookup or touching its recency."""
        return self._entries.get(key)

    # --- use ------------------------------------------------------------------------------------
    def acquire(self, key: str) -> Entry | None:
        """The entry for `key`, referenced and most recent (a hit), or None (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.tokens_saved += entry.length
        return self._ref(entry)

    def acquire_longest_prefix(self, tokens: Sequence[int] | np.ndarray) -> Entry | None:
        """The longest entry whose tokens are a strict prefix of `tokens`, referenced; None if none.

        The caller extends it into a new entry and releases it; the saved tokens count here.
        """
        toks = as_tokens(tokens)
        chain = block_chain(toks, self.block)
        best: Entry | None = None
        # A strict prefix of n tokens has at most (n-1)//block full blocks; walk from the longest.
        for k in range(min(len(chain) - 1, (len(toks) - 1) // self.block), -1, -1):
            for key in self._index.get(chain[k], ()):
                e = self._entries[key]
                if e.length < len(toks) and (best is None or e.length > best.length) \
                        and np.array_equal(toks[:e.length], e.tokens):
                    best = e
            if best is not None:
                break  # candidates of fewer blocks are shorter than this one
        if best is None:
            return None
        self.stats.partial_hits += 1
        self.stats.tokens_saved += best.length
        return self._ref(best)

    def insert(self, key: str, tokens: Sequence[int] | np.ndarray, value: Any, nbytes: int,
               restored: bool = False) -> Entry:
        """Add a new entry, referenced once by the caller; then shrink to the budget.

        If `key` is present already (two requests computed it at once) the existing entry wins and
        is returned referenced; the caller drops its own value.
        """
        if (old := self._entries.get(key)) is not None:
            return self._ref(old)
        toks = as_tokens(tokens)
        entry = Entry(key, toks, value, int(nbytes), chain_key=block_chain(toks, self.block)[-1])
        self._entries[key] = entry
        self._index.setdefault(entry.chain_key, set()).add(key)
        self.used_bytes += entry.nbytes
        self.stats.inserted += 1
        if restored:
            self.stats.restored += 1
            self.stats.tokens_saved += entry.length
        self._ref(entry)
        self._shrink()
        return entry

    def release(self, entry: Entry) -> None:
        if entry.refs <= 0:
            raise RuntimeError(f"prefix {entry.key[:16]} released more often than acquired")
        entry.refs -= 1
        self._shrink()

    # --- removal --------------------------------------------------------------------------------
    def remove(self, key: str) -> Entry | None:
        """Drop an unreferenced entry without calling `on_evict` (an invalidation)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.refs:
            raise RuntimeError(f"prefix {key[:16]} is in use ({entry.refs} references)")
        self._drop(entry)
        return entry

    def drain(self) -> list[Entry]:
        """Remove and return every unreferenced entry, least recent first (for a clean shutdown)."""
        out = [e for e in self._entries.values() if e.refs == 0]
        for e in out:
            self._drop(e)
        return out

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._shrink()

    # --- internals ------------------------------------------------------------------------------
    def _ref(self, entry: Entry) -> Entry:
        entry.refs += 1
        self._entries.move_to_end(entry.key)
        return entry

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.key]
        ck = entry.chain_key
        keys = self._index[ck]
        keys.discard(entry.key)
        if not keys:
            del self._index[ck]
        self.used_bytes -= entry.nbytes

    def _shrink(self) -> None:
        while self.used_bytes > self.budget_bytes:
            victim = next((e for e in self._entries.values() if e.refs == 0), None)
            if victim is None:
                return  # everything left is in use; it goes when released
            self._drop(victim)
            self.stats.evicted += 1
            if self.on_evict is not None:
                self.on_evict(victim)
