"""`seqshare worker`, `submit`, `result`, `qa`, `status`: the queue from a shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from seqshare.jobqueue.client import Client, make_payload
from seqshare.worker.errors import (
    BundleError,
    ConfigError,
    SeqshareError,
    UnsupportedArchitectureError,
    UnsupportedQuantError,
)
from seqshare.worker.params import SamplingParams

EX_CONFIG = 78
WORKER_RETRY_S = 5.0
_url = click.option("--redis-url", default=None, help="Redis URL [default: $SEQSHARE_REDIS_URL]")


@click.command("worker")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML config (flags override it).")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A bundle to load (repeatable); served under its file stem.")
@_url
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--threads", type=int, default=None, help="Compute threads (0 = all cores).")
@click.option("--name", default=None, help="Worker name [default: host.pid.random].")
@click.option("--burst", is_flag=True, help="Exit 0 once the queues are empty.")
def worker(config_file: Path | None, bundles: tuple[Path, ...], redis_url: str | None, key_file: Path | None,
           threads: int | None, name: str | None, burst: bool) -> None:
    """Run a resident worker: load the bundles once, answer jobs from Redis in this process."""
    from seqshare.daemon.config import load_settings
    from seqshare.daemon.engines import load_engines
    from seqshare.daemon.logs import setup_logging
    from seqshare.daemon.notify import Heartbeat, Notifier
    from seqshare.jobqueue.resident import ResidentWorker, unique_name

    models = [{"name": b.stem, "path": b} for b in bundles] or None
    try:
        settings = load_settings(config_file, redis_url=redis_url, key_file=key_file,
                                 threads=threads, name=name, models=models)
        if not settings.models:
            raise ConfigError("no model to serve: give --bundle PATH or [[models]] in the config")
    except ConfigError as e:
        click.echo(f"seqshare worker: {e}", err=True)
        sys.exit(EX_CONFIG)
    wname = unique_name(settings.name)
    setup_logging(worker=wname)
    notifier = Notifier()
    hb = Heartbeat.from_env(notifier).start()
    try:
        engines = load_engines(settings, progress=hb.progress)
    except (ConfigError, BundleError, UnsupportedArchitectureError, UnsupportedQuantError, OSError) as e:
        # A wrong key, a tampered or missing bundle: restarting cannot fix it, so systemd must not try.
        click.echo(f"seqshare worker: {type(e).__name__}: {e}", err=True)
        sys.exit(EX_CONFIG)
    except SeqshareError as e:
        raise click.ClickException(str(e)) from e
    from seqshare.jobqueue.client import connect

    try:
        # Short command retries: the worker's loop retries by itself, and a stop must not wait on a dead Redis.
        conn = connect(settings.redis_url, retry_s=WORKER_RETRY_S)
        code = ResidentWorker(conn, settings, engines, name=wname, burst=burst, notifier=notifier,
                              heartbeat=hb).run()
    except ConfigError as e:  # e.g. a live worker already has this name
        click.echo(f"seqshare worker: {e}", err=True)
        sys.exit(EX_CONFIG)
    sys.exit(code)


@click.command("submit")
@click.option("--document", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="File holding the context document.")
@click.option("--context", default=None, help="The context as text (instead of --document).")
@click.option("-q", "--question", "questions", multiple=True, required=True, help="A question (repeatable).")
@click.option("--model", default=None)
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--params", "params_json", default=None, help="SamplingParams as JSON.")
@click.option("--cache-salt", default=None)
@click.option("--priority", type=click.Choice(["low", "normal", "high"]), default="normal")
@click.option("--wait/--no-wait", default=True, help="Wait for the answers [default: wait].")
@click.option("--timeout", type=float, default=None, help="Seconds to wait.")
@click.option("--json", "as_json", is_flag=True)
@_url
def submit(document: Path | None, context: str | None, questions: tuple[str, ...], model: str | None,
           max_new_tokens: int | None, params_json: str | None, cache_salt: str | None, priority: str,
           wait: bool, timeout: float | None, as_json: bool, redis_url: str | None) -> None:
    """Submit one job: a document and its questions (custom_ids q1, q2, ...)."""
    if (document is None) == (context is None):
        raise click.UsageError("give exactly one of --document and --context")
    text = document.read_text(encoding="utf-8") if document else str(context)
    try:
        params = SamplingParams.model_validate_json(params_json) if params_json else SamplingParams()
        if max_new_tokens is not None:
            params = params.model_copy(update={"max_new_tokens": max_new_tokens})
            params = SamplingParams.model_validate(params.model_dump())
        payload = make_payload(text, [(f"q{i + 1}", q) for i, q in enumerate(questions)], params=params,
                               model=model, cache_salt=cache_salt, priority=priority)
        handle = Client(redis_url).submit(payload)
        if not wait:
            click.echo(json.dumps({"job_id": handle.id}) if as_json else handle.id)
            return
        result = handle.wait(timeout)
    except SeqshareError as e:
        raise click.ClickException(str(e)) from e
    except ValueError as e:  # pydantic's ValidationError of --params
        raise click.ClickException(f"invalid parameters: {e}") from e
    _print_result(handle.id, result, as_json)


@click.command("result")
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="Seconds to wait [default: until it is done].")
@click.option("--json", "as_json", is_flag=True)
@_url
def result(job_id: str, timeout: float | None, as_json: bool, redis_url: str | None) -> None:
    """Wait for a job submitted with --no-wait and print its answers (exit 1 if it failed)."""
    from seqshare.jobqueue.client import JobHandle, connect

    try:
        answers = JobHandle(job_id, connect(redis_url)).wait(timeout)
    except SeqshareError as e:
        raise click.ClickException(str(e)) from e
    _print_result(job_id, answers, as_json)


def _print_result(job_id: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"job_id": job_id, **result}, indent=2, ensure_ascii=False))
        return
    for a in result["answers"]:
        click.echo(f"[{a['custom_id']}] {a.get('answer', a.get('error'))}")


@click.command("qa")
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="ANSWERS.jsonl")
@click.option("--errors", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Failed lines [default: ANSWERS.errors.jsonl].")
@_url
@click.option("--model", default=None, help="Model for lines that name none.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def qa(input_path: Path, out: Path, errors: Path | None, redis_url: str | None, model: str | None,
       timeout: float | None, quiet: bool) -> None:
    """Batch document QA: enqueue INPUT.jsonl, wait, append answers to --out as they complete."""
    from tqdm import tqdm

    from seqshare.jobqueue.batch_qa import Tally, run_qa

    bar: Any = None
    live = sys.stderr.isatty()  # a terminal gets a ticking clock; a log file gets a line per change
    shown: tuple[int, int, int] | None = None

    def update(t: Tally) -> None:
        nonlocal bar, shown
        if quiet or (not live and shown == (t.done, t.failed, t.cached)):
            return
        if bar is None:
            bar = tqdm(total=t.total - t.skipped, unit="q", file=sys.stderr, dynamic_ncols=True)
        shown = (t.done, t.failed, t.cached)
        bar.n = t.done + t.failed
        bar.set_postfix(done=t.done, failed=t.failed, cached=t.cached, refresh=False)
        bar.refresh()

    tally = run_qa(input_path, out, errors, redis_url=redis_url, model=model, timeout_s=timeout, on_update=update)
    if bar is not None:
        bar.close()
    click.echo(f"{tally.done} answered, {tally.failed} failed, {tally.cached} from cached prefixes, "
               f"{tally.skipped} already answered", err=True)
    sys.exit(1 if tally.failed else 0)


@click.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.option("--prometheus", is_flag=True, help="Print the Prometheus text format.")
@_url
def status(as_json: bool, prometheus: bool, redis_url: str | None) -> None:
    """Queues, workers, cached prefixes, hit rate, tokens saved, throughput."""
    from seqshare.jobqueue.client import connect
    from seqshare.jobqueue.routing import Keys
    from seqshare.jobqueue.stats import prometheus_text, snapshot

    snap = snapshot(connect(redis_url, retry_s=2.0), Keys())
    if prometheus:
        click.echo(prometheus_text(snap), nl=False)
    elif as_json:
        click.echo(json.dumps(snap, indent=2))
    else:
        click.echo(_human(snap))


def _human(s: dict[str, Any]) -> str:
    lines = ["queues:"]
    lines += [f"  {q:<20} queued {v['queued']:>6}  started {v['started']:>4}  finished {v['finished']:>6}  "
              f"failed {v['failed']:>4}" for q, v in s["queues"].items()]
    lines.append("workers:" if s["workers"] else "workers: none")
    lines += [f"  {w['name']:<32} {w['state']:<9} models {','.join(w['models']) or '-':<16} "
              f"cached prefixes {w['cached_prefixes']:>4}  own queue {w['queued']:>4}  "
              f"jobs {w.get('jobs_done', 0):>6}" for w in s["workers"]]
    t = s["totals"]
    rate = "n/a" if s["hit_rate"] is None else f"{s['hit_rate']:.1%}"
    lines.append(f"jobs done {t['jobs_done']}, failed {t['jobs_failed']}, questions {t['questions']}, "
                 f"tokens generated {t['tokens_generated']}")
    lines.append(f"prefix hit rate {rate}; context tokens prefilled {t['context_tokens_prefilled']}, "
                 f"saved {t['tokens_saved']}")
    tp = s["throughput_per_min"]
    lines.append(f"throughput (last 5 min): {tp['questions']:.1f} questions/min, "
                 f"{tp['tokens_generated']:.0f} tokens/min")
    return "\n".join(lines)
