"""The answer of one sequence: its tokens, its text, and the rules that end it.

An answer ends on an EOS token (not part of the answer), on a stop string (the text is cut before
it), or when its token budget is spent. The budget is min(max_new_tokens, seq_length - positions
used), so no answer runs past the model's `seq_length`.

Stop strings are found without decoding the whole answer at every token: the text grows by the
piece the newest tokens add (decoded from a short window that starts a token before the new ones,
so word-initial spaces come out as in a whole decode, and held back while it ends in an incomplete
UTF-8 sequence), and only the tail that can hold a new match is searched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from seqshare.worker.errors import LimitExceededError
from seqshare.worker.params import SamplingParams

STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_SEQ_LENGTH = "eos", "stop", "length", "seq_length"
FINISH_REASONS = (STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_SEQ_LENGTH)


def answer_budget(used: int, max_new_tokens: int, seq_length: int, what: str = "the prompt") -> tuple[int, bool]:
    """How many tokens may be generated after `used` positions, and whether seq_length (rather than
    max_new_tokens) is what caps it. A prompt that leaves no room is a named error."""
    room = seq_length - used
    if room < 1:
        raise LimitExceededError("seq_length", used + 1, seq_length, f"{what} plus one answer token")
    return min(max_new_tokens, room), room < max_new_tokens


@dataclass
class Answer:
    decode_text: Callable[[Sequence[int]], str]
    eos_ids: frozenset[int]
    stop: Sequence[str]
    budget: int
    budget_reason: str = STOP_LENGTH
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the final text once finished
    reason: str | None = None
    _seen: str = ""  # text of token_ids[:_read] (incremental; stop strings only)
    _prefix: int = 0  # window start: the token before the undecoded ones
    _read: int = 0  # tokens whose text is in _seen

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def push(self, token: int) -> bool:
        """Record the next token; True when the answer is complete (then `text` is set)."""
        if token in self.eos_ids:
            return self._finish(STOP_EOS)
        self.token_ids.append(int(token))
        if self.stop and self._stop_found():
            text = self.decode_text(self.token_ids)  # once: the cut is made on the whole decode
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
            return self._finish(STOP_STRING, text[:cut])
        if len(self.token_ids) >= self.budget:
            return self._finish(self.budget_reason)
        return False

    def _stop_found(self) -> bool:
        before = self.decode_text(self.token_ids[self._prefix : self._read])
        now = self.decode_text(self.token_ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False  # nothing printable yet (a partial UTF-8 character)
        added = now[len(before) :]
        tail_from = max(0, len(self._seen) - max(len(s) for s in self.stop) + 1)
        self._seen += added
        self._prefix, self._read = self._read, len(self.token_ids)
        return any(s in self._seen[tail_from:] for s in self.stop)

    def _finish(self, reason: str, text: str | None = None) -> bool:
        self.reason = reason
        self.text = self.decode_text(self.token_ids) if text is None else text
        return True


def new_answer(decode_text: Callable[[Sequence[int]], str], eos_ids: Sequence[int], params: SamplingParams,
               used: int, seq_length: int, what: str = "the prompt") -> Answer:
    """An empty answer for a sequence that has used `used` positions (prefix and prompt)."""
    budget, capped = answer_budget(used, params.max_new_tokens, seq_length, what)
    reason = STOP_SEQ_LENGTH if capped else STOP_LENGTH
    return Answer(decode_text, frozenset(int(t) for t in eos_ids), list(params.stop), budget, reason)
