"""Generation for one prompt: the decode loop (worker/decode_loop.py) with one sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from seqshare.worker.decode_loop import DecodeLoop
from seqshare.worker.decode_loop import Sequence as Seq
from seqshare.worker.params import SamplingParams

if TYPE_CHECKING:
    from seqshare.worker.debug_dump import DumpWriter
    from seqshare.worker.model import Model, Progress


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    stop_reason: str
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "stop_reason": self.stop_reason,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    penalty_history: Sequence[int] | None = None,
    dump: DumpWriter | None = None,
    progress: Progress | None = None,
) -> Generation:
    """Answer one prompt. The repetition penalty sees `penalty_history` (default: the whole prompt,
    which for a plain prompt is all question) plus the answer so far."""
    ids = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
    question = ids if penalty_history is None else np.asarray(penalty_history, dtype=np.int32).reshape(-1)
    seq = Seq((0, 0), ids, question, params, dump=dump, progress=progress)
    loop = DecodeLoop(model, max_batch=1)
    done: list[Seq] = []
    loop.run([seq], done.append)
    answer = done[0].answer
    assert answer is not None and answer.reason is not None
    return Generation(answer.token_ids, answer.text, int(ids.size), answer.reason,
                      seq.t_first - seq.t_start, seq.t_end - seq.t_first, loop.steps)
