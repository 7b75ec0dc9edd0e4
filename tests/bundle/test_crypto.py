"""Encryption: key sources, keygen, atomic rewrite, and every named failure triggered for real."""

from __future__ import annotations

import ctypes
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import make_model

from seqshare.bundle import crypto
from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.bundle.loader import bundle_info, load_bundle
from seqshare.daemon.cli import cli
from seqshare.worker.errors import (
    BadMagicError,
    KeyUnavailableError,
    TamperedBundleError,
    TruncatedBundleError,
    UnsupportedVersionError,
    WrongKeyError,
)

CHUNK = 4096  # small chunks, so the tiny bundle spans many of them


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("crypto")
    (d / "ckpt").mkdir()
    make_model("llama", d / "ckpt")
    ck = load_checkpoint(d / "ckpt", "int8")
    write_bundle(ck, d / "plain.ssb", Limits.default(ck.context_length))
    return d / "plain.ssb"


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def enc(plain: Path, key: bytes, tmp_path: Path) -> Path:
    out = tmp_path / "enc.ssb"
    crypto.encrypt_file(plain, out, key, chunk_size=CHUNK)
    return out


def test_decrypts_to_the_same_bundle(plain: Path, enc: Path, key: bytes, tmp_path: Path) -> None:
    crypto.decrypt_file(enc, tmp_path / "back.ssb", key)
    assert (tmp_path / "back.ssb").read_bytes() == plain.read_bytes()
    assert plain.read_bytes()[4096:8192] not in enc.read_bytes()
    before = set(tmp_path.iterdir())
    b = load_bundle(enc, key=key, share=False)
    assert set(tmp_path.iterdir()) == before  # loading wrote nothing (no plaintext on disk)
    assert b.weight_digest == bundle_info(plain)["weight_digest"]


def test_wrong_key(enc: Path) -> None:
    with pytest.raises(WrongKeyError, match="key check failed"):
        load_bundle(enc, key=os.urandom(32), share=False)


