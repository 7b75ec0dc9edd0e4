"""Bundle format: round trips for every weight format, info and digests, alignment, quantization error
bounds, weight sharing by digest (measured by RSS), and the default model end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import make_model

from seqshare import _native
from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import PLANE_ALIGN, Limits, write_bundle
from seqshare.bundle.loader import LoadedBundle, bundle_info, load_bundle
from seqshare.bundle.quant import dequantize
from seqshare.daemon.cli import cli
from seqshare.worker.errors import BadMagicError, TruncatedBundleError, UnsupportedVersionError

# Relative RMS error of a quantized weight against f32, for normal-like weights, per group size.
INT8_REL_RMS = {32: 0.008, 64: 0.009, 128: 0.010}
INT4_REL_RMS = {32: 0.12, 64: 0.13, 128: 0.14}


def same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name, t in a.items():
        u = b[name]
        assert (t.fmt, t.shape, t.group_size) == (u.fmt, u.shape, u.group_size), name
        for k, v in t.planes.items():
            assert v.dtype == u.planes[k].dtype and np.array_equal(v, u.planes[k]), (name, k)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    make_model("qwen2", d)
    return d


def cli_ok(*args: str) -> str:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "int8", "int4", "keep"])
def test_round_trip_plain_and_encrypted(quant: str, tiny_dir: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_dir, quant)
    out = tmp_path / "m.ssb"
    cli_ok("model", "compile", str(tiny_dir), "--out", str(out), "--quant", quant, "--quiet")
    info = json.loads(cli_ok("model", "info", str(out), "--json"))
    assert info["quant"] == quant and info["encrypted"] is False
    assert info["kernels"] in _native.runnable_isas()
    plain = load_bundle(out, share=False)
    same_tensors(ck.tensors, plain.tensors)
    cli_ok("model", "keygen", "--out", str(tmp_path / "k"))
    cli_ok("model", "encrypt", str(out), "--key-file", str(tmp_path / "k"), "--out", str(tmp_path / "e.ssb"))
    enc = load_bundle(tmp_path / "e.ssb", key_file=tmp_path / "k", share=False)
    assert enc.encrypted and enc.weight_digest == plain.weight_digest == info["weight_digest"]
    same_tensors(plain.tensors, enc.tensors)
    assert enc.header == plain.header


def test_planes_are_aligned_read_only_views(tiny_dir: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_dir, "int4")
    write_bundle(ck, tmp_path / "m.ssb", Limits.default(ck.context_length))
    b = load_bundle(tmp_path / "m.ssb", share=False)
    for t in b.tensors.values():
        for p in t.planes.values():
            assert p.ctypes.data % PLANE_ALIGN == 0 and not p.flags.writeable
    assert b.tokenizer.encode("the lazy dog").ids
    assert b.hf_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_digest_ignores_limits_and_follows_quant(tiny_dir: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_dir, "int8")
    a = write_bundle(ck, tmp_path / "a.ssb", Limits(100, 20, 200))
    b = write_bundle(ck, tmp_path / "b.ssb", Limits(150, 30, 256))
    c = write_bundle(load_checkpoint(tiny_dir, "int4"), tmp_path / "c.ssb", Limits(100, 20, 200))
    ia, ib, ic = (bundle_info(tmp_path / f"{x}.ssb") for x in "abc")
    assert ia["weight_digest"] == ib["weight_digest"] == a["weight_digest"] == b["weight_digest"]
    assert ia["weight_bytes"] == ib["weight_bytes"] and ia["limits"] != ib["limits"]
    assert ic["weight_digest"] != ia["weight_digest"] and ic["weight_bytes"] != ia["weight_bytes"]
    assert c["weight_digest"] == ic["weight_digest"]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantization_error_bounds(group: int, tmp_path: Path) -> None:
    make_model("llama", tmp_path, hidden_size=256, intermediate_size=512)
    ref = load_checkpoint(tmp_path, "f32").tensors
    for quant, bound in (("int8", INT8_REL_RMS[group]), ("int4", INT4_REL_RMS[group])):
        for name, t in load_checkpoint(tmp_path, quant, group).tensors.items():
            if len(t.shape) == 1:
                continue
            w = ref[name].planes["data"]
            err = np.sqrt(np.mean((dequantize(t) - w) ** 2)) / np.sqrt(np.mean(w**2))
            assert err < bound, (quant, group, name, err)


def test_bad_magic_version_and_truncation(tiny_dir: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(tiny_dir, "f16")
    write_bundle(ck, tmp_path / "m.ssb", Limits.default(ck.context_length))
    raw = (tmp_path / "m.ssb").read_bytes()
    (tmp_path / "magic.ssb").write_bytes(b"NOTABNDL" + raw[8:])
    (tmp_path / "ver.ssb").write_bytes(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    (tmp_path / "cut.ssb").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(BadMagicError):
        load_bundle(tmp_path / "magic.ssb")
    with pytest.raises(UnsupportedVersionError, match="version 99"):
        load_bundle(tmp_path / "ver.ssb")
    with pytest.raises(TruncatedBundleError, match="cut short"):
        load_bundle(tmp_path / "cut.ssb")


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _touch(b: LoadedBundle) -> int:
    return sum(
        int(p.view(np.uint8).reshape(-1)[::4096].sum()) for t in b.tensors.values() for p in t.planes.values()
    )


def test_default_model_end_to_end_and_weight_sharing(default_gguf: Path, tmp_path: Path) -> None:
    """compile keep -> info -> encrypt -> load; then bundles of equal digest share one copy (RSS)."""
    ck = load_checkpoint(default_gguf, "keep")
    cli_ok(
        "model", "compile", str(default_gguf), "--out", str(tmp_path / "a.ssb"), "--quant", "keep", "--quiet"
    )
    cli_ok(
        "model",
        "compile",
        str(default_gguf),
        "--out",
        str(tmp_path / "b.ssb"),
        "--share-length",
        "1000",
        "--unshare-length",
        "200",
        "--seq-length",
        "2048",
        "--quiet",
    )
    ia, ib = (json.loads(cli_ok("model", "info", str(tmp_path / f"{x}.ssb"), "--json")) for x in "ab")
    assert ia["weight_digest"] == ib["weight_digest"] and ia["weight_bytes"] == ib["weight_bytes"]
    assert ib["limits"] == {"share_length": 1000, "unshare_length": 200, "seq_length": 2048}
    assert ia["tensor_formats"] == {"q8": 1, "q4": 210, "f32": 61} and ia["architecture"] == "llama"
    key = os.urandom(32).hex()
    (tmp_path / "k").write_text(key)
    cli_ok("model", "encrypt", str(tmp_path / "b.ssb"), "--key-file", str(tmp_path / "k"), "--in-place")
    assert json.loads(cli_ok("model", "info", str(tmp_path / "b.ssb"), "--json"))["encrypted"] is True

    weight_bytes = ia["weight_bytes"]
    base = _rss()
    a = load_bundle(tmp_path / "a.ssb")
    _touch(a)
    first = _rss() - base
    b = load_bundle(tmp_path / "b.ssb", key=bytes.fromhex(key))
    _touch(b)
    second = _rss() - base - first
    assert b.shared and b.encrypted and b.limits.seq_length == 2048 and a.limits.seq_length == 8192
    assert first > 0.8 * weight_bytes
    assert second < 0.1 * weight_bytes, (first, second, weight_bytes)
    same_tensors(ck.tensors, b.tensors)
    # Control: without sharing, a third load costs a full copy, so the measurement is meaningful.
    c = load_bundle(tmp_path / "b.ssb", key=bytes.fromhex(key), share=False)
    _touch(c)
    assert _rss() - base - first - second > 0.8 * weight_bytes


@pytest.mark.slow
@pytest.mark.parametrize(
    "quant,group", [("f32", 32), ("f16", 32), ("bf16", 32), ("int8", 32), ("int4", 32), ("int4", 64)]
)
def test_default_model_compiles_to_every_format(
    default_gguf: Path, tmp_path: Path, quant: str, group: int
) -> None:
    ck = load_checkpoint(default_gguf, quant, group)
    h = write_bundle(ck, tmp_path / "m.ssb", Limits.default(ck.context_length))
    b = load_bundle(tmp_path / "m.ssb", share=False)
    assert b.weight_digest == h["weight_digest"]
    ref = load_checkpoint(default_gguf, "f32").tensors
    for name in ("layers.0.wq", "layers.29.w_down", "tok_embeddings"):
        w = ref[name].planes["data"]
        rel = np.sqrt(np.mean((dequantize(b.tensors[name]) - w) ** 2)) / np.sqrt(np.mean(w**2))
        assert rel < {"int4": 0.2, "int8": 0.01}.get(quant, 0.004), (name, rel)
