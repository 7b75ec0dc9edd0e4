"""The stop rules of an answer (worker/answer.py) on a byte-level tokenizer: token i is byte i, so
a character can take several tokens, as with the byte-level BPE of real models."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from seqshare.worker.answer import STOP_EOS, STOP_LENGTH, STOP_SEQ_LENGTH, STOP_STRING, Answer, answer_budget
from seqshare.worker.errors import LimitExceededError

EOS = 256


def decode(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop: list[str], budget: int = 100) -> Answer:
    a = Answer(decode, frozenset({EOS}), stop, budget)
    for b in text.encode():
        if a.push(b):
            break
    return a


@pytest.mark.parametrize(
    ("text", "stop", "want"),
    [("Monday, Tuesday, Friday, Sunday", ["Friday"], "Monday, Tuesday, "),
     ("caf\u00e9! more", ["\u00e9!"], "caf"),  # a stop string whose first character is two tokens
     ("abcabd", ["abd", "bc"], "a"),  # the earliest match wins, whichever string
     ("x" * 50 + "STOP" + "y", ["STOP"], "x" * 50)],
)
def test_stop_string_cuts_before_the_first_match(text: str, stop: list[str], want: str) -> None:
    a = feed(text, stop)
    assert a.reason == STOP_STRING and a.text == want
    assert decode(a.token_ids).startswith(want) and stop_in(decode(a.token_ids), stop)
    assert not stop_in(decode(a.token_ids[:-1]), stop)  # it stopped at the token that completed it


def stop_in(text: str, stop: list[str]) -> bool:
    return any(s in text for s in stop)


def test_no_match_runs_to_the_budget_and_eos_is_not_part_of_the_answer() -> None:
    a = feed("\u00e9t\u00e9 sans fin", ["zzz"], budget=5)
    assert a.reason == STOP_LENGTH and len(a.token_ids) == 5
    b = Answer(decode, frozenset({EOS}), [], 10)
    assert not b.push(ord("h")) and b.push(EOS)
    assert b.reason == STOP_EOS and b.token_ids == [ord("h")] and b.text == "h"


def test_budget_is_capped_by_seq_length() -> None:
    assert answer_budget(30, 1000, 40) == (10, True)
    assert answer_budget(30, 5, 40) == (5, False)
    with pytest.raises(LimitExceededError, match="seq_length"):
        answer_budget(40, 5, 40)
    a = Answer(decode, frozenset({EOS}), [], 2, STOP_SEQ_LENGTH)
    assert not a.push(ord("a")) and a.push(ord("b")) and a.reason == STOP_SEQ_LENGTH
