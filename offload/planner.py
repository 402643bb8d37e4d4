"""The offloaded engine's decisions for one layer step, in pure Python (no torch, no threads):
which requested experts are present, which are missing, which of those the CPU computes, which
slot each fetch takes and whom it evicts, and where a prefetch may go. The mover
(offload/engine.py) carries them out with the reader, the copy stream and the kernels, and tells
the plan what finished; everything here can be driven and checked on the CPU from a script.

  plan = LayerPlan(layer, experts, cache, host)     # accesses recorded, present / missing split
  plan.assign_cpu(decide, counts)                    # missing experts the CPU should compute...
  plan.claim_cpu(expert) -> (host slot, from disk)   # ...each as long as host slots allow
  plan.admit(prefetching)  -> [Fetch]                # fetches that can start now, in order
  plan.computed(expert)                              # its slot may now be evicted
  plan.prefetch(key, prefetching) -> Fetch | None    # speculative, never over a needed expert

`HostTier` owns the pinned host slots' claims (a slot being filled, copied from or computed
from is never handed out twice): one record per claim, released by the mover.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from .cache.state import ExpertCache

Key = tuple[int, int]  # (decoder layer, expert)


@dataclass(frozen=True)
class Claim:
    """What one submitted read, copy or CPU expert holds until the main thread has seen it through:
    the compute slot's key it fills (or None), and the host slot it uses (or None)."""

    key: Key | None
    host_key: Key | None
    host_slot: int | None


class HostTier:
    """The pinned host tier between disk and the compute slots: its cache and the slots in use."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self.busy: set[int] = set()  # host slots claimed by a read, copy or CPU expert not yet seen through

    def busy_keys(self) -> set[Key]:
        return {self.cache.key_at(s) for s in self.busy} - {None}

    def room(self, key: Key) -> bool:
        """Whether `key` has, or can get, a host slot now."""
        return key in self.cache or self.cache.can_admit(key, self.busy_keys())

    def claim(self, key: Key) -> tuple[int, bool]:
        """The expert's host slot, admitting it (to be read from disk: the bool) if absent; claimed."""
        self.cache.policy.access(key)
        slot = self.cache.lookup(key)
        from_disk = slot is None
        if from_disk:
            slot, _ = self.cache.admit(key, self.busy_keys())
        self.busy.add(slot)
        return slot, from_disk

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.busy.discard(slot)


class LayerPlan:
    """One layer step's decisions over the compute tier `cache` (and the host tier, if any)."""

    def __init__(self, layer: int, experts: Iterable[int], cache: ExpertCache, host: HostTier | None = None,
                 probs: list[float] | None = None):
        self.layer, self.cache, self.host = layer, cache, host
        self.present, self.missing = cache.request(layer, experts, probs)
        self.needed: set[Key] = {(layer, e) for e in self.present + self.missing}  # not yet computed
        self.pending: deque[int] = deque(self.missing)  # missing experts with no slot yet
        self.on_cpu: list[int] = []
        # Every key this step put into a cache, and whether its host slot is to be read from disk: if
        # the step dies before the mover starts the read (Ctrl-C between the two), the caches must
        # forget it, or a later step would compute with the slot's previous expert.
        self.placed: list[tuple[Key, bool, bool]] = []  # (key, in the compute tier, host slot read from disk)

    def assign_cpu(self, decide: Callable[[list], dict], counts: list[int]) -> list[int]:
        """Missing experts that `decide` (a profile's scheduler: [ExpertWork] -> {expert: "cpu" |
        "fetch"}) sends to the CPU. `counts[e]`: the tokens routed to expert e in this step.
        Each then starts with `claim_cpu`, as long as host slots allow; the rest are fetched."""
        from .scheduler import ExpertWork

        if not self.missing or self.host is None:
            return []
        work = [ExpertWork(e, counts[e], "host" if (self.layer, e) in self.host.cache else "disk")
                for e in self.missing]
        choice = decide(work)
        return [e for e in self.missing if choice.get(e) == "cpu"]

    def claim_cpu(self, expert: int) -> tuple[int, bool] | None:
        """The host slot (and whether to read it from disk first) for computing `expert` on the CPU,
        or None when no host slot can be had now: then it stays among the experts to fetch."""
        key = (self.layer, expert)
        if not self.host.room(key):
            return None
        self.pending.remove(expert)
        self.on_cpu.append(expert)
        slot, from_disk = self.host.claim(key)
        self.placed.append((key, False, from_disk))
        return slot, from_disk

    def busy(self, prefetching: Iterable[Key]) -> set[Key]:
        """What no admission may evict now: experts this step still needs, slots a prefetch writes."""
        return self.needed | set(prefetching)

    def admit(self, prefetching: Iterable[Key] = ()) -> list["Fetch"]:
        """Fetches that can start now, in order, each admitted to the compute tier (and its host slot
        claimed, with a host tier)."""
        out = []
        busy = self.busy(prefetching)
        while self.pending:
            key = (self.layer, self.pending[0])
            if not self.cache.can_admit(key, busy) or (self.host is not None and not self.host.room(key)):
                break
            self.pending.popleft()
            out.append(self._place(key, busy))
        return out

    def computed(self, expert: int) -> None:
        self.needed.discard((self.layer, expert))

    def prefetch(self, key: Key, prefetching: Iterable[Key]) -> "Fetch | None":
        """A speculative fetch of `key` (None: no slot can be freed without evicting what this step or
        another prefetch still needs, or no host slot is free)."""
        busy = self.busy(prefetching)
        if key in self.cache or not self.cache.can_admit(key, busy) or (self.host is not None
                                                                        and not self.host.room(key)):
            return None
        return self._place(key, busy)

    def _place(self, key: Key, busy: set[Key]) -> "Fetch":
        slot, evicted = self.cache.admit(key, busy)
        host_slot, from_disk = self.host.claim(key) if self.host is not None else (None, True)
        self.placed.append((key, True, from_disk))
        return Fetch(key, slot, evicted, host_slot, from_disk)


@dataclass(frozen=True)
class Fetch:
    """One fetch the plan decided: `key` into compute slot `slot` (evicting `evicted`), through host
    slot `host_slot` (claimed; None without a host tier), read from disk first when `from_disk`."""

    key: Key
    slot: int
    evicted: Key | None
    host_slot: int | None
    from_disk: bool
