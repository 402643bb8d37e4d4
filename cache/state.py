"""Which expert sits in which slot of one tier, in pure Python (no torch).

`ExpertCache` owns membership and slot numbers; its `Policy` only picks
victims. Slots are split per layer (each sparse layer owns an equal share)
or shared globally by all layers. Keys that the current step still needs
are passed as `busy` and are never evicted.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

from .policy import ExpertId, Policy

Split = Literal["layer", "global"]


class ExpertCache:
    def __init__(self, num_slots: int, policy: Policy, layers: Sequence[int], split: Split = "layer"):
        if split not in ("layer", "global"):
            raise ValueError("split must be 'layer' or 'global'")
        self.policy, self.split = policy, split
        self.num_slots = num_slots
        self.slot_of: dict[ExpertId, int] = {}
        self.key_of: dict[int, ExpertId] = {}  # the reverse map
        if split == "layer":
            share = num_slots // len(layers)
            self.free = {layer: list(range(i * share, (i + 1) * share))[::-1] for i, layer in enumerate(layers)}
            self.capacity = {layer: share for layer in layers}
        else:
            self.free = {None: list(range(num_slots))[::-1]}
            self.capacity = {None: num_slots}
        self.members: dict[object, set[ExpertId]] = {group: set() for group in self.free}

    def _group(self, key: ExpertId):
        return key[0] if self.split == "layer" else None

    def capacity_for(self, layer: int) -> int:
        return self.capacity[layer if self.split == "layer" else None]

    def lookup(self, key: ExpertId) -> int | None:
        return self.slot_of.get(key)

    def __contains__(self, key: ExpertId) -> bool:
        return key in self.slot_of

    def can_admit(self, key: ExpertId, busy: Iterable[ExpertId]) -> bool:
        group = self._group(key)
        if self.free[group]:
            return True
        members = self.members[group]
        # O(busy), not O(members): a global pool may hold thousands of experts.
        return len(members) > sum(1 for k in set(busy) if k in members)

    def key_at(self, slot: int) -> ExpertId | None:
        return self.key_of.get(slot)

    def admit(self, key: ExpertId, busy: Iterable[ExpertId] = ()) -> tuple[int, ExpertId | None]:
        """Give `key` a slot, evicting the policy's victim among non-busy members if full.

        Returns (slot, evicted key or None)."""
        if key in self.slot_of:
            raise ValueError(f"{key} is already cached")
        group = self._group(key)
        evicted = None
        if not self.free[group]:
            candidates = self.members[group] - set(busy)
            if not candidates:
                raise RuntimeError(f"no slot can be freed for {key}: every cached expert is in use")
            evicted = self.policy.victim(candidates)
            self.evict(evicted)
        slot = self.free[group].pop()
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.members[group].add(key)
        self.policy.insert(key)
        return slot, evicted

    def request(self, layer: int, experts: Iterable[int], probs: Sequence[float] | None = None
                ) -> tuple[list[int], list[int]]:
        """One layer step asks for `experts`: the policy sees the router's probabilities (when given)
        and each access; returns (present, missing). The one access step of the engine, `replay`,
        the predictor evaluation and the simulator."""
        if probs is not None:
            self.policy.observe(layer, probs)
        experts = list(experts)
        for e in experts:
            self.policy.access((layer, e))
        present = [e for e in experts if (layer, e) in self.slot_of]
        return present, [e for e in experts if (layer, e) not in self.slot_of]

    def evict(self, key: ExpertId) -> None:
        slot = self.slot_of.pop(key)
        del self.key_of[slot]
        group = self._group(key)
        self.members[group].discard(key)
        self.free[group].append(slot)
        self.policy.remove(key)


def replay(steps: Iterable[tuple[int, Sequence[int], Sequence[float] | None]], cache: ExpertCache) -> tuple[int, int]:
    """Run a routing trace through `cache`: each step is (layer, experts needed,
    router probabilities or None). Returns (hits, misses)."""
    hits = misses = 0
    for layer, experts, probs in steps:
        present, missing = cache.request(layer, experts, probs)
        hits, misses = hits + len(present), misses + len(missing)
        keys = [(layer, e) for e in experts]
        for e in missing:
            cache.admit((layer, e), busy=keys)
    return hits, misses
