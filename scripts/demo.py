"""`make demo`: batch document QA end to end on the default model.

    .venv/bin/python scripts/demo.py [--docs N] [--questions N] [--max-new-tokens N] [--gguf PATH]

1. Compiles the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) to a seqshare bundle, keeping the
   Q4_1 blocks as they are, and encrypts it with a newly generated key. Both are cached in
   $SEQSHARE_HOME/demo, so a second run starts at step 2.
2. Starts a private Redis on a unix socket (or uses $SEQSHARE_REDIS_URL).
3. Starts `seqshare worker` on the encrypted bundle and waits until it has loaded the model.
4. Runs `seqshare qa` twice on the documents and questions in scripts/demo_data: first all but the
   last question of each document, then the whole set, as follow-up questions arriving later would.
   The second run skips what is answered and finds every document's prefix in the worker's cache.
5. Prints the answers and the cache figures, then stops the worker (SIGTERM) and Redis, also after
   an error or Ctrl-C.

--docs/--questions (or SEQSHARE_DEMO_DOCS/SEQSHARE_DEMO_QUESTIONS) select a smaller set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import redis

from seqshare.bundle.format import VERSION as BUNDLE_VERSION
from seqshare.daemon.fetch import default_model_path
from seqshare.daemon.paths import seqshare_home
from seqshare.daemon.redis_server import ENV_URL, EmbeddedRedis

DATA = Path(__file__).resolve().parent / "demo_data"
SEQSHARE = str(Path(sys.executable).with_name("seqshare"))


@dataclass
class Doc:
    id: str
    path: Path
    questions: list[tuple[str, str, list[str]]]  # custom_id, question, words one of which a right answer holds

    @property
    def title(self) -> str:
        return self.path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")


def say(text: str = "") -> None:
    """Print; a closed stdout (`demo.py | head`) must not keep the clean-up from running."""
    with contextlib.suppress(BrokenPipeError):
        print(text, flush=True)


def shown(cmd: list[str]) -> str:
    home = str(Path.home())
    return "$ " + " ".join(("seqshare" if c == SEQSHARE else c).replace(home, "~") for c in cmd)


def run(cmd: list[str]) -> None:
    say("      " + shown(cmd))
    subprocess.run(cmd, check=True)


# --- 1. the model ---------------------------------------------------------------------------------
def ensure_bundle(gguf: Path, home: Path) -> tuple[Path, Path]:
    """The encrypted bundle and its key, compiled once and reused while the sources are unchanged."""
    home.mkdir(parents=True, exist_ok=True)
    key, bundle, stamp_file = home / "demo.key", home / f"{gguf.stem}.ssb", home / "bundle.json"
    st = gguf.stat()
    stamp = {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "quant": "keep",
             "bundle_format": BUNDLE_VERSION, "seqshare": version("seqshare")}
    if key.exists() and bundle.exists() and stamp_file.exists() and _opens(bundle, key) \
            and json.loads(stamp_file.read_text()) == stamp:
        say(f"      cached: {shown([str(bundle)])[2:]} (encrypted; key {shown([str(key)])[2:]})")
        return bundle, key
    if not key.exists():
        run([SEQSHARE, "model", "keygen", "--out", str(key)])
    plain = home / f".{gguf.stem}.plain.ssb"
    try:
        run([SEQSHARE, "model", "compile", str(gguf), "--out", str(plain), "--quant", "keep"])
        run([SEQSHARE, "model", "encrypt", str(plain), "--key-file", str(key), "--out", str(bundle)])
    finally:
        plain.unlink(missing_ok=True)
    stamp_file.write_text(json.dumps(stamp, indent=2))
    return bundle, key


def _opens(bundle: Path, key: Path) -> bool:
    from seqshare.bundle.loader import bundle_info
    from seqshare.worker.errors import SeqshareError

    try:
        return bool(bundle_info(bundle, key_file=key).get("encrypted"))
    except (SeqshareError, OSError, ValueError):
        return False


# --- 2. and 3. Redis and the worker ----------------------------------------------------------------
@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    if url := os.environ.get(ENV_URL):
        say(f"      using {ENV_URL}={url}")
        yield url
        return
    server = EmbeddedRedis()
    server.start()
    say(f"      private redis-server on {server.url}")
    try:
        yield server.url
    finally:
        server.stop()
        say("      Redis stopped")


def start_worker(url: str, bundle: Path, key: Path, run_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    name = f"demo-{os.getpid()}"
    cmd = [SEQSHARE, "worker", "--bundle", str(bundle), "--key-file", str(key), "--redis-url", url, "--name", name]
    say("      " + shown(cmd))
    log = (run_dir / "worker.log").open("wb")
    # Its own session: a Ctrl-C in the terminal reaches the demo only, which then stops the worker in order.
    env = {**os.environ, "SEQSHARE_CACHE__DIRECTORY": str(run_dir / "kv-spill")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    conn, t0 = redis.Redis.from_url(url), time.monotonic()
    while not conn.exists(f"seqshare:worker:{name}"):
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}:\n{tail(run_dir / 'worker.log')}")
        if time.monotonic() - t0 > 300:
            raise RuntimeError(f"the worker was not ready after 300 s:\n{tail(run_dir / 'worker.log')}")
        if sys.stdout.isatty():
            print(f"\r      loading the model ... {time.monotonic() - t0:4.1f} s", end="", flush=True)
        time.sleep(0.1)
    print("\r" if sys.stdout.isatty() else "", end="")
    say(f"      worker {name} ready after {time.monotonic() - t0:.1f} s (model loaded once, decrypted in memory)")
    return proc, name


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """First SIGTERM: finish the batch and exit; a second one if it takes too long; then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # impatient: go to the next step instead of leaving the worker behind
            say("      stopping the worker sooner")
    say(f"stopping\n      worker stopped (exit code {proc.wait()})")


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# --- 4. the questions -------------------------------------------------------------------------------
def load_docs(n_docs: int, n_questions: int) -> list[Doc]:
    spec = json.loads((DATA / "questions.json").read_text(encoding="utf-8"))
    docs = []
    for d in spec["documents"][:n_docs]:
        qs = [(f"{d['id']}-{i + 1}", q["q"], q["expect"]) for i, q in enumerate(d["questions"][:n_questions])]
        docs.append(Doc(d["id"], DATA / d["file"], qs))
    return docs


