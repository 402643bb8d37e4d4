"""Prefetch policy around a predictor: how many experts to fetch ahead, and
whether to fetch at all for a layer whose predictions have stopped paying.

At most `limit` experts per target layer and step are fetched ahead: the
speculative bytes per step are capped at limit x expert size per layer.

Per target layer it keeps the outcome of the last `window` prefetch
candidates (predicted experts that were not cached: requested or not). Below `threshold` precision the layer's prefetches stop
(the default 0.5: a wrong prefetch evicts an expert that may be needed, so
below about one right guess in two prefetching costs more misses than it saves);
predictions go on in the shadow, and prefetching resumes once their
precision is back above the threshold. Pure bookkeeping: the engine moves
the bytes.
"""

from __future__ import annotations

from collections import deque

from .predictors.base import Predictor, rank


class Prefetcher:
    def __init__(self, predictor: Predictor, top_k: int, limit: int, threshold: float = 0.5,
                 window: int = 64, min_samples: int = 16):
        self.predictor, self.top_k, self.limit = predictor, top_k, limit
        self.threshold, self.min_samples = threshold, min_samples
        self.window_size = window
        self.outcomes: dict[int, deque] = {}
        self.enabled: dict[int, bool] = {}
        self.predicted: dict[int, set[int]] = {}  # target -> uncached experts predicted for its next step
        self.waiting: dict[int, set[int]] = {}  # target -> experts actually fetched ahead for it

    def plan(self, pos: int, hidden, tokens, chosen) -> dict[int, list[int]]:
        """Predicted experts per target MoE position, best first (for every target; see `active`)."""
        scores = self.predictor.scores(pos, hidden if self.predictor.needs_hidden else None, tokens, chosen)
        self.predictor.observe(pos, tokens, chosen)
        return {target: rank(s, self.top_k, self.limit) for target, s in scores.items()}

    def active(self, target: int) -> bool:
        return self.enabled.setdefault(target, True)

    def candidates(self, target: int, experts: list[int]) -> None:
        """The predicted experts that were not cached: what a prefetch fetches (or, off, would have)."""
        self.predicted[target] = set(experts)

    def issued(self, target: int, expert: int) -> None:
        self.waiting.setdefault(target, set()).add(expert)

    def settle(self, pos: int, requested: set[int], present: set[int], counters) -> None:
        """At layer `pos`: score what was predicted and fetched for it."""
        fetched = self.waiting.pop(pos, set())
        counters.prefetch_used += len(fetched & requested & present)
        counters.prefetch_wasted += len(fetched - (requested & present))
        predicted = self.predicted.pop(pos, None)
        if not predicted:
            return
        window = self.outcomes.setdefault(pos, deque(maxlen=self.window_size))
        window.extend(e in requested for e in predicted)
        if len(window) >= self.min_samples:
            self.enabled[pos] = sum(window) / len(window) >= self.threshold

    def precision(self, pos: int) -> float | None:
        window = self.outcomes.get(pos)
        return sum(window) / len(window) if window else None
