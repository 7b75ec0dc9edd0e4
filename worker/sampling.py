"""Next-token choice: greedy, sample (temperature, top-k, top-p, min-p) and the seed's penalty_sample.

Every sampled mode draws from a numpy Generator owned by one sequence and seeded from
`SamplingParams.seed`, so a seeded run is reproducible token for token.

penalty_sample follows the seed demo: repetition penalty over the last `repeat_last_n` tokens of
question + answer (context tokens are never in that window), then the 50 largest logits, then the
temperature, then top-p that keeps the tokens whose cumulative probability is still below top_p and
never fewer than 5, then a draw.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from .params import SamplingParams

PENALTY_TOP_K = 50
PENALTY_MIN_KEEP = 5


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def apply_repeat_penalty(logits: np.ndarray, recent: Iterable[int], penalty: float) -> np.ndarray:
    """A copy of logits with each recent token made less likely: positive logits divided by the
    penalty, negative ones multiplied (each token once, however often it occurred)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = np.fromiter(set(recent), dtype=np.int64)
    if ids.size and penalty != 1.0:
        v = out[ids]
        out[ids] = np.where(v < 0, v * penalty, v / penalty)
    return out


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, token ids) of the k largest logits, largest first (all tokens when k is 0)."""
    if 0 < k < logits.size:
        idx = np.argpartition(-logits, k - 1)[:k]
    else:
        idx = np.arange(logits.size)
    order = np.argsort(-logits[idx], kind="stable")
    return logits[idx][order], idx[order]


def sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> int:
    """Temperature, then top-k, then top-p (smallest set reaching top_p), then min-p, then a draw."""
    vals, ids = _top_k(np.asarray(logits, dtype=np.float64) / temperature, top_k)
    probs = _softmax(vals)
    if top_p < 1.0:
        # keep a token while the probability mass before it is still short of top_p
        before = np.cumsum(probs) - probs
        keep = before < top_p
        probs = np.where(keep, probs, 0.0)
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
    probs = probs / probs.sum()
    return int(ids[rng.choice(probs.size, p=probs)])


def penalty_sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    recent: Iterable[int],
    repeat_penalty: float = 1.2,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> int:
    penalised = apply_repeat_penalty(logits, recent, repeat_penalty)
    vals, ids = _top_k(penalised.astype(np.float64), PENALTY_TOP_K)
    vals = vals / temperature
    cum = np.cumsum(_softmax(vals))
    keep = cum < top_p
    keep[:PENALTY_MIN_KEEP] = True
    probs = _softmax(np.where(keep, vals, -np.inf))
    return int(ids[rng.choice(probs.size, p=probs)])


class Sampler:
    """Chooses the tokens of one sequence. `history` are the question tokens the repetition penalty
    may see (never the context); generated tokens are added with `accept`."""

    def __init__(self, params: SamplingParams, history: Iterable[int] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(history, maxlen=max(params.repeat_last_n, 1))

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.mode == "greedy":
            return greedy(logits)
        if p.mode == "sample":
            return sample(logits, self.rng, p.temperature, p.top_k, p.top_p, p.min_p)
        recent = self.recent if p.repeat_last_n > 0 else ()
        return penalty_sample(logits, self.rng, recent, p.repeat_penalty, p.temperature, p.top_p)

    def accept(self, token: int) -> None:
        self.recent.append(int(token))
