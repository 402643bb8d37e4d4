"""Expert cache policies: pure Python over ExpertId = (layer, expert), no torch.

A policy only ranks what is cached; `ExpertCache` (cache/state.py) owns the
membership and asks the policy for a victim. Every policy sees the same
events, so they can be swapped, unit-tested and replayed on recorded traces:

    access(key)            the key was requested (hit or miss) at the current step
    observe(layer, probs)  the router's probability per expert of that layer for this step
    insert(key) / remove(key)
    victim(candidates)     which of `candidates` (cached, not in use) to evict
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

ExpertId = tuple[int, int]


class Policy:
    name = "base"
    observes = False  # whether `observe` is used: the engine reads the router probabilities back only then

    def access(self, key: ExpertId) -> None:
        pass

    def observe(self, layer: int, probs: Sequence[float]) -> None:
        pass

    def insert(self, key: ExpertId) -> None:
        pass

    def remove(self, key: ExpertId) -> None:
        pass

    def victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        raise NotImplementedError


class LRU(Policy):
    """Evict the least recently requested expert (mixtral-offloading's policy)."""

    name = "lru"

    def __init__(self):
        self.order: OrderedDict[ExpertId, None] = OrderedDict()  # oldest first

    def access(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def insert(self, key):
        self.access(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, candidates):
        allowed = set(candidates)
        return next(k for k in self.order if k in allowed)


class LFU(Policy):
    """Evict the least frequently requested expert; counts decay by `decay` per
    access so that old popularity fades (0 < decay <= 1; 1 = plain LFU).
    Ties go to the least recently requested.

    The decay clock is per layer: an expert's count fades with the accesses of
    its own layer only, so a layer's choices (and hit rate) do not depend on how
    many other layers share the trace or the run."""

    name = "lfu"

    def __init__(self, decay: float = 0.99):
        if not 0 < decay <= 1:
            raise ValueError("decay must be in (0, 1]")
        self.decay = decay
        self.clock: dict[int, int] = {}  # layer -> accesses of that layer so far
        self.count: dict[ExpertId, float] = {}
        self.stamp: dict[ExpertId, int] = {}  # its layer's clock at the last update of count
        self.tick = 0  # accesses of all layers: recency, for ties only
        self.last: dict[ExpertId, int] = {}  # tick of the last access

    def _current(self, key) -> float:
        clock = self.clock.get(key[0], 0)
        return self.count.get(key, 0.0) * self.decay ** (clock - self.stamp.get(key, clock))

    def access(self, key):
        clock = self.clock[key[0]] = self.clock.get(key[0], 0) + 1
        self.count[key] = self._current(key) + 1.0  # _current reads the new clock: the old count decays once
        self.stamp[key] = clock
        self.tick += 1
        self.last[key] = self.tick

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self._current(k), self.last.get(k, -1)))


class Score(Policy):
    """HybriMoE's score-based cache: each expert of a layer keeps
    S = a * p + (1 - a) * S, updated from the router probability p it got at
    every step of its layer (0 when outside the top-p mass); evict the lowest S."""

    name = "score"
    observes = True

    def __init__(self, alpha: float = 0.3, top_p: float = 0.9):
        self.alpha, self.top_p = alpha, top_p
        self.score: dict[ExpertId, float] = {}
        self.stamp: dict[ExpertId, int] = {}
        self.clock = 0

    def observe(self, layer, probs):
        # Keep the smallest set of experts whose mass reaches top_p (at least one).
        order = sorted(range(len(probs)), key=lambda e: -probs[e])
        kept, mass = set(), 0.0
        for e in order:
            kept.add(e)
            mass += probs[e]
            if mass >= self.top_p:
                break
        a = self.alpha
        for e, p in enumerate(probs):
            key = (layer, e)
            self.score[key] = a * (p if e in kept else 0.0) + (1 - a) * self.score.get(key, 0.0)

    def access(self, key):
        self.clock += 1
        self.stamp[key] = self.clock

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.score.get(k, 0.0), self.stamp.get(k, -1)))


class Belady(Policy):
    """Belady's optimal (MIN) policy, for offline evaluation only: it is given
    the whole future request sequence and evicts the expert requested furthest
    in the future. `access` must be called for exactly that sequence, in order."""

    name = "belady"

    def __init__(self, future: Sequence[ExpertId]):
        self.future = list(future)
        self.position = 0
        self.next_use: dict[ExpertId, list[int]] = {}
        for i in reversed(range(len(self.future))):
            self.next_use.setdefault(self.future[i], []).append(i)  # stacks: nearest use last

    def access(self, key):
        if self.position >= len(self.future) or self.future[self.position] != key:
            raise ValueError(f"Belady was told the future differently: expected {self.future[self.position:][:1]}, got {key}")
        self.next_use[key].pop()
        self.position += 1

    def victim(self, candidates):
        def distance(k):
            uses = self.next_use.get(k)
            return uses[-1] if uses else float("inf")

        return max(candidates, key=distance)


POLICIES = {"lru": LRU, "lfu": LFU, "score": Score}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
