"""`seqshare qa` end to end: a real worker process, the CLI in a subprocess, files on disk.

One input mixes good lines with every kind of bad line; each bad line fails alone (in the errors
file, with its reason), the good ones are answered; a rerun skips what is answered (idempotent
resume, also after a torn last line); the progress bar shows done / failed / cached.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import redis
from queue_helpers import DOCS, SEQSHARE, WorkerProc, read_jsonl

SECRET = "TOPSECRET-93b1"
ANSWER_FIELDS = {"custom_id", "answer", "finish_reason", "context_tokens", "question_tokens", "generated_tokens",
                 "first_token_s", "total_s", "cache_hit", "job_id", "worker"}


def qa(url: str, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEQSHARE, "qa", str(inp), "--out", str(out), "--redis-url", url, "--timeout", "60",
                           *extra], capture_output=True, text=True, timeout=120)


def line(cid: str, question: str = "What jumps over the dog?", **kw: object) -> str:
    row: dict[str, object] = {"custom_id": cid, "question": question, "params": {"max_new_tokens": 6}}
    row.update(kw)
    if "document" not in row and "document_path" not in row:
        row["document"] = DOCS[0]
    return json.dumps(row)


def test_qa_answers_good_lines_fails_bad_ones_alone_and_resumes(redis_url: str, worker: WorkerProc,
                                                                tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d1.txt").write_text(DOCS[1])
    lines = [
        line("a1"), line("a2", "Who sleeps?"),                                      # 1-2: doc 0, one job
        line("b1", document_path="docs/d1.txt"), line("b2", "Who?", document_path="docs/d1.txt"),  # 3-4
        '{"custom_id": "torn", "document": ',                                       # 5: not JSON
        "[1, 2]",                                                                    # 6: not an object
        json.dumps({"custom_id": "noq", "document": DOCS[0]}),                       # 7: no question
        line("both", document_path="docs/d1.txt", document=DOCS[0]),                 # 8: two documents
        line("nofile", document_path="docs/missing.txt"),                            # 9: unreadable file
        line("a1", "Again?"),                                                        # 10: repeated id
        line("extra", note=SECRET),                                                  # 11: unknown field
        line("zero", params={"max_new_tokens": 0}),                                  # 12: bad params
        line("toolong", "The quick brown fox? " * 20),                               # 13: over unshare_length
        line("nomodel", model="no-such-model"),                                      # 14: unknown model
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    inp.write_bytes(("\n".join(lines) + "\n").encode() + b'{"custom_id": "latin1", "question": "caf\xe9"}\n')

    first = qa(redis_url, inp, out)
    assert first.returncode == 1, first.stderr  # some lines failed
    rows = read_jsonl(out)
    assert sorted(r["custom_id"] for r in rows) == ["a1", "a2", "b1", "b2"]
    for r in rows:
        assert set(r) == ANSWER_FIELDS and r["answer"] and r["generated_tokens"] == 6 and r["worker"] == "w1"
        assert r["cache_hit"] is False  # each document's first (and only) job computed its prefix
    errors = read_jsonl(tmp_path / "answers.errors.jsonl")
    by_line = {e["error"]["message"].split(":")[0]: e for e in errors if e["error"]["message"].startswith("line ")}
    assert by_line["line 5"]["error"]["type"] == "InvalidLineError" and "not JSON" in str(by_line["line 5"])
    assert "not a JSON object" in str(by_line["line 6"])
    assert by_line["line 7"]["custom_id"] == "noq" and "question" in by_line["line 7"]["error"]["message"]
    assert "exactly one of document and document_path" in str(by_line["line 8"])
    assert by_line["line 9"]["custom_id"] == "nofile" and "missing.txt" in str(by_line["line 9"])
    assert "repeats line 1" in str(by_line["line 10"])
    assert by_line["line 11"]["custom_id"] == "extra" and "note" in str(by_line["line 11"])
    assert "params.max_new_tokens" in str(by_line["line 12"])
    worker_side = {e["custom_id"]: e["error"] for e in errors if not e["error"]["message"].startswith("line ")}
    assert worker_side["toolong"]["type"] == "LimitExceededError" and "unshare_length" in str(worker_side)
    assert worker_side["nomodel"]["type"] == "UnknownModelError"
    assert "not UTF-8" in str(by_line["line 15"])
    assert len(errors) == 11 and SECRET not in (tmp_path / "answers.errors.jsonl").read_text()
    assert "done=4" in first.stderr and "failed=11" in first.stderr and "cached=0" in first.stderr
    assert "4 answered, 11 failed, 0 from cached prefixes, 0 already answered" in first.stderr

    # Rerun: nothing answered is asked again; the output is unchanged.
    before = out.read_text()
    again = qa(redis_url, inp, out)
    assert out.read_text() == before
    assert "0 answered, 11 failed, 0 from cached prefixes, 4 already answered" in again.stderr

    # The operator fixes the bad lines; a crash had torn the last answer line. Only what is missing is
    # answered, and the cached documents make those answers cache hits.
    out.write_text(before[: before.rindex("\n", 0, len(before) - 1) + 1] + before.splitlines()[-1][:15])
    torn_id = json.loads(before.splitlines()[-1])["custom_id"]
    fixed = [*lines[:4], line("torn", "Why?"), line("noq", "Who?"), line("toolong", "The fox?")]
    inp.write_text("\n".join(fixed) + "\n")
    third = qa(redis_url, inp, out)
    assert third.returncode == 0, third.stderr
    rows = read_jsonl(out)  # every line parses: the torn tail was cut before appending
    ids = [r["custom_id"] for r in rows]
    assert sorted(ids) == sorted(["a1", "a2", "b1", "b2", "torn", "noq", "toolong"]) and len(set(ids)) == len(ids)
    new = {r["custom_id"]: r for r in rows[3:]}
    assert set(new) == {torn_id, "torn", "noq", "toolong"}
    assert all(r["cache_hit"] for r in new.values())  # both documents were already cached in the worker
    assert "4 answered, 0 failed, 4 from cached prefixes, 3 already answered" in third.stderr
    assert read_jsonl(tmp_path / "answers.errors.jsonl") == []


def test_qa_with_no_worker_times_out_per_line_and_loses_nothing(redis_url: str, tmp_path: Path) -> None:
    """No worker: the lines fail with a timeout reason (not silently), and the jobs stay queued."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    inp.write_text(line("x1") + "\n" + line("x2", document=DOCS[2]) + "\n")
    res = subprocess.run([SEQSHARE, "qa", str(inp), "--out", str(out), "--redis-url", redis_url, "--timeout", "1",
                          "--quiet"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    errors = read_jsonl(tmp_path / "answers.errors.jsonl")
    assert sorted(e["custom_id"] for e in errors) == ["x1", "x2"]
    assert {e["error"]["type"] for e in errors} == {"QueueTimeoutError"}
    assert redis.Redis.from_url(redis_url).llen("rq:queue:seqshare") == 2


def submit(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEQSHARE, "submit", "--redis-url", url, *args], capture_output=True, text=True,
                          timeout=60)


def test_submit_one_job_from_the_shell(redis_url: str, worker: WorkerProc, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCS[2])
    res = submit(redis_url, "--document", str(doc), "-q", "What jumps?", "-q", "Who sleeps?", "--max-new-tokens",
                 "5", "--json", "--timeout", "30")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [a["custom_id"] for a in out["answers"]] == ["q1", "q2"] and out["worker"] == "w1" and out["job_id"]
    assert all(a["generated_tokens"] == 5 for a in out["answers"])
    # plain output: one line per answer
    plain = submit(redis_url, "--document", str(doc), "-q", "What is brown?", "--max-new-tokens", "5")
    assert plain.returncode == 0 and plain.stdout.startswith("[q1] ")
    # --no-wait prints the job id at once; a named error is a clear message and exit 1
    job_id = submit(redis_url, "--context", DOCS[0], "-q", "Who?", "--no-wait").stdout.strip()
    assert redis.Redis.from_url(redis_url).exists(f"rq:job:{job_id}")
    bad = submit(redis_url, "--context", DOCS[0], "-q", "Who?", "--max-new-tokens", "5000")
    assert bad.returncode == 1 and "LimitExceededError" not in bad.stdout and "seq_length" in bad.stderr
    unknown = submit(redis_url, "--context", DOCS[0], "-q", "Who?", "--model", "nope", "--timeout", "30")
    assert unknown.returncode == 1 and "UnknownModelError" in unknown.stderr
