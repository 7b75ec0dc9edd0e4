"""`seqshare generate --dump-dir` (the seed's debug build, at run time) and `seqshare debug compare`,
through the CLI on the default model: the seed's file layout, refusal of a used directory, and
per-layer errors against transformers that are small for an f32 run and visibly larger for Q4_1."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from seqshare.daemon.cli import cli

DUMP_RTOL = 1e-4  # f32 weights and KV: every layer's hidden state, key and value vs transformers
Q4_MIN_WORST_REL = 1e-3  # the Q4_1 run's worst error must stand out (the compare is not blind)
PROMPT = "The lighthouse keeper woke before dawn and climbed the narrow stairs to trim the wick."
LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 30, 576, 3, 64  # SmolLM2-135M
ROW = re.compile(r"^\s*(\d+)\s+" + r"\s+".join([r"(\S+)"] * 6) + r"\s*$")


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.stdout, res.stderr


def dump(gguf: Path, out: Path, *extra: str) -> None:
    code, stdout, stderr = run("generate", str(gguf), "--prompt", PROMPT, "--max-new-tokens", "2", "--threads", "2",
                               "--dump-dir", str(out), *extra)
    assert code == 0, stdout + stderr


def compare(d: Path, gguf: Path) -> dict[int, list[float]]:
    """Per layer: [hidden max, rel, key max, rel, value max, rel] as printed."""
    code, stdout, stderr = run("debug", "compare", str(d), "--reference", str(gguf))
    assert code == 0, stdout + stderr
    assert re.search(r"worst: layer \d+ \w+ rel \S+", stderr)
    rows = {int(m[1]): [float(x) for x in m.groups()[1:]] for line in stdout.splitlines() if (m := ROW.match(line))}
    assert sorted(rows) == list(range(LAYERS))
    return rows


@pytest.fixture(scope="module")
def f32_dump(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dumps") / "f32"  # a new directory: generate creates it
    dump(default_gguf, out, "--quant", "f32", "--kv-dtype", "f32")
    return out


def test_dump_layout_is_the_seeds(f32_dump: Path) -> None:
    ids = np.load(f32_dump / "input_ids.npy")
    S = ids.size
    assert S > 10
    assert sorted(p.name for p in f32_dump.iterdir()) == sorted(
        ["input_ids.npy", *(f"output_{i}.npz" for i in range(LAYERS))])
    for layer in (0, LAYERS - 1):
        with np.load(f32_dump / f"output_{layer}.npz") as z:
            assert sorted(z.files) == ["hidden_states", "present_key", "present_value"]
            assert z["hidden_states"].shape == (1, S, HIDDEN)
            assert z["present_key"].shape == z["present_value"].shape == (1, S, KV_HEADS, HEAD_DIM)
            assert all(z[k].dtype == np.float32 and np.isfinite(z[k]).all() for k in z.files)
    with np.load(f32_dump / "output_0.npz") as a, np.load(f32_dump / "output_1.npz") as b:
        assert not np.array_equal(a["hidden_states"], b["hidden_states"])


def test_a_used_dump_directory_is_refused(default_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("an earlier run")
    code, stdout, stderr = run("generate", str(default_gguf), "--prompt", PROMPT, "--dump-dir", str(tmp_path))
    assert code == 1 and "not empty" in stdout + stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_compare_f32_dump_is_close_and_q4_is_not(f32_dump: Path, default_gguf: Path, tmp_path: Path) -> None:
    rows = compare(f32_dump, default_gguf)
    worst = max(max(r[1::2]) for r in rows.values())
    assert worst <= DUMP_RTOL, f"worst relative error {worst:.2e}"
    dump(default_gguf, tmp_path / "q4")  # the shipped Q4_1 weights, int8 activations, f16 KV
    q4 = compare(tmp_path / "q4", default_gguf)
    assert max(max(r[1::2]) for r in q4.values()) > max(Q4_MIN_WORST_REL, 10 * worst)


def test_compare_refuses_an_incomplete_dump(default_gguf: Path, tmp_path: Path) -> None:
    code, stdout, stderr = run("debug", "compare", str(tmp_path), "--reference", str(default_gguf))
    assert code == 1 and "input_ids.npy" in stdout + stderr
