"""The offloaded expert executor: routed experts stream from disk (and, with
a GPU, through a pinned host tier) into a fixed pool of compute-side slots.

Per layer step, for the experts the router picked:
  1. record the requests with the cache policy; split them into present and missing;
  2. start fetching missing experts into free (or evicted) slots on the I/O
     thread pool, as many as the slots allow without evicting anything this
     step still needs;
  3. compute the present experts while those fetches run, then each fetched
     expert in arrival order, starting new fetches as slots free up;
  4. add the contributions in ascending expert order (bit-identical to the
     resident model, whatever order they were computed in).

On a CPU the compute slots are the RAM cache and a fetch is a disk read. On a
GPU a fetch is a disk read into the pinned host tier when the expert is not
there, then a copy on `copy_stream`; events order the copy after the last
kernel that used the slot, and the kernels after the copy.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .cache.policy import make_policy
from .cache.state import ExpertCache
from .cache.store import ExpertReader, SlotPool
from .experts import ACT, accumulate, contribution
from .placement import Placement
from .stats import ExpertStats


class OffloadedExperts:
    def __init__(self, checkpoint, placement: Placement, device: torch.device, dtype: torch.dtype,
                 policy: str, split: str, stats: ExpertStats, io_threads: int = 4):
        cfg = checkpoint.config
        self.layers = [i for i, sparse in enumerate(cfg.sparse_layers) if sparse]
        self.device, self.act, self.stats = device, ACT[cfg.hidden_act], stats
        self.expert_bytes = placement.expert_bytes
        shape = (cfg.hidden_size, cfg.moe_intermediate_size)
        self.reader = ExpertReader(checkpoint.expert_extents, checkpoint.shard_files())
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="offload-io")
        # The compute-side tier: GPU slots, or on a CPU the RAM cache itself.
        self.pool = SlotPool(placement.device_slots, *shape, device, dtype)
        self.cache = ExpertCache(placement.device_slots, make_policy(policy), self.layers, split)
        self.gpu = device.type == "cuda"
        if self.gpu:
            self.host_pool = SlotPool(placement.host_slots, *shape, torch.device("cpu"), dtype, pin=True)
            self.host_cache = ExpertCache(placement.host_slots, make_policy(policy), self.layers, split)
            self.host_busy: set = set()  # host slots being filled or copied from
            self.copy_stream = torch.cuda.Stream(device)
            # Per GPU slot: recorded on the compute stream after the last kernel that read it.
            self.slot_released: list[torch.cuda.Event | None] = [None] * placement.device_slots
            # Per host slot: recorded on the copy stream after the last copy out of it.
            self.host_copied: list[torch.cuda.Event | None] = [None] * placement.host_slots

    # ---- one layer step --------------------------------------------------

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        experts = torch.unique(ids).tolist()
        counters = self.stats[layer]
        if probs is not None:
            self.cache.policy.observe(layer, probs.mean(dim=0).tolist())
        keys = [(layer, e) for e in experts]
        for key in keys:
            self.cache.policy.access(key)
        present = [e for e in experts if (layer, e) in self.cache]
        pending = deque(e for e in experts if (layer, e) not in self.cache)
        counters.hits += len(present)
        counters.misses += len(pending)
        busy = set(keys)  # nothing this step still needs may be evicted
        inflight: deque[tuple[int, int, Future]] = deque()

        def issue():
            while pending and self.cache.can_admit((layer, pending[0]), busy):
                e = pending.popleft()
                slot, _ = self.cache.admit((layer, e), busy)
                inflight.append((e, slot, self._fetch(layer, e, slot)))

        parts = {}
        issue()
        for e in present:
            parts[e] = self._compute(hidden, ids, weights, e, self.cache.lookup((layer, e)))
            busy.discard((layer, e))
            issue()
        while inflight:
            e, slot, future = inflight.popleft()
            start = time.perf_counter()
            ready = future.result()  # the only place compute waits for the I/O threads
            counters.stall_seconds += time.perf_counter() - start
            if self.gpu:
                torch.cuda.current_stream(self.device).wait_event(ready)  # kernels after the copy
            parts[e] = self._compute(hidden, ids, weights, e, slot)
            busy.discard((layer, e))
            issue()
        return accumulate(hidden, parts)

    def _compute(self, hidden, ids, weights, expert: int, slot: int):
        part = contribution(hidden, ids, weights, expert, *self.pool[slot], self.act)
        if self.gpu:
            # The next copy into this slot must wait for the kernels just queued.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.slot_released[slot] = event
        return part

    # ---- fetching ----------------------------------------------------------

    def _fetch(self, layer: int, expert: int, slot: int) -> Future:
        counters = self.stats[layer]
        if not self.gpu:
            counters.bytes_from_disk += self.expert_bytes
            return self.io.submit(self.reader.read, layer, expert, *self.pool[slot])
        key = (layer, expert)
        self.host_cache.policy.access(key)
        host_slot = self.host_cache.lookup(key)
        from_disk = host_slot is None
        if from_disk:
            busy_keys = {k for k, s in self.host_cache.slot_of.items() if s in self.host_busy}
            host_slot, _ = self.host_cache.admit(key, busy_keys)
            counters.bytes_from_disk += self.expert_bytes
        counters.bytes_to_device += self.expert_bytes
        self.host_busy.add(host_slot)
        released = self.slot_released[slot]
        future = self.io.submit(self._to_device, layer, expert, slot, host_slot, from_disk, released)
        future.add_done_callback(lambda _: self.host_busy.discard(host_slot))
        return future

    def _to_device(self, layer, expert, slot, host_slot, from_disk, released) -> torch.cuda.Event:
        """I/O thread: disk -> pinned host slot (if needed), then host -> GPU slot on the copy stream."""
        host_gate_up, host_down = self.host_pool[host_slot]
        if from_disk:
            previous = self.host_copied[host_slot]
            if previous is not None:
                previous.synchronize()  # an earlier copy out of this host slot must finish before we overwrite it
            self.reader.read(layer, expert, host_gate_up, host_down)
        gate_up, down = self.pool[slot]
        with torch.cuda.stream(self.copy_stream):
            if released is not None:
                self.copy_stream.wait_event(released)  # the slot's last reader has run
            gate_up.copy_(host_gate_up, non_blocking=True)
            down.copy_(host_down, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.host_copied[host_slot] = done
        return done

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.reader.close()
