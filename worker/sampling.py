"""Next-token choice: greedy, sample (temperature, top-k, top-p, min-p) and the seed's penalty_sample.

Each sampled mode is two steps: a `*_distribution` function that returns the admissible token ids
and their probabilities (the part tests compare with a reference), then one draw from it with a
numpy Generator owned by the sequence and seeded from `SamplingParams.seed`, so a seeded run is
reproducible token for token.

penalty_sample follows the seed demo: repetition penalty over the last `repeat_last_n` tokens of
question + answer (context tokens are never in that history), then the 50 largest logits, then the
temperature, then top-p that keeps the tokens whose cumulative probability is still below top_p and
never fewer than 5, then a draw. The window is recomputed from the history at every step, so a short
question never shrinks it for later ones (the seed clamped it once, for the whole process).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from seqshare.worker.params import SamplingParams

PENALTY_TOP_K = 50
PENALTY_MIN_KEEP = 5

Distribution = tuple[np.ndarray, np.ndarray]  # (token ids, probabilities summing to 1), admissible only


def greedy(logits: np.ndarray) -> int:
    """The most likely token (the lowest id on a tie)."""
    return int(np.argmax(logits))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, token ids) of the k largest logits, largest first (all tokens when k is 0)."""
    idx = np.argpartition(-logits, k - 1)[:k] if 0 < k < logits.size else np.arange(logits.size)
    order = np.argsort(-logits[idx], kind="stable")
    return logits[idx][order], idx[order]


def _admissible(ids: np.ndarray, probs: np.ndarray) -> Distribution:
    keep = probs > 0
    p = probs[keep]
    return ids[keep], p / p.sum()


def draw(dist: Distribution, rng: np.random.Generator) -> int:
    """One token from a distribution by inverse CDF (one uniform number per draw)."""
    ids, probs = dist
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(i, ids.size - 1)])


def sample_distribution(
    logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> Distribution:
    """Temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass reaches
    top_p), then min-p (drop tokens below min_p times the most likely one's probability)."""
    vals, ids = _top_k(np.asarray(logits, dtype=np.float64) / temperature, top_k)
    probs = _softmax(vals)
    if top_p < 1.0:
        before = np.cumsum(probs) - probs  # mass of the more likely tokens
        probs = np.where(before < top_p, probs, 0.0)
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs[0], probs, 0.0)
    return _admissible(ids, probs)


def sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> int:
    return draw(sample_distribution(logits, temperature, top_k, top_p, min_p), rng)


def penalty_window(history: Sequence[int] | np.ndarray, repeat_last_n: int) -> np.ndarray:
    """The tokens the repetition penalty sees: the last `repeat_last_n` of `history` (all of it when
    shorter, none when repeat_last_n is 0)."""
    h = np.asarray(history, dtype=np.int64).reshape(-1)
    return h[max(h.size - repeat_last_n, 0) :] if repeat_last_n > 0 else h[:0]


def apply_repeat_penalty(logits: np.ndarray, recent: Iterable[int], penalty: float) -> np.ndarray:
    """A copy of logits with each recent token made less likely: positive logits divided by the
    penalty, negative ones multiplied (each token once, however often it occurred)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = np.unique(np.fromiter(recent, dtype=np.int64))
    if ids.size and penalty != 1.0:
        v = out[ids]
        out[ids] = np.where(v < 0, v * penalty, v / penalty)
    return out


def penalty_distribution(
    logits: np.ndarray, recent: Iterable[int], repeat_penalty: float = 1.2, temperature: float = 1.0,
    top_p: float = 1.0,
) -> Distribution:
    penalised = apply_repeat_penalty(logits, recent, repeat_penalty)
    vals, ids = _top_k(penalised.astype(np.float64), PENALTY_TOP_K)
    vals = vals / temperature
    # top_p = 1 keeps all 50: the seed's float32 cumulative sum kept or dropped the last by rounding
    keep = np.cumsum(_softmax(vals)) < top_p if top_p < 1.0 else np.ones(vals.size, dtype=bool)
    keep[:PENALTY_MIN_KEEP] = True
    return _admissible(ids, _softmax(np.where(keep, vals, -np.inf)))


def penalty_sample(
    logits: np.ndarray,
    rng: np.random.Generator,
    recent: Iterable[int],
    repeat_penalty: float = 1.2,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> int:
    return draw(penalty_distribution(logits, recent, repeat_penalty, temperature, top_p), rng)


class Sampler:
    """Chooses the tokens of one sequence. `history` passed to `pick` is question + answer so far
    (never the context); the penalty window is cut from it at every step."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def distribution(self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> Distribution:
        p = self.params
        if p.mode == "greedy":
            return np.array([greedy(logits)]), np.ones(1)
        if p.mode == "sample":
            return sample_distribution(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        recent = penalty_window(history, p.repeat_last_n)
        return penalty_distribution(logits, recent.tolist(), p.repeat_penalty, p.temperature, p.top_p)

    def pick(self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> int:
        if self.params.mode == "greedy":
            return greedy(logits)  # no draw: the generator's stream stays untouched
        return draw(self.distribution(logits, history), self.rng)
