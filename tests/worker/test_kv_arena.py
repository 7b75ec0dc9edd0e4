"""The KV arena (worker/kv_arena.py): slots allocated once per model and reused without stale rows."""

from __future__ import annotations

import numpy as np
import pytest

from seqshare.worker.chat import chat_ids
from seqshare.worker.decode_loop import DecodeLoop, Sequence
from seqshare.worker.generate import generate
from seqshare.worker.model import Model
from seqshare.worker.params import SamplingParams


def test_a_reused_slot_gives_the_logits_of_a_fresh_kv(q4_model: Model) -> None:
    """A slot that held a longer sequence at another tile phase, reset for a new one, computes
    exactly what a never-used KV computes: rows of its last user are never read."""
    m = q4_model
    prefix_ids = np.asarray(m.encode("A short shared document about salt and amber. " * 3), np.int32)
    assert len(prefix_ids) % 32 != 0  # the second use starts at another phase than the first
    prefix = m.new_kv(len(prefix_ids))
    m.prefill(prefix_ids, prefix, want_logits=False)
    first = np.asarray(m.encode(" An unrelated and rather longer question about wool, trade and towns?"), np.int32)
    q = np.asarray(m.encode(" What is traded?", add_special_tokens=False), np.int32)
    slot = m.arena.take(len(first) + 8, start=0)
    m.prefill(first, slot)
    m.arena.give(slot)
    again = m.arena.take(len(q) + 8, start=len(prefix_ids))
    assert again is slot and again.length == 0 and again.phase == len(prefix_ids) % 32
    reused = m.prefill(q, again, prefix=prefix)
    fresh = m.prefill(q, m.new_kv(len(q) + 8, start=len(prefix_ids)), prefix=prefix)
    np.testing.assert_array_equal(reused, fresh)
    m.arena.give(again)


def test_sequences_take_slots_and_give_them_back(q4_model: Model) -> None:
    arena = q4_model.arena
    slots = arena.free
    assert arena.rows == q4_model.seq_length  # no bundle limits: the whole context per slot
    ids = chat_ids(q4_model, "Name three primary colors.")
    before = generate(q4_model, ids, SamplingParams(max_new_tokens=6)).token_ids
    assert arena.free == slots
    assert generate(q4_model, ids, SamplingParams(max_new_tokens=6)).token_ids == before
    big = arena.take(arena.rows + 1, start=0)  # beyond a slot: a KV of its own, never kept
    arena.give(big)
    assert arena.free == slots


def test_a_stop_raised_mid_answer_returns_the_slots(q4_model: Model) -> None:
    arena = q4_model.arena
    slots = arena.free
    ids = np.asarray(chat_ids(q4_model, "Count to ten."), np.int32)
    seqs = [Sequence((0, i), ids, ids, SamplingParams(max_new_tokens=20)) for i in range(3)]

    def stop(s: Sequence) -> None:
        if s.answer is not None and len(s.answer.token_ids) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        DecodeLoop(q4_model, max_batch=3).run(seqs, lambda s: None, stop)
    assert arena.free == slots and all(s.kv is None for s in seqs)
