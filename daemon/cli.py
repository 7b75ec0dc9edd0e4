"""The `seqshare` command. Each operator task is a group or command registered here; the
commands themselves live beside the code they drive and stay thin."""

from __future__ import annotations

from importlib.metadata import version

import click

from .cli_model import model


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("seqshare"), "--version", prog_name="seqshare")
def cli() -> None:
    """seqshare: an edge LLM daemon for batch document QA.

    A document's KV cache is computed once and shared by every question about it.
    """


cli.add_command(model)


def main() -> None:
    cli()
