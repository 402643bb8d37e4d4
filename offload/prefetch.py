"""Prefetch policy around a predictor: how many experts to fetch ahead, and
whether to fetch at all for a layer whose predictions have stopped paying.

Per target layer it keeps the outcome of the last `window` predicted experts
(requested or not). Below `threshold` precision the layer's prefetches stop;
predictions go on in the shadow, and prefetching resumes once their
precision is back above the threshold. Pure bookkeeping: the engine moves
the bytes.
"""

from __future__ import annotations

from collections import deque

from .predictors.base import Predictor, rank


class Prefetcher:
    def __init__(self, predictor: Predictor, top_k: int, limit: int, threshold: float = 0.3,
                 window: int = 64, min_samples: int = 16):
        self.predictor, self.top_k, self.limit = predictor, top_k, limit
        self.threshold, self.min_samples = threshold, min_samples
        self.window_size = window
        self.outcomes: dict[int, deque] = {}
        self.enabled: dict[int, bool] = {}
        self.predicted: dict[int, set[int]] = {}  # target -> experts predicted for its next step
        self.waiting: dict[int, set[int]] = {}  # target -> experts actually fetched ahead for it

    def plan(self, pos: int, hidden, tokens, chosen) -> dict[int, list[int]]:
        """Experts to fetch ahead, per target MoE position (only for enabled targets)."""
        scores = self.predictor.scores(pos, hidden if self.predictor.needs_hidden else None, tokens, chosen)
        self.predictor.observe(pos, tokens, chosen)
        out = {}
        for target, s in scores.items():
            wanted = rank(s, self.top_k, self.limit)
            self.predicted[target] = set(wanted)
            if self.enabled.setdefault(target, True):
                out[target] = wanted
        return out

    def issued(self, target: int, expert: int) -> None:
        self.waiting.setdefault(target, set()).add(expert)

    def settle(self, pos: int, requested: set[int], present: set[int], counters) -> None:
        """At layer `pos`: score what was predicted and fetched for it."""
        fetched = self.waiting.pop(pos, set())
        counters.prefetch_used += len(fetched & requested & present)
        counters.prefetch_wasted += len(fetched - (requested & present))
        predicted = self.predicted.pop(pos, None)
        if predicted is None:
            return
        window = self.outcomes.setdefault(pos, deque(maxlen=self.window_size))
        window.extend(e in requested for e in predicted)
        if len(window) >= self.min_samples:
            self.enabled[pos] = sum(window) / len(window) >= self.threshold

    def precision(self, pos: int) -> float | None:
        window = self.outcomes.get(pos)
        return sum(window) / len(window) if window else None
