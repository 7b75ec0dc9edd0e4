"""Bundle encryption: chunked AES-256-GCM over a whole plain bundle, keys and key sources.

Encrypted bundle, version 1:

  [0, 16)        b"SEQSHRE\\0", u32 version, u32 clear_len
  [16, 16+clen)  clear header, UTF-8 JSON: cipher, kdf, salt, chunk_size, plaintext_bytes, chunks,
                 key_check, and the inner bundle's weight_digest / weight_bytes (so `info` and
                 weight sharing can see them without the key)
  then           chunks: AES-256-GCM(plaintext[i*C:(i+1)*C]) || 16-byte tag, i = 0..n-1

The file key is HKDF-SHA256(master key, salt = 32 random bytes per file). Chunk i uses nonce
(i as 8 bytes big-endian, 3 zero bytes, final flag) and associated data = the whole clear
prefix + (i, final): reordering, dropping the tail or editing the clear header fails
authentication. The key-check value (HKDF of the master key with another label) tells a wrong
key apart from tampered data before any chunk is tried.

Key: 32 bytes. A key file holds 64 hex digits (keygen writes that, plus a newline) or exactly 32
raw bytes. SEQSHARE_MODEL_KEY holds 64 hex digits. Sources, first found wins: --key-file,
SEQSHARE_MODEL_KEY, $CREDENTIALS_DIRECTORY/seqshare-model-key (a systemd credential).
"""

from __future__ import annotations

import hmac
import json
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from seqshare.bundle import format as bundle
from seqshare.worker.errors import (
    BadMagicError,
    KeyUnavailableError,
    TamperedBundleError,
    TruncatedBundleError,
    UnsupportedVersionError,
    WrongKeyError,
)

ENC_MAGIC = b"SEQSHRE\0"
ENC_VERSION = 1
ENC_PREAMBLE = struct.Struct("<8sII")
TAG = 16
CHUNK_SIZE = 8 << 20
KEY_ENV = "SEQSHARE_MODEL_KEY"
CREDENTIAL = "seqshare-model-key"


# --- keys -------------------------------------------------------------------------------------
def generate_key_file(path: Path) -> None:
    """Write a new random key as hex to `path`, mode 0600; never overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def parse_key(data: bytes, what: str) -> bytes:
    if len(data) == 32:
        return data
    text = data.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise KeyUnavailableError(f"{what} does not hold a 256-bit key (64 hex digits or 32 raw bytes)")
    return key


def resolve_key(
    key_file: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[bytes, str] | None:
    """The master key and where it came from, or None when no source has one."""
    env = os.environ if env is None else env
    if key_file is not None:
        try:
            return parse_key(Path(key_file).read_bytes(), f"key file {key_file}"), f"key file {key_file}"
        except OSError as e:
            raise KeyUnavailableError(f"cannot read key file {key_file}: {e.strerror}") from e
    if value := env.get(KEY_ENV):
        return parse_key(value.encode(), f"${KEY_ENV}"), f"${KEY_ENV}"
    if cred_dir := env.get("CREDENTIALS_DIRECTORY"):
        cred = Path(cred_dir) / CREDENTIAL
        if cred.is_file():
            return parse_key(cred.read_bytes(), f"systemd credential {cred}"), f"credential {cred}"
    return None


def require_key(key_file: Path | None = None, what: str = "this bundle") -> bytes:
    found = resolve_key(key_file)
    if found is None:
        raise KeyUnavailableError(
            f"{what} is encrypted and no key is available: pass --key-file, set {KEY_ENV} (hex), "
            f"or provide the systemd credential {CREDENTIAL!r} (LoadCredential=)"
        )
    return found[0]


def _hkdf(master: bytes, salt: bytes, label: bytes, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=label).derive(master)


def _file_key(master: bytes, salt: bytes) -> bytes:
    return _hkdf(master, salt, b"seqshare bundle v1 aes-256-gcm", 32)


def _key_check(master: bytes, salt: bytes) -> bytes:
    return _hkdf(master, salt, b"seqshare bundle v1 key check", 16)


def _nonce_aad(clear: bytes, i: int, final: bool) -> tuple[bytes, bytes]:
    return struct.pack(">Q3xB", i, final), clear + struct.pack("<QB", i, final)


# --- the encrypted file -----------------------------------------------------------------------
@dataclass(frozen=True)
class EncryptedFile:
    path: Path
    clear: bytes  # the bound prefix: preamble + clear JSON
    meta: dict[str, Any]

    @property
    def chunk_size(self) -> int:
        return int(self.meta["chunk_size"])

    @property
    def plaintext_bytes(self) -> int:
        return int(self.meta["plaintext_bytes"])

    @property
    def chunks(self) -> int:
        return int(self.meta["chunks"])

    def file_key(self, master: bytes) -> AESGCM:
        salt = bytes.fromhex(self.meta["salt"])
        if not hmac.compare_digest(_key_check(master, salt), bytes.fromhex(self.meta["key_check"])):
            raise WrongKeyError(
                f"{self.path}: the key does not open this bundle (key check failed); "
                "use the key it was encrypted with"
            )
        return AESGCM(_file_key(master, salt))


def is_encrypted(path: Path) -> bool:
    with Path(path).open("rb") as f:
        return f.read(8) == ENC_MAGIC


def open_encrypted(path: Path) -> EncryptedFile:
    """Read and check the clear header and the file's length."""
    with Path(path).open("rb") as f:
        pre = f.read(ENC_PREAMBLE.size)
        if len(pre) < ENC_PREAMBLE.size:
            raise TruncatedBundleError(f"{path}: {len(pre)} bytes is too short for a bundle")
        magic, version, clen = ENC_PREAMBLE.unpack(pre)
        if magic != ENC_MAGIC:
            raise BadMagicError(f"{path} is not an encrypted seqshare bundle (magic {magic!r})")
        if version != ENC_VERSION:
            raise UnsupportedVersionError(
                f"{path}: encryption format version {version}, this build reads {ENC_VERSION}"
            )
        body = f.read(clen)
        if len(body) < clen:
            raise TruncatedBundleError(f"{path}: the clear header is cut short")
    ef = EncryptedFile(Path(path), pre + body, json.loads(body))
    expected = len(ef.clear) + ef.plaintext_bytes + TAG * ef.chunks
    size = Path(path).stat().st_size
    if size < expected:
        raise TruncatedBundleError(
            f"{path} is {size} bytes, its header promises {expected}: the file is cut short (copy it again)"
        )
    if size > expected:
        raise TamperedBundleError(f"{path} has {size - expected} bytes more than its header promises")
    return ef


