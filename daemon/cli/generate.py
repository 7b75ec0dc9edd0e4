"""`seqshare generate` (answer one prompt, or questions about a document, in this process) and
`seqshare debug compare` (a dump against transformers). Thin: parse, load, call worker.generate or
worker.docqa (through cli_docqa), print."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from seqshare.daemon.cli.bench import peak_rss_bytes
from seqshare.worker.errors import SeqshareError


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(f"{type(e).__name__}: {e}" if isinstance(e, SeqshareError) else str(e))


def open_source(path: Path, key_file: Path | None, quant: str | None = None) -> Any:
    """A bundle file; or, for convenience, a GGUF file or HF directory converted in memory (default quant
    keep: GGUF blocks as they are)."""
    if path.is_dir() or path.suffix.lower() == ".gguf":
        from seqshare.bundle.convert import load_checkpoint

        return load_checkpoint(path, quant=quant or "keep")
    if quant is not None:
        raise click.UsageError("--quant applies to a GGUF file or checkpoint directory; a bundle keeps its own")
    from seqshare.bundle.loader import load_bundle

    return load_bundle(path, key_file=key_file)


def _check_usage(prompt: str | None, context_file: Path | None, questions: tuple[str, ...],
                 no_reuse: bool, dump_dir: Path | None) -> None:
    if context_file is None:
        if prompt is None:
            raise click.UsageError("give --prompt, or --context-file with one or more --question")
        if questions or no_reuse:
            raise click.UsageError("--question and --no-reuse go with --context-file")
        return
    if prompt is not None:
        raise click.UsageError("--prompt and --context-file exclude each other (ask with --question)")
    if not questions:
        raise click.UsageError("--context-file needs at least one --question")
    if dump_dir is not None:
        raise click.UsageError("--dump-dir dumps a single --prompt's prefill, not a document's")


def _prefill_progress() -> Any:
    if not sys.stderr.isatty():
        return None
    return lambda done, total: click.echo(f"\rprefill {done}/{total} tokens", err=True, nl=done == total)


@click.command("generate")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--prompt", help="The prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user turn with the bundle's chat template.")
@click.option("--system", help="With --chat or --context-file: a system message before the user turn.")
@click.option("--context-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A document to answer --question about through one shared prefix.")
@click.option("--question", "questions", multiple=True, help="A question about --context-file (repeatable).")
@click.option("--no-reuse", is_flag=True, help="Answer each question alone on the full prompt (no shared prefix).")
@click.option("--raw", is_flag=True, help="With --context-file: no chat template; context and questions as given.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--mode", type=click.Choice(["greedy", "sample", "penalty_sample"]), default="greedy", show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repeat-penalty", type=float, default=1.2, show_default=True)
@click.option("--repeat-last-n", type=click.IntRange(0), default=32, show_default=True)
@click.option("--seed", type=click.IntRange(0), help="Seed of the sampled modes (reproducible runs).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", type=click.IntRange(0), default=0, help="Compute threads (0 = all cores).")
@click.option("--kv-dtype", type=click.Choice(["f16", "f32"]), default="f16", show_default=True)
@click.option("--quant", type=click.Choice(["f32", "f16", "bf16", "int8", "int4", "keep"]),
              help="For a GGUF file or checkpoint directory: convert its weights in memory (default keep).")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write per-layer output_{layer}.npz of the prompt's prefill here (must be new or empty).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), help="Key of an encrypted bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the text.")
def generate(bundle: Path, prompt: str | None, chat: bool, system: str | None, context_file: Path | None,
             questions: tuple[str, ...], no_reuse: bool, raw: bool, as_json: bool, threads: int, kv_dtype: str,
             quant: str | None, dump_dir: Path | None, key_file: Path | None, **sampling: Any) -> None:
    """Answer PROMPT, or every QUESTION about CONTEXT_FILE, with the model in BUNDLE (a bundle file, or
    a GGUF file / checkpoint directory converted in memory)."""
    from seqshare.worker.chat import chat_ids
    from seqshare.worker.debug_dump import DumpWriter
    from seqshare.worker.generate import generate as run
    from seqshare.worker.model import Model
    from seqshare.worker.params import SamplingParams

    _check_usage(prompt, context_file, questions, no_reuse, dump_dir)
    sampling["stop"] = list(sampling["stop"])
    try:
        params = SamplingParams(**sampling)
        dump = DumpWriter(dump_dir) if dump_dir is not None else None
        context = context_file.read_text(encoding="utf-8") if context_file is not None else None
        source = open_source(bundle, key_file, quant)
        model = Model.from_checkpoint(source, threads=threads, kv_dtype=kv_dtype)
        if context is not None:
            _answer_document(model, source, bundle, context, list(questions), params, not no_reuse, system, raw,
                             as_json)
            return
        assert prompt is not None
        ids = chat_ids(model, prompt, system) if chat else model.encode(prompt)
        if dump is not None:
            dump.input_ids = np.asarray(ids, dtype=np.int32)
        result = run(model, ids, params, dump=dump, progress=_prefill_progress())
    except (SeqshareError, ValueError, UnicodeDecodeError) as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "peak_rss_bytes": peak_rss_bytes()}))
    else:
        click.echo(result.text)


def _answer_document(model: Any, source: Any, path: Path, context: str, questions: list[str], params: Any,
                     reuse: bool, system: str | None, raw: bool, as_json: bool) -> None:
    from seqshare.daemon.cli.docqa import answer_document, to_json, to_text

    doc = answer_document(model, source, path, context, questions, params, reuse=reuse, system=system, raw=raw)
    if as_json:
        click.echo(json.dumps(to_json(doc, questions, reuse, peak_rss_bytes())))
    else:
        click.echo(to_text(doc, questions))


@click.group()
def debug() -> None:
    """Developer tools: compare engine dumps with the transformers reference."""


@debug.command("compare")
@click.argument("dump_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reference", required=True, type=click.Path(exists=True, path_type=Path),
              help="The source transformers can load: a GGUF file or a Hugging Face checkpoint directory.")
def compare(dump_dir: Path, reference: Path) -> None:
    """Per-layer max abs and relative error of a --dump-dir dump against transformers (float32)."""
    from seqshare.worker.debug_dump import compare_dump, format_errors

    try:
        errors = compare_dump(dump_dir, load_reference(reference))
    except (SeqshareError, ValueError) as e:
        raise _fail(e) from e
    click.echo(format_errors(errors))
    worst = max(errors, key=lambda e: e.rel)
    click.echo(f"worst: layer {worst.layer} {worst.name} rel {worst.rel:.3e}", err=True)


@functools.lru_cache(maxsize=1)
def load_reference(src: Path) -> Any:
    """The float32 transformers model of a local GGUF file or checkpoint directory (never the hub).
    Cached: loading a GGUF through transformers takes tens of seconds, and in-process callers (tests,
    a notebook) compare several dumps against one reference."""
    import torch
    from transformers import AutoModelForCausalLM

    if src.is_dir():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32, local_files_only=True
        )
    return model.eval()
