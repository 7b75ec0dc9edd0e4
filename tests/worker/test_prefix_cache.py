"""The prefix cache as pure bookkeeping: budget, LRU order, references, counters, partial reuse."""

from __future__ import annotations

import numpy as np
import pytest

from seqshare.worker.prefix_cache import BLOCK, Entry, PrefixCache


def _toks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50000, n, dtype=np.int32)


def _fill(cache: PrefixCache, keys: list[str], nbytes: int = 100) -> None:
    for i, k in enumerate(keys):
        cache.release(cache.insert(k, _toks(10, i), f"kv-{k}", nbytes))


def test_lru_eviction_order_and_callback() -> None:
    evicted: list[str] = []
    cache = PrefixCache(300, on_evict=lambda e: evicted.append(e.key))
    _fill(cache, ["a", "b", "c"])
    assert cache.used_bytes == 300 and not evicted
    cache.release(cache.acquire("a"))  # a becomes most recent: b is now the oldest
    _fill(cache, ["d"])
    assert evicted == ["b"]
    _fill(cache, ["e", "f"])
    assert evicted == ["b", "c", "a"]
    assert sorted(e.key for e in cache) == ["d", "e", "f"]
    assert cache.stats.evicted == 3 and cache.used_bytes == 300


def test_referenced_entries_are_never_evicted() -> None:
    evicted: list[str] = []
    cache = PrefixCache(200, on_evict=lambda e: evicted.append(e.key))
    held = cache.insert("a", _toks(10), "kv-a", 150)
    _fill(cache, ["b"])  # over budget: b is the only unreferenced entry
    assert evicted == ["b"] and "a" in cache
    big = cache.insert("c", _toks(10, 2), "kv-c", 500)  # both in use: over budget, nothing to evict
    assert cache.used_bytes == 650 and evicted == ["b"]
    cache.release(held)
    assert evicted == ["b", "a"]
    cache.release(big)  # alone and larger than the budget: it goes too
    assert evicted == ["b", "a", "c"] and len(cache) == 0 and cache.used_bytes == 0


def test_counters_hits_misses_tokens_saved() -> None:
    cache = PrefixCache(10_000)
    assert cache.acquire("x") is None
    e = cache.insert("x", _toks(37), "kv", 10)
    cache.release(e)
    for _ in range(3):
        got = cache.acquire("x")
        assert got is e and got.refs == 1
        cache.release(got)
    r = cache.insert("y", _toks(12, 1), "kv", 10, restored=True)
    cache.release(r)
    s = cache.stats
    assert (s.hits, s.misses, s.restored, s.inserted) == (3, 1, 1, 2)
    assert s.tokens_saved == 3 * 37 + 12


def test_double_release_is_an_error_and_remove_refuses_in_use() -> None:
    cache = PrefixCache(1000)
    e = cache.insert("k", _toks(5), "kv", 10)
    with pytest.raises(RuntimeError, match="in use"):
        cache.remove("k")
    cache.release(e)
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release(e)
    assert cache.remove("k") is e and "k" not in cache


def test_insert_of_a_present_key_keeps_the_first() -> None:
    cache = PrefixCache(1000)
    a = cache.insert("k", _toks(5), "first", 10)
    b = cache.insert("k", _toks(5), "second", 10)
    assert a is b and a.value == "first" and a.refs == 2 and cache.used_bytes == 10


@pytest.mark.parametrize("n_base", [5, BLOCK - 1, BLOCK, 3 * BLOCK + 7])
def test_longest_strict_prefix(n_base: int) -> None:
    cache = PrefixCache(1 << 20)
    doc = _toks(6 * BLOCK, 9)
    for n in (n_base, n_base + 2 * BLOCK + 3):
        cache.release(cache.insert(f"len{n}", doc[:n], f"kv{n}", n))
    cache.release(cache.insert("other", _toks(4 * BLOCK, 1), "x", 1))  # unrelated document
    longer = n_base + 2 * BLOCK + 3
    e = cache.acquire_longest_prefix(doc)
    assert isinstance(e, Entry) and e.key == f"len{longer}" and e.refs == 1
    cache.release(e)
    # A context between the two lengths extends only the shorter one.
    e = cache.acquire_longest_prefix(doc[: longer - 1])
    assert e is not None and e.key == f"len{n_base}"
    cache.release(e)
    # Equal is not a strict prefix; a change inside the cached part is no prefix at all.
    e = cache.acquire_longest_prefix(doc[:n_base])
    assert e is None
    changed = doc.copy()
    changed[0] += 1
    assert cache.acquire_longest_prefix(changed) is None
    assert cache.stats.partial_hits == 2
    assert cache.stats.tokens_saved == longer + n_base


def test_drain_returns_unreferenced_lru_first() -> None:
    cache = PrefixCache(10_000)
    _fill(cache, ["a", "b", "c"])
    held = cache.acquire("a")
    assert held is not None
    assert [e.key for e in cache.drain()] == ["b", "c"]
    assert [e.key for e in cache] == ["a"] and cache.used_bytes == 100
    assert cache.stats.evicted == 0


def test_partial_index_forgets_evicted_entries() -> None:
    cache = PrefixCache(150)
    doc = _toks(3 * BLOCK, 4)
    cache.release(cache.insert("short", doc[:BLOCK + 1], "kv", 100))
    cache.release(cache.insert("other", _toks(10, 7), "kv", 100))  # evicts "short"
    assert "short" not in cache
    assert cache.acquire_longest_prefix(doc) is None