def _decrypt_chunk(ef: EncryptedFile, aead: AESGCM, fd: int, i: int, ct: bytearray, out: memoryview) -> None:
    """Authenticate and decrypt chunk i into `out` (`ct` is the caller's ciphertext buffer)."""
    C = ef.chunk_size
    n = min(C, ef.plaintext_bytes - i * C)
    view = memoryview(ct)[: n + TAG]
    if os.preadv(fd, [view], len(ef.clear) + i * (C + TAG)) != n + TAG:
        raise TruncatedBundleError(f"{ef.path}: chunk {i} is cut short")
    nonce, aad = _nonce_aad(ef.clear, i, i == ef.chunks - 1)
    try:
        aead.decrypt_into(nonce, view, aad, out[:n])
    except InvalidTag as e:
        raise TamperedBundleError(
            f"{ef.path}: chunk {i} of {ef.chunks} fails authentication: the file "
            "was modified or damaged; restore it from a good copy"
        ) from e


def _decrypt_chunks(
    ef: EncryptedFile, aead: AESGCM, fd: int, first: int, last: int, sink: Callable[[int], memoryview]
) -> None:
    """Authenticate and decrypt chunks [first, last) into the views `sink(i)` gives, in order."""
    ct = bytearray(ef.chunk_size + TAG)
    for i in range(first, last):
        _decrypt_chunk(ef, aead, fd, i, ct, sink(i))


def decrypt_to_memory(ef: EncryptedFile, master: bytes) -> mmap.mmap:
    """The whole plaintext in one anonymous buffer (never on disk).

    Chunks are independent, so one thread per core takes them: AES-GCM releases the GIL, and in
    a VM the first touch of the fresh pages costs as much as the cipher, so both scale."""
    aead = ef.file_key(master)
    buf = mmap.mmap(-1, max(1, ef.plaintext_bytes))
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux: decode streams the weights, and huge pages spare it TLB misses
        buf.madvise(mmap.MADV_HUGEPAGE)
    mv = memoryview(buf)
    C = ef.chunk_size
    threads = max(1, min(os.cpu_count() or 1, ef.chunks, 8))
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "ct"):
            local.ct = bytearray(C + TAG)
        _decrypt_chunk(ef, aead, fd, i, local.ct, mv[i * C :])

    with ef.path.open("rb") as f:
        fd = f.fileno()
        with ThreadPoolExecutor(threads, thread_name_prefix="decrypt") as pool:
            list(pool.map(one, range(ef.chunks)))  # the first failing chunk's error is raised
    mv.release()
    return buf


