"""Spilled prefixes: a document's KV on disk, sealed, under a byte budget, reusable after a restart.

One file per (context hash, binding) in the cache directory, `{context_hash}-{tag}.kv`, where the
tag digests the binding (model weight digest, KV dtype and layout, seal mode) so files of another
model or configuration are never even opened. File format, version 1 (little-endian):

  [0, 20)        b"SQSPILL\\0", u32 version, u32 mode (1 = AES-256-GCM, 2 = HMAC-SHA256), u32 hlen
  [20, 20+hlen)  header, UTF-8 JSON: context_hash, binding, n_tokens, kv_bytes, chunk_size, salt
  then           payload = token ids (int32, zero-padded to 64 bytes) || KV bytes, sealed:
    mode 1: chunks AES-256-GCM(payload[i*C:(i+1)*C]) || tag; key = HKDF-SHA256(model key, salt = 32
            random bytes per file); nonce = (i, final); associated data = preamble + header + (i,
            final), so editing the header, reordering or dropping chunks fails authentication.
            Used when the model is encrypted: a document's KV is as confidential as the document.
    mode 2: payload in clear, then HMAC-SHA256(directory key, preamble + header + payload). The
            directory key is 32 random bytes in `.mac-key` (0600), made once per directory.

Writes are atomic (temp file, fsync, rename). Any file that fails to parse, authenticate or match
the binding and hash asked for is deleted and reported as a miss: the caller recomputes.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from seqshare.worker.errors import SpillCorruptError

log = logging.getLogger(__name__)

MAGIC = b"SQSPILL\0"
VERSION = 1
PREAMBLE = struct.Struct("<8sIII")
MODE_AESGCM, MODE_HMAC = 1, 2
TAG = 16
MAC = 32
CHUNK_SIZE = 8 << 20
TOKEN_ALIGN = 64
MAC_KEY_FILE = ".mac-key"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_RE = re.compile(r"^([0-9a-f]{64})-([0-9a-f]{16})\.kv$")


@dataclass(frozen=True)
class SpillRecord:
    key: str
    tokens: np.ndarray  # (n,) int32 context token ids
    kv: memoryview  # the KV bytes exactly as they were exported


@dataclass
class SpillStats:
    written: int = 0
    restored: int = 0
    discarded: int = 0  # corrupt or foreign files removed
    evicted: int = 0  # files removed to stay within the disk budget
    write_errors: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _hkdf(master: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"seqshare spill v1 aes-256-gcm").derive(master)


def _nonce_aad(clear: bytes, i: int, final: bool) -> tuple[bytes, bytes]:
    return struct.pack(">Q3xB", i, final), clear + struct.pack("<QB", i, final)


def _chunks(parts: list[memoryview], size: int) -> Iterator[memoryview]:
    """The concatenation of `parts` in pieces of `size` bytes (the last shorter), copying only at seams."""
    scratch, fill = bytearray(size), 0
    for p in parts:
        off = 0
        while off < len(p):
            if fill == 0 and len(p) - off >= size:
                yield p[off:off + size]
                off += size
                continue
            n = min(size - fill, len(p) - off)
            scratch[fill:fill + n] = p[off:off + n]
            fill, off = fill + n, off + n
            if fill == size:
                yield memoryview(scratch)
                fill = 0
    if fill:
        yield memoryview(scratch)[:fill]


class Spill:
    """The spill directory of one worker: put on eviction or shutdown, get on a memory miss."""

    def __init__(self, directory: Path, budget_bytes: int, key: bytes | None = None,
                 chunk_size: int = CHUNK_SIZE):
        if key is not None and len(key) != 32:
            raise ValueError("the spill key must be the model's 32-byte key")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.budget_bytes = budget_bytes
        self.mode = MODE_AESGCM if key is not None else MODE_HMAC
        self._master = key
        self._mac_key = None if key is not None else self._directory_mac_key()
        self.chunk_size = chunk_size
        self.stats = SpillStats()
        self._files: OrderedDict[str, int] = OrderedDict()  # file name -> size, least recent first
        self._scan()

    # --- public ---------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(self._files.values())

    def path_for(self, key: str, binding: dict[str, Any]) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"context hash must be 64 lowercase hex digits, got {key[:80]!r}")
        return self.directory / f"{key}-{self._tag(binding)}.kv"

    def contains(self, key: str, binding: dict[str, Any]) -> bool:
        return self.path_for(key, binding).name in self._files

    def put(self, key: str, tokens: np.ndarray, kv: Any, binding: dict[str, Any]) -> bool:
        """Write (or refresh) the file of one prefix; False when it cannot be kept (never raises for I/O)."""
        path = self.path_for(key, binding)
        toks = np.ascontiguousarray(tokens, dtype="<i4")
        kvb = memoryview(kv).cast("B")
        header = {"context_hash": key, "binding": binding, "n_tokens": len(toks), "kv_bytes": kvb.nbytes,
                  "chunk_size": self.chunk_size, "salt": os.urandom(32).hex()}
        size = self._file_size(header)
        if size > self.budget_bytes:
            return False
        if path.name in self._files and self._files[path.name] == size:
            self._touch(path)  # already on disk (a restored prefix evicted again): same content
            return True
        self._make_room(size, keep=path.name)
        try:
            self._write(path, header, toks, kvb)
        except OSError as e:
            self.stats.write_errors += 1
            log.warning("cannot spill prefix %s to %s: %s", key[:16], self.directory, e)
            return False
        self._files[path.name] = size
        self._files.move_to_end(path.name)
        self.stats.written += 1
        return True

    def get(self, key: str, binding: dict[str, Any]) -> SpillRecord | None:
        """The prefix if a sound file for it exists; a damaged or foreign file is deleted (None)."""
        path = self.path_for(key, binding)
        if path.name not in self._files and not path.exists():
            return None
        try:
            rec = self._read(path, key, binding)
        except (SpillCorruptError, OSError, ValueError, KeyError, TypeError) as e:
            self.stats.discarded += 1
            log.warning("discarding spill file %s: %s", path.name, e)
            self._remove(path.name)
            return None
        self._touch(path)
        self.stats.restored += 1
        return rec

    def remove(self, key: str, binding: dict[str, Any]) -> None:
        self._remove(self.path_for(key, binding).name)

    # --- files ----------------------------------------------------------------------------------
    def _tag(self, binding: dict[str, Any]) -> str:
        blob = json.dumps([binding, self.mode], sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _file_size(self, header: dict[str, Any]) -> int:
        clear = len(self._clear(header))
        payload = _align(4 * header["n_tokens"], TOKEN_ALIGN) + header["kv_bytes"]
        if self.mode == MODE_HMAC:
            return clear + payload + MAC
        return clear + payload + TAG * max(1, -(-payload // self.chunk_size))

    def _clear(self, header: dict[str, Any]) -> bytes:
        body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return PREAMBLE.pack(MAGIC, VERSION, self.mode, len(body)) + body

    def _write(self, path: Path, header: dict[str, Any], toks: np.ndarray, kvb: memoryview) -> None:
        clear = self._clear(header)
        tok_region = bytearray(_align(toks.nbytes, TOKEN_ALIGN))
        tok_region[: toks.nbytes] = toks.tobytes()
        parts = [memoryview(tok_region), kvb]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                f.write(clear)
                if self.mode == MODE_HMAC:
                    self._write_mac(f, clear, parts)
                else:
                    self._write_sealed(f, clear, header, parts)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._fsync_dir()
        finally:
            tmp.unlink(missing_ok=True)

    def _write_mac(self, f: BinaryIO, clear: bytes, parts: list[memoryview]) -> None:
        assert self._mac_key is not None
        mac = hmac.new(self._mac_key, clear, "sha256")
        for p in parts:
            mac.update(p)
            f.write(p)
        f.write(mac.digest())

    def _write_sealed(self, f: BinaryIO, clear: bytes, header: dict[str, Any], parts: list[memoryview]) -> None:
        assert self._master is not None
        aead = AESGCM(_hkdf(self._master, bytes.fromhex(header["salt"])))
        total = sum(len(p) for p in parts)
        n_chunks = max(1, -(-total // self.chunk_size))
        out = bytearray(self.chunk_size + TAG)
        for i, pt in enumerate(_chunks(parts, self.chunk_size)):
            nonce, aad = _nonce_aad(clear, i, i == n_chunks - 1)
            aead.encrypt_into(nonce, pt, aad, memoryview(out)[: len(pt) + TAG])
            f.write(memoryview(out)[: len(pt) + TAG])

    def _read(self, path: Path, key: str, binding: dict[str, Any]) -> SpillRecord:
        with path.open("rb") as f:
            pre = f.read(PREAMBLE.size)
            if len(pre) < PREAMBLE.size:
                raise SpillCorruptError("shorter than its preamble")
            magic, version, mode, hlen = PREAMBLE.unpack(pre)
            if magic != MAGIC or version != VERSION or mode != self.mode:
                raise SpillCorruptError(f"magic {magic!r}, version {version}, mode {mode}: not this store's format")
            body = f.read(hlen)
            header = json.loads(body)
            if header.get("context_hash") != key or header.get("binding") != binding:
                raise SpillCorruptError("its header binds another context or model")
            if self._file_size(header) != os.fstat(f.fileno()).st_size:
                raise SpillCorruptError("its size differs from what its header describes (truncated?)")
            payload = bytearray(_align(4 * header["n_tokens"], TOKEN_ALIGN) + header["kv_bytes"])
            if mode == MODE_HMAC:
                self._read_mac(f, pre + body, payload)
            else:
                self._read_sealed(f, pre + body, header, payload)
        n = int(header["n_tokens"])
        tokens = np.frombuffer(payload, dtype="<i4", count=n).astype(np.int32)
        return SpillRecord(key, tokens, memoryview(payload)[_align(4 * n, TOKEN_ALIGN):])

    def _read_mac(self, f: io.BufferedReader, clear: bytes, payload: bytearray) -> None:
        assert self._mac_key is not None
        if f.readinto(payload) != len(payload):
            raise SpillCorruptError("payload cut short")
        mac = hmac.new(self._mac_key, clear, "sha256")
        mac.update(payload)
        if not hmac.compare_digest(mac.digest(), f.read(MAC)):
            raise SpillCorruptError("HMAC mismatch: the file was changed or written under another directory key")

    def _read_sealed(self, f: io.BufferedReader, clear: bytes, header: dict[str, Any], payload: bytearray) -> None:
        assert self._master is not None
        aead = AESGCM(_hkdf(self._master, bytes.fromhex(header["salt"])))
        C = int(header["chunk_size"])
        n_chunks = max(1, -(-len(payload) // C))
        ct = bytearray(C + TAG)
        out = memoryview(payload)
        for i in range(n_chunks):
            n = min(C, len(payload) - i * C)
            view = memoryview(ct)[: n + TAG]
            if f.readinto(view) != n + TAG:
                raise SpillCorruptError(f"chunk {i} cut short")
            nonce, aad = _nonce_aad(clear, i, i == n_chunks - 1)
            try:
                aead.decrypt_into(nonce, view, aad, out[i * C: i * C + n])
            except InvalidTag as e:
                raise SpillCorruptError(f"chunk {i} fails authentication (changed, or another key)") from e

    # --- directory and budget -------------------------------------------------------------------
    def _directory_mac_key(self) -> bytes:
        path = self.directory / MAC_KEY_FILE
        if not path.exists():
            tmp = path.with_name(f".mac-key.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process made one first: theirs wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path} is not a 32-byte key; delete it (the spilled files become useless)")
        return key

    def _scan(self) -> None:
        """Index the files already there (a restart), oldest use first; clear stale temp files."""
        found = []
        for p in self.directory.iterdir():
            try:  # another process sharing the directory may remove a file between listing and stat
                if _FILE_RE.match(p.name):
                    st = p.stat()
                    found.append((st.st_mtime, p.name, st.st_size))
                elif p.name.endswith(".tmp") and p.name.startswith(".") and time.time() - p.stat().st_mtime > 3600:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        for _, name, size in sorted(found):
            self._files[name] = size

    def _touch(self, path: Path) -> None:
        """Mark a file most recently used (mtime carries the order across restarts)."""
        try:
            os.utime(path)
            size = path.stat().st_size
        except OSError:
            self._files.pop(path.name, None)
            return
        self._files[path.name] = size
        self._files.move_to_end(path.name)

    def _make_room(self, size: int, keep: str) -> None:
        used = sum(s for n, s in self._files.items() if n != keep)
        for name in list(self._files):
            if used + size <= self.budget_bytes:
                break
            if name == keep:
                continue
            used -= self._files[name]
            self._remove(name)
            self.stats.evicted += 1

    def _remove(self, name: str) -> None:
        self._files.pop(name, None)
        (self.directory / name).unlink(missing_ok=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
