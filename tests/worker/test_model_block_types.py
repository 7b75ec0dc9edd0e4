"""A GGUF of the block types K-quant mixes hold (Q4_K, Q5_K, Q6_K, Q4_0, Q5_0, Q5_1, Q8_0) end to
end: compiled with `keep` its blocks keep their bits (q4k, q5k, q6k, q4s, q5s, q5 and q8p panels; the
Q8_0 head as q8), the bundle stays within 10% of the file, and the model agrees with the exact float
dequantization of the same file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf_files import T, requantize_gguf
from test_model import LONG_TOKENS, MEDIUM, QUANT_COSINE_MIN, SHORT, all_logits, gazetteer

from seqshare.bundle.convert import load_checkpoint
from seqshare.bundle.format import Limits, write_bundle
from seqshare.bundle.loader import load_bundle
from seqshare.worker.model import Model

BUNDLE_OVER_FILE_MAX = 1.10  # issue 12: a K-quant mix compiles to at most 10% more than the file
# The logits' RMS error against the file's exact dequantization, relative to their RMS: the int8
# activations' error, measured 0.022 here (0.025 with every layer in Q5_0/Q5_1).
LOGIT_RMS_REL_MAX = 0.03
# Top-1 over these 902 tokens moves with near-ties: measured 0.966 here (the x86 levels compute the same
# bits). With ffn_down all Q6_K it was 0.979, and 0.955 with the head in q8p as well (its RMS error
# 0.001 higher); making ffn_down exact instead of Q6_K raised it by 0.010 while the RMS error fell
# by only 0.0006. So test_model's int4 bound (0.97) would sit in that noise.
MIXED_TOP1_MIN = 0.96


@pytest.fixture(scope="module")
def mixed_gguf(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "default-mixed.gguf"
    # The tied embedding / output head at 8 bits, as llama.cpp's mixes keep it (Q6_K, or Q8_0 where
    # the row length is not a multiple of 256, as here); ffn_down (1536 columns, the one matrix of
    # whole 256-column super-blocks) in Q6_K, Q4_K and Q5_K by turns; attn_output in Q4_0, attn_v in
    # Q8_0, the other layers in both 5-bit block types.
    def qtype(name: str) -> T:
        if name == "token_embd.weight" or ".attn_v" in name:
            return T.Q8_0
        if ".attn_output" in name:
            return T.Q4_0
        if ".ffn_down" in name:
            return (T.Q6_K, T.Q4_K, T.Q5_K)[int(name.split(".")[1]) % 3]
        return T.Q5_1 if ".ffn_" in name else T.Q5_0

    requantize_gguf(default_gguf, out, qtype)
    return out


def test_blocks_keep_their_bits_and_agree_with_the_file(mixed_gguf: Path, tmp_path: Path) -> None:
    keep = load_checkpoint(mixed_gguf, "keep")
    formats = Counter(p.fmt for p in keep.plan if len(p.shape) == 2)
    assert formats == {"q5s": 60, "q4s": 30, "q5": 60, "q6k": 10, "q4k": 10, "q5k": 10, "q8p": 30, "q8": 1}
    bundle = tmp_path / "mixed.ssb"
    write_bundle(keep, bundle, Limits.default(keep.context_length))
    ratio = bundle.stat().st_size / mixed_gguf.stat().st_size
    assert ratio <= BUNDLE_OVER_FILE_MAX, f"bundle is {ratio:.3f}x the file"

    model = Model(load_bundle(bundle, share=False), threads=2, kv_dtype="f32")
    exact = Model(load_checkpoint(mixed_gguf, "f32"), threads=2, kv_dtype="f32")  # the file, dequantized
    # test_model's int4 prompts, through the same int8 activations as the q4 kernels.
    texts = (SHORT, MEDIUM, gazetteer(60))
    ids = [np.asarray(model.encode(t)[:LONG_TOKENS], dtype=np.int32) for t in texts]
    got = np.concatenate([all_logits(model, i) for i in ids])
    want = np.concatenate([all_logits(exact, i) for i in ids])
    top1 = float(np.mean(got.argmax(1) == want.argmax(1)))
    cos = float(np.mean(np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)))
    rms_rel = float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))
    assert rms_rel <= LOGIT_RMS_REL_MAX and cos >= QUANT_COSINE_MIN, (rms_rel, cos, top1)
    assert top1 >= MIXED_TOP1_MIN, (top1, rms_rel)