def write_input(path: Path, docs: list[Doc], per_doc: int, max_new_tokens: int) -> int:
    rows = [{"custom_id": cid, "document_path": str(d.path), "question": q,
             "params": {"max_new_tokens": max_new_tokens}}
            for d in docs for cid, q, _ in d.questions[:per_doc]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def qa(url: str, inp: Path, out: Path) -> None:
    cmd = [SEQSHARE, "qa", str(inp), "--out", str(out), "--redis-url", url, "--timeout", "900"]
    say("      " + shown(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    if code != 0:
        raise RuntimeError(f"seqshare qa exited with {code}; see {out.with_name(out.stem + '.errors.jsonl')}")


# --- 5. results ------------------------------------------------------------------------------------
def show_answers(out: Path, docs: list[Doc]) -> tuple[int, int]:
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    got = {r["custom_id"]: r for r in rows}
    right = 0
    for d in docs:
        first = got[d.questions[0][0]]
        say(f"\n  == {d.title} ({first['context_tokens']} tokens) ==")
        for cid, q, expect in d.questions:
            a = got[cid]
            ok = any(w in a["answer"].lower() for w in expect)
            right += ok
            how = "cached prefix" if a["cache_hit"] else "prefix computed"
            say(f"  Q: {q}\n  A: {' '.join(a['answer'].split())}")
            say(f"     [{'contains' if ok else 'lacks'} the expected fact; {how}; {a['generated_tokens']} tokens "
                f"in {a['total_s']:.1f} s]")
    return right, sum(len(d.questions) for d in docs)


def show_cache(url: str, worker: str) -> None:
    res = subprocess.run([SEQSHARE, "status", "--json", "--redis-url", url], capture_output=True, text=True,
                         check=True)
    (w,) = [w for w in json.loads(res.stdout)["workers"] if w["name"] == worker]
    jobs = w.get("prefix_hits", 0) + w.get("prefix_misses", 0)
    say(f"\n  cache ({shown(['seqshare', 'status'])[2:]} shows these for every worker):")
    say(f"    jobs {jobs}: prefix from the cache {w.get('prefix_hits', 0)}, computed {w.get('prefix_misses', 0)}; "
        f"{w['cached_prefixes']} document prefix(es) held by the worker")
    say(f"    context tokens prefilled {w.get('context_tokens_prefilled', 0)}, saved {w.get('tokens_saved', 0)} "
        "(versus prefilling every question's full prompt)")


def ask(url: str, docs: list[Doc], per_doc: int, max_new_tokens: int, run_dir: Path) -> Path:
    """All but the last question of each document, then the full set (answered lines are skipped)."""
    out = run_dir / "answers.jsonl"
    if per_doc > 1:
        write_input(run_dir / "first.jsonl", docs, per_doc - 1, max_new_tokens)
        qa(url, run_dir / "first.jsonl", out)
        say("      follow-up questions (the same input in full: answered lines are skipped)")
    write_input(run_dir / "all.jsonl", docs, per_doc, max_new_tokens)
    qa(url, run_dir / "all.jsonl", out)
    return out


def demo(args: argparse.Namespace) -> None:
    gguf = args.gguf or default_model_path()
    if not gguf.exists():
        run([SEQSHARE, "model", "fetch-default"])
    docs = load_docs(args.docs, args.questions)
    home = seqshare_home() / "demo"
    say(f"seqshare demo: batch document QA, {len(docs)} document(s), {sum(len(d.questions) for d in docs)} "
        f"question(s), model {gguf.name}")
    say("[1/5] model bundle (Q4_1 kept as is, AES-256-GCM encrypted)")
    bundle, key = ensure_bundle(gguf, home)
    run_dir = home / "last-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    say("[2/5] Redis")
    with redis_server() as url:
        say("[3/5] worker")
        worker, name = start_worker(url, bundle, key, run_dir)
        try:
            say("[4/5] questions")
            out = ask(url, docs, args.questions, args.max_new_tokens, run_dir)
            say("[5/5] answers")
            right, total = show_answers(out, docs)
            show_cache(url, name)
            say(f"\n  answers containing the expected fact: {right}/{total} (a 135M-parameter model)")
            say(f"  files: {run_dir}")
        finally:
            stop_worker(worker)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=int(os.environ.get("SEQSHARE_DEMO_DOCS", 4)))
    ap.add_argument("--questions", type=int, default=int(os.environ.get("SEQSHARE_DEMO_QUESTIONS", 6)))
    ap.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("SEQSHARE_DEMO_MAX_NEW_TOKENS", 64)))
    ap.add_argument("--gguf", type=Path, default=None, help="default: the fetched default model")
    args = ap.parse_args()
    t0 = time.monotonic()
    try:
        demo(args)
    except KeyboardInterrupt:
        say("\ninterrupted; everything was stopped")
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as e:
        say(f"\ndemo failed: {e}")
        return 1
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