def decrypt_prefix(ef: EncryptedFile, master: bytes, nbytes: int, verify_rest: bool) -> bytes:
    """The first `nbytes` of plaintext; with `verify_rest`, authenticate every later chunk too
    (into a scratch buffer) so a reused-weights load still rejects a damaged file."""
    aead = ef.file_key(master)
    C = ef.chunk_size
    head_chunks = min(ef.chunks, (nbytes + C - 1) // C)
    head = bytearray(head_chunks * C)
    hv = memoryview(head)
    scratch = memoryview(bytearray(C))
    with ef.path.open("rb") as f:
        _decrypt_chunks(ef, aead, f.fileno(), 0, head_chunks, lambda i: hv[i * C :])
        if verify_rest:
            _decrypt_chunks(ef, aead, f.fileno(), head_chunks, ef.chunks, lambda i: scratch)
    return bytes(head[:nbytes])


def encrypt_file(
    src: Path, dst: Path, master: bytes, chunk_size: int = CHUNK_SIZE, backup: Path | None = None
) -> None:
    """Encrypt plain bundle `src` to `dst` (may be `src`: then rewritten atomically)."""
    with src.open("rb") as f:
        head = f.read(bundle.PREAMBLE.size)
    if head[:8] == ENC_MAGIC:
        raise BadMagicError(f"{src} is already encrypted")
    hlen, _, _ = bundle.parse_preamble(head, str(src))
    size = src.stat().st_size
    with src.open("rb") as f:
        pb = bundle.parse_bundle(f.read(bundle.PREAMBLE.size + hlen), size, str(src))
    salt = os.urandom(32)
    chunks = max(1, (size + chunk_size - 1) // chunk_size)
    meta = {
        "cipher": "AES-256-GCM",
        "kdf": "HKDF-SHA256",
        "salt": salt.hex(),
        "chunk_size": chunk_size,
        "plaintext_bytes": size,
        "chunks": chunks,
        "key_check": _key_check(master, salt).hex(),
        "bundle_version": bundle.VERSION,
        "weight_digest": pb.weight_digest,
        "weight_bytes": pb.header["weight_bytes"],
    }
    body = json.dumps(meta, separators=(",", ":")).encode()
    clear = ENC_PREAMBLE.pack(ENC_MAGIC, ENC_VERSION, len(body)) + body
    aead = AESGCM(_file_key(master, salt))
    pt = bytearray(chunk_size)
    ct = bytearray(chunk_size + TAG)
    with src.open("rb") as fin, _atomic_writer(dst, backup) as fout:
        fout.write(clear)
        for i in range(chunks):
            n = fin.readinto(memoryview(pt)[: min(chunk_size, size - i * chunk_size)])
            nonce, aad = _nonce_aad(clear, i, i == chunks - 1)
            aead.encrypt_into(nonce, memoryview(pt)[:n], aad, memoryview(ct)[: n + TAG])
            fout.write(memoryview(ct)[: n + TAG])


def decrypt_file(src: Path, dst: Path, master: bytes) -> None:
    """Write the plain bundle (an explicit operator action; loading never does this)."""
    ef = open_encrypted(src)
    aead = ef.file_key(master)
    C = ef.chunk_size
    out, ct = memoryview(bytearray(C)), bytearray(C + TAG)
    with src.open("rb") as fin, _atomic_writer(dst, None) as fout:
        for i in range(ef.chunks):
            _decrypt_chunk(ef, aead, fin.fileno(), i, ct, out)
            fout.write(out[: min(C, ef.plaintext_bytes - i * C)])


class _atomic_writer:
    """A temp file beside `dst`, fsynced and renamed over it on success, removed on failure."""

    def __init__(self, dst: Path, backup: Path | None):
        self.dst, self.backup = Path(dst), backup
        self.tmp = self.dst.with_name(f".{self.dst.name}.{os.getpid()}.tmp")

    def __enter__(self) -> BinaryIO:
        self.f = self.tmp.open("wb")
        return self.f

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                if self.backup is not None:
                    shutil.copy2(self.dst, self.backup)
                os.replace(self.tmp, self.dst)
                dfd = os.open(self.dst.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        finally:
            self.tmp.unlink(missing_ok=True)