def test_flipped_byte_in_a_chunk_is_tampering(enc: Path, key: bytes) -> None:
    raw = bytearray(enc.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    enc.write_bytes(raw)
    with pytest.raises(TamperedBundleError, match=r"chunk \d+ of \d+ fails authentication"):
        load_bundle(enc, key=key, share=False)


def test_edited_clear_header_is_tampering(enc: Path, key: bytes) -> None:
    raw = enc.read_bytes()
    i = raw.index(b'"weight_digest":"') + len(b'"weight_digest":"')
    enc.write_bytes(raw[:i] + (b"f" if raw[i : i + 1] != b"f" else b"e") + raw[i + 1 :])
    with pytest.raises(TamperedBundleError):
        load_bundle(enc, key=key, share=False)


def test_swapped_chunks_are_tampering(enc: Path, key: bytes) -> None:
    ef = crypto.open_encrypted(enc)
    raw = enc.read_bytes()
    n, c = len(ef.clear), CHUNK + crypto.TAG
    chunk0, chunk1 = raw[n : n + c], raw[n + c : n + 2 * c]
    enc.write_bytes(raw[:n] + chunk1 + chunk0 + raw[n + 2 * c :])
    with pytest.raises(TamperedBundleError, match="chunk 0"):
        load_bundle(enc, key=key, share=False)


def test_truncated_file(enc: Path, key: bytes) -> None:
    ef = crypto.open_encrypted(enc)
    raw = enc.read_bytes()
    enc.write_bytes(raw[: len(ef.clear) + 3 * (CHUNK + crypto.TAG)])  # cut exactly at a chunk boundary
    with pytest.raises(TruncatedBundleError, match="cut short"):
        load_bundle(enc, key=key, share=False)


def test_dropped_tail_with_forged_length_still_fails(enc: Path, key: bytes) -> None:
    """Even a header rewritten to promise fewer chunks is caught: the header is bound to every chunk."""
    ef = crypto.open_encrypted(enc)
    meta = dict(ef.meta, chunks=3, plaintext_bytes=3 * CHUNK)
    body = json.dumps(meta, separators=(",", ":")).encode()
    clear = crypto.ENC_PREAMBLE.pack(crypto.ENC_MAGIC, crypto.ENC_VERSION, len(body)) + body
    raw = enc.read_bytes()
    enc.write_bytes(clear + raw[len(ef.clear) : len(ef.clear) + 3 * (CHUNK + crypto.TAG)])
    with pytest.raises(TamperedBundleError):
        load_bundle(enc, key=key, share=False)


def test_magic_and_version(enc: Path, key: bytes, tmp_path: Path) -> None:
    raw = enc.read_bytes()
    (tmp_path / "v.ssb").write_bytes(raw[:8] + (7).to_bytes(4, "little") + raw[12:])
    with pytest.raises(UnsupportedVersionError, match="version 7"):
        load_bundle(tmp_path / "v.ssb", key=key)
    (tmp_path / "x.ssb").write_bytes(b"\0" * 100)
    with pytest.raises(BadMagicError):
        load_bundle(tmp_path / "x.ssb", key=key)
    with pytest.raises(BadMagicError, match="already encrypted"):
        crypto.encrypt_file(enc, tmp_path / "again.ssb", key)


def test_no_key_available(enc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(crypto.KEY_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(KeyUnavailableError, match="--key-file"):
        load_bundle(enc)
    info = bundle_info(enc)  # without a key: the clear header only
    assert info["encrypted"] is True and "weight_digest" in info and "architecture" not in info


def test_key_sources_in_order(enc: Path, key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / crypto.CREDENTIAL).write_bytes(key)  # raw 32 bytes
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.delenv(crypto.KEY_ENV, raising=False)
    assert load_bundle(enc, share=False).encrypted
    monkeypatch.setenv(crypto.KEY_ENV, os.urandom(32).hex())  # the environment wins over the credential
    with pytest.raises(WrongKeyError):
        load_bundle(enc, share=False)
    (tmp_path / "k").write_text(key.hex() + "\n")  # the key file wins over both
    assert load_bundle(enc, key_file=tmp_path / "k", share=False).encrypted
    (tmp_path / "bad").write_text("not a key")
    with pytest.raises(KeyUnavailableError, match="256-bit"):
        load_bundle(enc, key_file=tmp_path / "bad", share=False)


def test_cli_keygen_in_place_backup_and_decrypt(plain: Path, tmp_path: Path) -> None:
    run = CliRunner()
    key = tmp_path / "model.key"
    assert run.invoke(cli, ["model", "keygen", "--out", str(key)]).exit_code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) == 64
    assert run.invoke(cli, ["model", "keygen", "--out", str(key)]).exit_code != 0  # never overwrites
    work = tmp_path / "m.ssb"
    work.write_bytes(plain.read_bytes())
    res = run.invoke(cli, ["model", "encrypt", str(work), "--key-file", str(key), "--in-place", "--backup"])
    assert res.exit_code == 0, res.output
    assert crypto.is_encrypted(work) and (tmp_path / "m.ssb.bak").read_bytes() == plain.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ssb", "m.ssb.bak", "model.key"]  # no temp left
    res = run.invoke(
        cli, ["model", "decrypt", str(work), "--key-file", str(key), "--out", str(tmp_path / "d")]
    )
    assert res.exit_code == 0 and (tmp_path / "d").read_bytes() == plain.read_bytes()
    other = tmp_path / "other.key"
    run.invoke(cli, ["model", "keygen", "--out", str(other)])
    res = run.invoke(
        cli, ["model", "decrypt", str(work), "--key-file", str(other), "--out", str(tmp_path / "e")]
    )
    assert res.exit_code != 0 and "WrongKeyError" in res.output and not (tmp_path / "e").exists()



def mapping_flags(addr: int) -> list[str] | None:
    """VmFlags of the mapping that holds `addr`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="no /proc/self/smaps (not Linux)")
def test_decrypted_weights_ask_for_huge_pages(enc: Path, key: bytes) -> None:
    # decode streams every weight once per token: the plaintext buffer carries MADV_HUGEPAGE
    # ("hg" in its mapping's VmFlags), so the kernel may back it with 2 MiB pages
    buf = crypto.decrypt_to_memory(crypto.open_encrypted(enc), key)
    flags = mapping_flags(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    assert flags is not None, "the decrypted buffer's mapping is not in /proc/self/smaps"
    assert "hg" in flags
