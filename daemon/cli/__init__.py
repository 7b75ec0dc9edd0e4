"""The `seqshare` command. Each operator task is a group or command registered here; the
commands themselves live beside the code they drive and stay thin."""

from __future__ import annotations

from importlib.metadata import version

import click

from seqshare.daemon.cli.bench import bench
from seqshare.daemon.cli.generate import debug, generate
from seqshare.daemon.cli.model import model
from seqshare.daemon.cli.queue import qa, result, status, submit, worker
from seqshare.daemon.cli.service import memory_setup, reload


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("seqshare"), "--version", prog_name="seqshare")
def cli() -> None:
    """seqshare: an edge LLM daemon for batch document QA.

    A document's KV cache is computed once and shared by every question about it.
    """


cli.add_command(model)
cli.add_command(generate)
cli.add_command(debug)
cli.add_command(memory_setup)
cli.add_command(reload)
cli.add_command(bench)
for _cmd in (worker, submit, result, qa, status):
    cli.add_command(_cmd)


def main() -> None:
    cli()
