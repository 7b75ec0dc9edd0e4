"""The spill directory: round trips in both seal modes, budget, corruption, foreign files, restarts."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from seqshare.worker.spill import MODE_AESGCM, MODE_HMAC, Spill

BINDING = {"weight_digest": "ab" * 32, "kv_dtype": "f16", "layout": [30, 3, 64]}


def _key(i: int) -> str:
    return hashlib.sha256(f"ctx{i}".encode()).hexdigest()


def _prefix(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 50000, n, dtype=np.int32), rng.standard_normal(n * 96).astype(np.float16)


@pytest.fixture(params=["hmac", "aesgcm"])
def make(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    key = os.urandom(32) if request.param == "aesgcm" else None

    def _make(budget: int = 1 << 30, directory: Path = tmp_path / "spill", chunk: int = 4096) -> Spill:
        return Spill(directory, budget, key=key, chunk_size=chunk)

    return _make


def test_round_trip(make) -> None:  # type: ignore[no-untyped-def]
    spill = make()
    toks, kv = _prefix(1000)  # several chunks and a chunk boundary inside the KV
    assert spill.put(_key(1), toks, kv, BINDING)
    rec = spill.get(_key(1), BINDING)
    assert rec is not None
    np.testing.assert_array_equal(rec.tokens, toks)
    assert bytes(rec.kv) == kv.tobytes()
    assert spill.stats.written == 1 and spill.stats.restored == 1
    assert spill.get(_key(2), BINDING) is None  # never written: a plain miss, nothing discarded
    assert spill.stats.discarded == 0


def test_encrypted_files_hide_the_tokens(tmp_path: Path) -> None:
    toks = np.arange(5000, 5000 + 300, dtype=np.int32)
    kv = np.zeros(300 * 96, np.float16)
    plain = Spill(tmp_path / "plain", 1 << 30)
    sealed = Spill(tmp_path / "sealed", 1 << 30, key=os.urandom(32))
    assert plain.mode == MODE_HMAC and sealed.mode == MODE_AESGCM
    for s in (plain, sealed):
        s.put(_key(1), toks, kv, BINDING)
    assert toks.tobytes() in plain.path_for(_key(1), BINDING).read_bytes()
    sealed_bytes = sealed.path_for(_key(1), BINDING).read_bytes()
    assert toks.tobytes()[:64] not in sealed_bytes and bytes(64) not in sealed_bytes


def test_wrong_key_is_discarded(tmp_path: Path) -> None:
    toks, kv = _prefix(50)
    Spill(tmp_path, 1 << 30, key=os.urandom(32)).put(_key(1), toks, kv, BINDING)
    other = Spill(tmp_path, 1 << 30, key=os.urandom(32))
    assert other.get(_key(1), BINDING) is None
    assert other.stats.discarded == 1 and not any(tmp_path.glob("*.kv"))


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "extend"])
def test_corruption_is_detected_and_discarded(make, damage: str) -> None:  # type: ignore[no-untyped-def]
    spill = make()
    toks, kv = _prefix(400)
    spill.put(_key(1), toks, kv, BINDING)
    path = spill.path_for(_key(1), BINDING)
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[len(data) // 2] ^= 0x01
    elif damage == "flip_header":
        i = data.index(b'"n_tokens":400')
        data[i + len('"n_tokens":')] = ord("5")
    elif damage == "truncate":
        del data[-100:]
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    assert spill.get(_key(1), BINDING) is None
    assert spill.stats.discarded == 1 and not path.exists()
    # The caller recomputes and spills again: a clean file is trusted again.
    assert spill.put(_key(1), toks, kv, BINDING)
    rec = spill.get(_key(1), BINDING)
    assert rec is not None and bytes(rec.kv) == kv.tobytes()


def test_foreign_file_is_never_trusted(make) -> None:  # type: ignore[no-untyped-def]
    spill = make()
    toks, kv = _prefix(100)
    spill.put(_key(1), toks, kv, BINDING)
    # Another model's file renamed to this model's name: its header binds another digest.
    foreign = {**BINDING, "weight_digest": "cd" * 32}
    spill.put(_key(1), toks, kv, foreign)
    os.replace(spill.path_for(_key(1), foreign), spill.path_for(_key(1), BINDING))
    assert spill.get(_key(1), BINDING) is None and spill.stats.discarded == 1
    # A file for another context copied over this one's name: its header names the other hash.
    spill.put(_key(2), toks, kv, BINDING)
    os.replace(spill.path_for(_key(2), BINDING), spill.path_for(_key(1), BINDING))
    assert spill.get(_key(1), BINDING) is None and spill.stats.discarded == 2


def test_budget_evicts_least_recently_used_files(make) -> None:  # type: ignore[no-untyped-def]
    toks, kv = _prefix(100)
    spill = make()
    spill.put(_key(0), toks, kv, BINDING)
    size = spill.used_bytes
    spill.budget_bytes = 3 * size
    for i in (1, 2):
        spill.put(_key(i), toks, kv, BINDING)
    assert spill.get(_key(0), BINDING) is not None  # 0 becomes most recent; 1 is the oldest now
    spill.put(_key(3), toks, kv, BINDING)
    assert not spill.contains(_key(1), BINDING)
    assert all(spill.contains(_key(i), BINDING) for i in (0, 2, 3))
    assert spill.stats.evicted == 1 and spill.used_bytes == 3 * size
    assert not spill.put(_key(9), *_prefix(1000), BINDING)  # larger than the whole budget: refused
    assert spill.used_bytes == 3 * size


def test_restart_reuses_the_directory_in_lru_order(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    toks, kv = _prefix(100)
    first = make(directory=tmp_path / "d")
    for i in range(3):
        first.put(_key(i), toks, kv, BINDING)
        # mtime carries the order across restarts; make it unambiguous on coarse clocks
        t = time.time() - 100 + i
        os.utime(first.path_for(_key(i), BINDING), (t, t))
    size = first.used_bytes // 3
    second = make(directory=tmp_path / "d", budget=3 * size)
    rec = second.get(_key(1), BINDING)
    assert rec is not None and bytes(rec.kv) == kv.tobytes()
    second.put(_key(5), toks, kv, BINDING)
    assert not second.contains(_key(0), BINDING)  # the oldest before the restart went first
    assert second.contains(_key(1), BINDING) and second.contains(_key(2), BINDING)


def test_rejects_a_key_that_is_not_a_hash(make) -> None:  # type: ignore[no-untyped-def]
    spill = make()
    with pytest.raises(ValueError, match="64 lowercase hex"):
        spill.put("../../etc/passwd", *_prefix(3), BINDING)
