"""From a predictor's scores to probabilities: P(the expert is chosen at the
target layer), what a cost-aware prefetch (offload/prefetch.py) weighs
against the link time a wrong fetch wastes.

Scores are only ranks: affinity sums conditional probabilities, gate gives
a router softmax, routing a logistic regression. `Calibration` maps each
score, as a share of its row (rescaled to sum to top_k, the number of experts
a token does choose), monotonically onto the rate at which experts scored
like it were chosen: isotonic regression (pool adjacent violators) over
quantile bins. `calibrated_scores` fits it on data the predictor did not see:
the predictor fitted on the first half of the training split, calibrated on
the second, then refitted on the whole split to score the test trace.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class Probabilities(dict):
    """{pos: {target: P [T, E]}}: a predictor's scores, calibrated. The simulator prefetches
    from these by expected gain; from a plain dict of scores it fetches the top-k."""


class Calibration:
    def __init__(self, points: np.ndarray, rates: np.ndarray, top_k: int):
        self.points, self.rates, self.top_k = points, rates, top_k  # rising score shares -> rising rates

    @staticmethod
    def shares(scores: np.ndarray, top_k: int) -> np.ndarray:
        """[N, E] -> each score's share of its row, rescaled to sum to top_k (shifted up first if negative)."""
        s = scores - np.minimum(scores.min(axis=1, keepdims=True), 0.0)
        return top_k * s / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)

    @classmethod
    def fit(cls, scores: dict, trace, bins: int = 40, min_bin: int = 30) -> "Calibration":
        """From a predictor's scores on `trace` ({pos: {target: [T, E]}}) and what the trace chose."""
        xs, ys = [], []
        for targets in scores.values():
            for target, s in targets.items():
                chosen = np.zeros(s.shape, dtype=bool)
                np.put_along_axis(chosen, trace.topk_ids[:, target], True, axis=1)
                xs.append(cls.shares(s, trace.top_k).reshape(-1))
                ys.append(chosen.reshape(-1))
        if not xs:
            return cls(np.array([0.0, trace.top_k]), np.array([0.0, 1.0]), trace.top_k)
        x, y = np.concatenate(xs), np.concatenate(ys).astype(np.float64)
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        count = int(np.clip(len(x) // min_bin, 1, bins))
        edges = np.unique(np.quantile(np.arange(len(x)), np.linspace(0, 1, count + 1)).astype(int))
        groups = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        points = np.array([x[a:b].mean() for a, b in groups])
        rates = _isotonic(np.array([y[a:b].mean() for a, b in groups]), np.array([b - a for a, b in groups]))
        return cls(points, rates, trace.top_k)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """[N, E] (or [E]) scores -> probabilities. Strictly rising in the share, so a row's ranking stays."""
        flat = scores.ndim == 1
        x = self.shares(scores[None] if flat else scores, self.top_k)
        p = np.clip(np.interp(x, self.points, self.rates) + 1e-6 * x / self.top_k, 0.0, 1.0)
        return p[0] if flat else p


def _isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence nearest `values` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values.tolist(), weights.tolist()):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(n, v) for v, _, n in blocks])


def calibrated_scores(make: Callable, fit, test, fraction: float = 0.5) -> Probabilities:
    """`make(trace) -> Predictor` (fitted on that trace, where it learns). Calibrated out of sample
    on `fit`, then refitted on all of `fit`; returns its probabilities on `test`. A predictor whose
    scores already are probabilities fitted out of sample (`Predictor.calibrated`) is taken as it is."""
    predictor = make(fit)
    if predictor.calibrated:
        return Probabilities(predictor.replay(test))
    first, second = fit.split(fraction)
    calibration = Calibration.fit(make(first).replay(second), second)
    scores = predictor.replay(test)
    return Probabilities({pos: {target: calibration(s) for target, s in targets.items()}
                          for pos, targets in scores.items()})
