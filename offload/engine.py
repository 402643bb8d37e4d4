"""The offloaded expert executor, the mover: routed experts stream from disk (and, with a GPU,
through a pinned host tier) into a fixed pool of compute-side slots. What to fetch into which
slot, whom to evict, which host slot to use and which experts the CPU computes is decided by
offload/planner.py (pure Python, unit-tested); this file carries it out with the reader, the I/O
threads, the copy stream, events and the kernels, and tells the plan what finished.

Per layer step, for the experts the router picked (read back to the host once):
  1. the plan records the requests with the cache policy and splits them into present and missing;
  2. with a host tier and a `decide` hook (a hardware profile's scheduler), the missing experts it
     assigns to the CPU start on the CPU worker, from host RAM, as host slots allow;
  3. fetches start into free (or evicted) slots on the I/O pool, as many as the plan admits
     without evicting anything this step still needs, then prefetches of what the predictor expects;
  4. when every expert has its slot and none runs on the CPU (decode, mostly) and the grouped
     kernel is fused: one grouped call over the slot pool once the copies are in. Otherwise each
     expert is computed as it arrives (present ones first, while the fetches run), new fetches
     starting as slots free up, then the CPU experts are collected;
  5. the contributions are combined per token in ascending expert order (offload/grouped.py):
     bit-identical to the resident model, whatever order they were computed in.

On a CPU the compute slots are the RAM cache and a fetch is a disk read. On a GPU a fetch is a
disk read into the pinned host tier when the expert is not there, then a copy on `copy_stream`;
events order the copy after the last kernel that used the slot, and the kernels after the copy.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import replace
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from .cache.policy import make_policy
from .cache.priority import CHUNK, Cancelled, ReadGate
from .cache.state import ExpertCache
from .cache.store import IO_THREADS, ExpertReader, SlotPool
from .errors import OffloadError
from .experts import ACT, gating
from .formats import ExpertFormat
from .grouped import HostTransfers, combine, grouped_kernel, host_offsets, route
from .kernels import expert_kernel
from .placement import Placement
from .planner import Claim, Fetch, HostTier, LayerPlan
from .prefetch import Evictions, LinkClock, Prefetcher
from .stats import Event, ExpertStats, Timeline

# decide(missing experts of one layer step, as scheduler.ExpertWork) -> {expert: "fetch" | "cpu"}
Decide = Callable[[list], dict[int, str]]


class OffloadedExperts:
    def __init__(self, checkpoint, placement: Placement, device: torch.device, fmt: ExpertFormat,
                 policy: str, split: str, stats: ExpertStats, io_threads: int = IO_THREADS,
                 prefetch: Prefetcher | None = None, decide: Decide | None = None, drop_page_cache: bool = False,
                 direct_io: bool = True):
        cfg = checkpoint.config
        self.layers = cfg.moe_layers
        self.pos = {layer: i for i, layer in enumerate(self.layers)}  # decoder index -> MoE position
        self.prefetch = prefetch
        self.prefetching: dict = {}  # key -> Future of a speculative fetch still on the I/O pool
        # Prefetch by expected gain (offload/prefetch.py): the link's costs measured as the run goes, and
        # what a prefetch's eviction costs, learned from the evicted experts requested again.
        # On a CPU whose cores all compute, a read (a copy out of the page cache, or a disk read's
        # syscalls) takes a core from the experts: nothing runs beside them for free.
        spare_core = device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
        # On a CPU with no host tier a prefetch is a disk read into the RAM cache: it yields to demand
        # reads (cache/priority.py), on its own thread, so that a waiting guess never holds up the pool.
        self.yielding = device.type == "cpu" and placement.host_slots == 0 and prefetch is not None
        self.gate = ReadGate()
        self.tickets: dict = {}  # key -> Ticket of a yielding prefetch not yet seen through
        self.prefetch_io = ThreadPoolExecutor(1, thread_name_prefix="offload-prefetch") if self.yielding else None
        self.clock = LinkClock(io_threads, spare_core=spare_core, yielding=self.yielding,
                               chunk_fraction=min(1.0, CHUNK / max(1, placement.expert_bytes)))
        # Every read, copy or CPU expert submitted and not yet seen through by the main thread, and
        # what it holds: released when seen, or undone by _recover after a failure.
        self.outstanding: dict[Future, Claim] = {}
        self.plan: LayerPlan | None = None  # the step in progress (for _recover)
        self.started: set = set()
        self.copy_done: dict = {}  # GPU: key -> copy event of a fetched expert not yet used
        self.tokens = np.zeros(0, dtype=np.int64)  # token ids of the current forward step, flattened
        self.device, self.stats = device, stats
        # The timeline recorder (opt-in, record_timeline): while on, the events of the current decode
        # step, else None; every recording site checks `events is not None` and does nothing more.
        self.recording, self.events = False, None
        self.expert_bytes = placement.expert_bytes  # fmt.nbytes: what one fetch moves
        act, glu = ACT[cfg.hidden_act], gating(cfg)
        self.num_experts = cfg.num_experts
        self.grouped = grouped_kernel(fmt, device, expert_kernel(fmt, device, act, glu), act, glu)
        self.cpu_kernel = expert_kernel(fmt, torch.device("cpu"), act, glu)  # CPU experts beside a GPU
        # Reads that keep out of the page cache go around it (O_DIRECT) where the file system allows.
        self.reader = ExpertReader(checkpoint.expert_extents, checkpoint.shard_files(), drop_cache=drop_page_cache,
                                   direct=direct_io)
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="offload-io")
        # The compute-side tier: GPU slots, or on a CPU the RAM cache itself.
        self.pool = SlotPool(placement.device_slots, fmt, device)
        self.cache = ExpertCache(placement.device_slots, make_policy(policy), self.layers, split)
        # Only the gain rule reads what evictions cost: without it nothing is tracked on the hot path.
        by_gain = prefetch is not None and prefetch.by_gain
        self.evictions = Evictions(self.cache.capacity_for(self.layers[0]), split == "layer", prior=0.0) \
            if by_gain else None
        self.gpu = device.type == "cuda"
        # A host tier between disk and the compute slots: always with a GPU; on a CPU only when
        # asked for (tests use it to run the tiered and CPU-expert paths without a GPU).
        self.tiered = placement.host_slots > 0
        # Which missing experts to compute on the CPU from the host tier instead of fetching them
        # (offload/scheduler.py decides from a hardware profile); None: always fetch.
        self.decide = decide if self.tiered else None
        self.host: HostTier | None = None
        if self.tiered:
            self.host_pool = SlotPool(placement.host_slots, fmt, torch.device("cpu"), pin=self.gpu)
            self.host = HostTier(ExpertCache(placement.host_slots, make_policy(policy), self.layers, split))
            # A new thread's OpenMP pool starts at every core whatever torch.set_num_threads said on the
            # main thread, and a GEMM splits its rows by the thread count: the same count, the same bits.
            self.cpu_worker = ThreadPoolExecutor(1, thread_name_prefix="offload-cpu-experts",
                                                 initializer=torch.set_num_threads,
                                                 initargs=(torch.get_num_threads(),))
        if self.gpu:
            self.copy_stream = torch.cuda.Stream(device)
            # Per GPU slot: recorded on the compute stream after the last kernel that read it.
            self.slot_released: list[torch.cuda.Event | None] = [None] * placement.device_slots
            # Per host slot: recorded on the copy stream after the last copy out of it.
            self.host_copied: list[torch.cuda.Event | None] = [None] * placement.host_slots

    # ---- one layer step --------------------------------------------------

    def begin_step(self, input_ids: torch.Tensor) -> None:
        """Called by the model before each forward: the token ids the predictors may use."""
        self.tokens = input_ids.reshape(-1).cpu().numpy()
        trial = self.prefetch.trial if self.prefetch is not None else None
        if trial is not None:  # prefetching measured against none, step by step
            trial.step(time.perf_counter()) if input_ids.shape[-1] == 1 else trial.interrupt()
        if self.recording:
            self._timeline_step(input_ids)

    def record_timeline(self, on: bool = True) -> None:
        """Record what every decode step's expert work did when (compute, stall, read, fetch, cpu
        spans per layer); the last decode step is kept as `stats.timeline` (in the stats JSON under
        "timeline"). Off by default: then nothing on the hot path is timed or stored."""
        self.recording, self.events = bool(on), None

    def _timeline_step(self, input_ids: torch.Tensor) -> None:
        if input_ids.shape[-1] != 1:  # a prefill: not recorded, the last decode step's timeline stays
            self.events = None
            return
        timeline = Timeline(time.perf_counter(), int(input_ids.shape[0]))
        self.stats.timeline, self.events = timeline, timeline.events

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self._step(layer, hidden, ids, weights, probs)
        except BaseException as exc:  # a failed read, a bug, or Ctrl-C in the middle of a layer
            self._recover()
            if isinstance(exc, OSError):
                raise OffloadError(f"reading an expert of layer {layer} failed ({exc}); the checkpoint's files "
                                   "may be damaged, truncated or on a failing drive") from None
            raise

    def _step(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              probs: torch.Tensor | None) -> torch.Tensor:
        events = self.events  # None unless a decode step's timeline is being recorded
        begin = time.perf_counter() if events is not None else 0.0
        counters = self.stats[layer]
        if self.evictions is not None:  # prefetch by expected gain: this step's costs
            costs = self.clock.costs(time.perf_counter())
            # Until evictions settle, each is assumed to cost a miss (a fetch): cautious, as in the simulator.
            self.prefetch.costs = replace(costs, victim=self.evictions.seconds(prior=costs.fetch))
        chosen, mean_probs = self._read_routing(ids, probs)  # the layer's one device -> host read
        if self.tickets:
            self._judge_guesses(layer, set(np.unique(chosen).tolist()))
        plan = self.plan = LayerPlan(layer, np.unique(chosen).tolist(), self.cache, self.host, mean_probs)
        self.started = set()  # keys of this step whose read (or CPU expert) was submitted
        present = plan.present
        if self.evictions is not None:
            for e in plan.missing:  # a miss of an expert evicted early costs about one fetch
                self.evictions.requested((layer, e), self.prefetch.costs.fetch)
        counters.hits += len(present)
        counters.misses += len(plan.missing)
        on_cpu = []
        if self.decide is not None and plan.missing:
            on_cpu = plan.assign_cpu(self.decide, np.bincount(chosen.reshape(-1), minlength=self.num_experts).tolist())
        routes = rows = x = None
        if on_cpu or not self.grouped.fused:
            routes, rows, x = self._by_expert(hidden, ids, weights, chosen)
        cpu_parts = self._start_cpu_experts(plan, x, rows, on_cpu, counters)
        self._forget_finished_prefetches()
        inflight: deque[tuple[int, int, Future]] = deque()

        def issue():
            for fetch in plan.admit(self.prefetching):
                inflight.append((fetch.key[1], fetch.slot, self._fetch(fetch)))

        issue()
        if self.prefetch is not None:
            self.prefetch.settle(self.pos[layer], set(present + plan.missing), set(present), counters)
            for target, wanted in self.prefetch.plan(self.pos[layer], hidden, self.tokens, chosen).items():
                target_layer = self.layers[target]
                self._prefetch(plan, target_layer, wanted, self.stats[target_layer])
        if self.grouped.fused and not cpu_parts and not plan.pending:  # every expert has its slot: one call
            out = self._fused(layer, hidden, ids, weights, present, inflight, counters)
            if events is not None:
                events.append(Event(layer, "layer", begin, time.perf_counter()))
            return out

        # Per expert, in arrival order, each into its rows of y.
        if routes is None:
            routes, rows, x = self._by_expert(hidden, ids, weights, chosen)
        y = torch.empty_like(x)
        for e in present:
            self._await_prefetch((layer, e), counters)
            self._compute(layer, x, y, rows(e), e, self.cache.lookup((layer, e)))
            plan.computed(e)
            issue()
        while inflight or plan.pending:
            if not inflight:  # the host slots are held by CPU experts or prefetches: let one finish
                if cpu_parts:
                    self._collect_cpu(layer, cpu_parts, y, rows, counters)
                elif self.prefetching:  # wrong guesses still being read into this layer's slots
                    self._finish_prefetch(next(iter(self.prefetching)))
                    self._forget_finished_prefetches()
                else:
                    raise RuntimeError(f"layer {layer}: experts {list(plan.pending)} can get no slot")  # a bug
                issue()
                continue
            e, slot, future = inflight.popleft()
            self._await(future, counters, (layer, e))
            self._compute(layer, x, y, rows(e), e, slot)
            plan.computed(e)
            issue()
        while cpu_parts:
            self._collect_cpu(layer, cpu_parts, y, rows, counters)
        out = combine(routes, y, hidden.dtype)
        if events is not None:  # the whole expert step of this layer, bookkeeping included
            events.append(Event(layer, "layer", begin, time.perf_counter()))
        return out

    def _by_expert(self, hidden, ids, weights, chosen):
        """Rows grouped by expert id (offsets computed on the host from `chosen`): the routes, each
        expert's rows as a slice, and the rows' activations x [M, H]."""
        routes = route(ids, weights, self.num_experts)
        ends = host_offsets(chosen, self.num_experts).tolist()

        def rows(e: int) -> slice:
            return slice(ends[e - 1] if e else 0, ends[e])

        return routes, rows, hidden[routes.tokens]

    def _read_routing(self, ids: torch.Tensor, probs: torch.Tensor | None) -> tuple[np.ndarray, list | None]:
        """The chosen experts [N, K] on the host, and the mean router probabilities [E] when the cache
        policy observes them: one transfer (a GPU's one sync in an offloaded layer)."""
        if probs is None or not self.cache.policy.observes:
            return HostTransfers.read(ids), None
        both = HostTransfers.read(torch.cat([ids.reshape(-1).to(probs.dtype), probs.mean(dim=0)]))
        return both[:ids.numel()].astype(np.int64).reshape(ids.shape), both[ids.numel():].tolist()

    def _fused(self, layer, hidden, ids, weights, present, inflight, counters) -> torch.Tensor:
        """Every expert of the step is in (or on its way to) a slot: wait for the copies, then one
        grouped call over the whole slot pool, rows grouped by slot."""
        for e in present:
            self._await_prefetch((layer, e), counters)
        for e, _, future in inflight:
            self._await(future, counters, (layer, e))
        slot_of = np.zeros(self.num_experts, dtype=np.int64)  # expert -> its slot (others unused)
        for e in present:
            slot_of[e] = self.cache.lookup((layer, e))
        for e, slot, _ in inflight:
            slot_of[e] = slot
        used = [int(slot_of[e]) for e in present] + [slot for _, slot, _ in inflight]
        start = time.perf_counter() if self.events is not None else 0.0
        routes = route(ids, weights, self.pool.slots, torch.from_numpy(slot_of).to(hidden.device))
        y = self.grouped.all(hidden[routes.tokens], self.pool.data, routes.offs)
        if self.gpu:  # the next copy into any of these slots waits for this call
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            for slot in used:
                self.slot_released[slot] = event
        if self.events is not None:
            self.events.append(Event(layer, "compute", start, time.perf_counter()))
        return combine(routes, y, hidden.dtype)

    # ---- experts computed on the CPU, where their weights already are ------------

    def _start_cpu_experts(self, plan: LayerPlan, x, rows, on_cpu, counters) -> dict[int, Future]:
        """Start the chosen experts on the CPU worker, as many as host slots allow (the rest are fetched)."""
        if not on_cpu:
            return {}
        layer = plan.layer
        host = x.to("cpu")  # [M, H]: one copy of the routed rows to the host for all of this layer's CPU experts
        futures = {}
        for e in on_cpu:
            claim = plan.claim_cpu(e)
            if claim is None:
                continue
            host_slot, from_disk = claim
            counters.bytes_from_disk += self.expert_bytes if from_disk else 0
            counters.experts_on_cpu += 1
            future = self.cpu_worker.submit(self._cpu_expert, layer, e, host_slot, from_disk, host[rows(e)],
                                            events=self.events)
            self.outstanding[future] = Claim(None, (layer, e), host_slot)
            self.started.add((layer, e))
            futures[e] = future
        return futures

    def _collect_cpu(self, layer: int, cpu_parts: dict, y: torch.Tensor, rows, counters) -> None:
        e = next(iter(cpu_parts))
        start = time.perf_counter()
        future = cpu_parts.pop(e)
        part = future.result()  # the CPU experts ran beside the device's work
        end = time.perf_counter()
        counters.stall_seconds += end - start
        if self.events is not None:
            self.events.append(Event(layer, "stall", start, end, e))
        self._release(future)
        y[rows(e)] = part.to(y.device)

    def _cpu_expert(self, layer, expert, host_slot, from_disk, x, events=None):
        """CPU worker thread: read the expert into its host slot if needed, then compute its rows x [n, H] there."""
        if from_disk:
            self._host_ready(host_slot)
            start = time.perf_counter() if events is not None else 0.0
            self.reader.read(layer, expert, self.host_pool.targets(host_slot))
            if events is not None:
                events.append(Event(layer, "read", start, time.perf_counter(), expert))
        start = time.perf_counter() if events is not None else 0.0
        part = self.cpu_kernel(x, self.host_pool[host_slot])  # [n, H]
        if events is not None:
            events.append(Event(layer, "cpu", start, time.perf_counter(), expert))
        return part

    def _await(self, future: Future, counters, key) -> None:
        start = time.perf_counter()
        ready = future.result()  # compute waits for the I/O threads here and nowhere else
        end = time.perf_counter()
        counters.stall_seconds += end - start
        if self.events is not None:
            self.events.append(Event(key[0], "stall", start, end, key[1]))
        self._release(future)
        if self.gpu:
            torch.cuda.current_stream(self.device).wait_event(ready)  # kernels after the copy

    # ---- speculative fetches -------------------------------------------------

    def _prefetch(self, plan: LayerPlan, layer: int, wanted: list[int], counters) -> None:
        target = self.pos[layer]
        candidates = [e for e in wanted if (layer, e) not in self.cache]
        self.prefetch.candidates(target, candidates)
        if not self.prefetch.active(target):
            return  # switched off for this layer: the candidates are only scored
        for e in candidates:
            key = (layer, e)
            fetch = plan.prefetch(key, self.prefetching)
            if fetch is None:
                continue
            self.prefetching[key] = self._fetch(fetch, speculative=True)
            counters.prefetch_issued += 1
            self.prefetch.issued(target, e)

    def _await_prefetch(self, key, counters) -> None:
        future = self.prefetching.pop(key, None)
        self.tickets.pop(key, None)  # promoted by _judge_guesses: an ordinary read now
        if future is not None:
            self._await(future, counters, key)
        elif self.gpu and key in self.copy_done:
            torch.cuda.current_stream(self.device).wait_event(self.copy_done.pop(key))

    def _judge_guesses(self, layer: int, requested: set[int]) -> None:
        """The routing of a layer whose experts were guessed is known: its right guesses still being
        read go on as demand reads, its wrong ones stop before their next chunk. A wrong guess whose
        expert this step needs after all (guessed for an earlier step) first stops and leaves the cache."""
        for key, ticket in list(self.tickets.items()):
            if key[0] != layer:
                continue
            if ticket.cancelled:
                if key[1] in requested:
                    self._finish_prefetch(key)
            elif key[1] in requested:
                ticket.promote()
            else:
                ticket.cancel()

    def _forget_finished_prefetches(self) -> None:
        for key, future in list(self.prefetching.items()):
            if future.done():
                self._finish_prefetch(key)

    def _finish_prefetch(self, key) -> None:
        """Main thread: see a prefetch's read through (waiting for it, if it runs). A cancelled one
        left part of its expert in the slot: the key leaves the cache, and the stats keep the bytes
        it did read."""
        future, ticket = self.prefetching.pop(key), self.tickets.pop(key, None)
        try:
            ready = future.result()  # a failed prefetch raises here, and the step recovers
        except Cancelled:
            self._release(future)
            self.cache.evict(key)
            counters = self.stats[key[0]]
            counters.bytes_from_disk -= self.expert_bytes - ticket.bytes
            counters.prefetch_cancelled += 1
            return
        self._release(future)
        if self.gpu:
            self.copy_done[key] = ready  # still needed to order the first use after the copy

    def _compute(self, layer: int, x: torch.Tensor, y: torch.Tensor, rows: slice, expert: int, slot: int) -> None:
        """One expert's rows of x [M, H] into the same rows of y, from its compute slot."""
        start = time.perf_counter() if self.events is not None else 0.0
        y[rows] = self.grouped.group(x[rows], self.pool[slot])
        if self.gpu:
            # The next copy into this slot must wait for the kernels just queued.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.slot_released[slot] = event
        if self.events is not None:
            self.events.append(Event(layer, "compute", start, time.perf_counter(), expert))

    # ---- fetching ----------------------------------------------------------

    def _fetch(self, fetch: Fetch, speculative: bool = False) -> Future:
        """Start what the plan decided: read (and on a GPU copy) `fetch.key` into its compute slot.
        `speculative`: a prefetch (with yielding reads, it reads in the demand reads' gaps)."""
        (layer, expert), slot, counters = fetch.key, fetch.slot, self.stats[fetch.key[0]]
        self.copy_done.pop(fetch.evicted, None)  # the evicted expert's old copy event means nothing now
        if self.evictions is not None:
            self.evictions.admitted(fetch.key, fetch.evicted)
        if not self.tiered:  # the compute slots are RAM: read straight into them
            counters.bytes_from_disk += self.expert_bytes  # a cancelled guess gives back what it did not read
            targets = self.pool.targets(slot)
            if speculative and self.yielding:
                ticket = self.tickets[fetch.key] = self.gate.ticket()
                future = self.prefetch_io.submit(self._read, layer, expert, targets, ticket, self.events)
            else:
                if self.yielding:
                    self.gate.begin_demand()  # guesses wait from now on, not from when the read starts
                try:
                    future = self.io.submit(self._read, layer, expert, targets, None, self.events)
                except BaseException:
                    if self.yielding:
                        self.gate.end_demand()  # never submitted: it will not end it
                    raise
            self.outstanding[future] = Claim(fetch.key, None, None)
            self.started.add(fetch.key)
            return future
        counters.bytes_from_disk += self.expert_bytes if fetch.from_disk else 0
        counters.bytes_to_device += self.expert_bytes
        released = self.slot_released[slot] if self.gpu else None
        future = self.io.submit(self._timed, self._to_device, layer, expert, slot, fetch.host_slot, fetch.from_disk,
                                released, events=self.events)
        self.outstanding[future] = Claim(fetch.key, fetch.key, fetch.host_slot)  # released once seen through
        self.started.add(fetch.key)
        return future

    def _recover(self) -> None:
        """After a step failed: let every read, copy and CPU expert still running finish (its slot
        must not be handed out while a thread writes it), and forget the experts whose read failed
        or was never seen through, so the caches hold only experts that are really there. The
        next call starts clean: it reads them again, or fails the same clean way."""
        for ticket in self.tickets.values():
            ticket.cancel()  # guesses stop before their next chunk (the loop below waits for them)
        for future, claim in list(self.outstanding.items()):
            try:
                future.result()
                ok = True
            except BaseException:
                ok = False
            if not ok and claim.key is not None and claim.key in self.cache:
                self.cache.evict(claim.key)
            if not ok and claim.host_key is not None and claim.host_key in self.host.cache:
                self.host.cache.evict(claim.host_key)
        if self.plan is not None:  # placed in a cache, but the step died before its read was submitted
            for key, compute, from_disk in self.plan.placed:
                if key in self.started:
                    continue
                if compute and key in self.cache:
                    self.cache.evict(key)
                if from_disk and self.host is not None and key in self.host.cache:
                    self.host.cache.evict(key)
        self.plan = None
        self.outstanding.clear()
        self.prefetching.clear()
        self.tickets.clear()
        self.gate.reset()  # every read has ended: a demand counted but never submitted (Ctrl-C) is gone
        # The copy events are dropped with the bookkeeping: make the compute stream wait for every copy
        # queued so far instead, so no expert that stays cached is read before it has landed.
        if self.gpu:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.copy_done.clear()
        if self.tiered:
            self.host.busy.clear()

    def _release(self, future: Future) -> None:
        """Main thread, after `future` is done and its result seen: its host slot may be reused."""
        claim = self.outstanding.pop(future, None)
        if claim is not None and self.host is not None:
            self.host.release(claim.host_slot)

    def _host_ready(self, host_slot: int) -> None:
        previous = self.host_copied[host_slot] if self.gpu else None
        if previous is not None:
            previous.synchronize()  # an earlier copy out of this host slot must finish before we overwrite it

    def _timed(self, fn, *args, **kwargs):
        """I/O thread: fn, its span handed to the link clock (the prefetch rule's costs)."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.clock.span(start, time.perf_counter())

    def _read(self, layer: int, expert: int, targets, ticket, events) -> int:
        """I/O thread: one expert from disk into its RAM slot (`ticket`: a yielding guess), its span and
        CPU time handed to the link clock (and, while recording, to the timeline)."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.reader.read(layer, expert, targets, ticket)
        finally:
            end = time.perf_counter()
            if self.yielding and ticket is None:
                self.gate.end_demand()
            # A guess's span includes its waits: only demand reads time the disk.
            self.clock.span(start, end, time.thread_time() - cpu, demand=ticket is None)
            if events is not None:
                events.append(Event(layer, "read", start, end, expert))

    def _to_device(self, layer, expert, slot, host_slot, from_disk, released, events=None):
        """I/O thread: disk -> host slot (if needed), then host -> compute slot (on the copy stream on a GPU)."""
        if from_disk:
            self._host_ready(host_slot)
            start = time.perf_counter() if events is not None else 0.0
            self.reader.read(layer, expert, self.host_pool.targets(host_slot))
            if events is not None:
                events.append(Event(layer, "read", start, time.perf_counter(), expert))
        start = time.perf_counter() if events is not None else 0.0
        src, dst = self.host_pool.data[host_slot], self.pool.data[slot]  # one expert's bytes, any format
        if not self.gpu:
            dst.copy_(src)
            if events is not None:
                events.append(Event(layer, "fetch", start, time.perf_counter(), expert))
            return None
        with torch.cuda.stream(self.copy_stream):
            if released is not None:
                self.copy_stream.wait_event(released)  # the slot's last reader has run
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.host_copied[host_slot] = done
        if events is not None:  # the copy was queued, not finished: the host's view
            events.append(Event(layer, "fetch", start, time.perf_counter(), expert))
        return done

    def close(self) -> None:
        for ticket in self.tickets.values():
            ticket.cancel()
        if self.prefetch_io is not None:
            self.prefetch_io.shutdown(wait=True)
        self.io.shutdown(wait=True)
        if self.tiered:
            self.cpu_worker.shutdown(wait=True)
        self.reader.close()
