"""Prefetch policy around a predictor: how many experts to fetch ahead, and
whether to fetch at all for a layer whose predictions have stopped paying.

At most `limit` experts per target layer and step are fetched ahead: the
speculative bytes per step are capped at limit x expert size per layer.

Two rules decide which of them go:

- By precision (the default, what the engine runs). Per target layer it keeps
  the outcome of the last `window` prefetch candidates (predicted experts that
  were not cached: requested or not). Below `threshold` precision the layer's
  prefetches stop (the default 0.5: a wrong prefetch evicts an expert that may
  be needed, so below about one right guess in two prefetching costs more
  misses than it saves); predictions go on in the shadow, and prefetching
  resumes once their precision is back above the threshold.

- By expected gain, given `calibration` (scores -> probabilities,
  predictors/calibrate.py). An expert needed with probability p is fetched
  ahead only where

      p * miss  >  MARGIN * (max(0, fetch - slack) + evictions)

  `miss`: the seconds a demand miss of it adds to its layer step, beside the
  other misses expected there (`MissCost`, from the scheduler); `fetch`: the
  seconds the link (on a CPU, the disk) is busy with it, of which only what
  outlasts the `slack` (link time left before the next layer needs it) costs
  anything, right or wrong; `evictions`: the expected seconds lost to what it
  pushes out of full tiers (`Evictions`, learned from the run's own evictions);
  MARGIN > 1 leaves near-even trades alone.

  Where speculative reads yield to demand reads (a CPU run reading experts from disk:
  cache/priority.py), a guess never holds up a demand read by more than one chunk, and
  reads only while no demand read runs, so the rule becomes

      p * miss * ahead  >  MARGIN * ((1 - p) * (cpu * ahead + late) + evictions)

  `ahead` = min(1, slack / fetch): the part of the expert read before its layer needs it (a
  right guess saves that much of its miss; a wrong one is cancelled there); `cpu`: the CPU
  seconds one read takes from the compute where no core is spare; `late` = min(chunk,
  fetch - slack): a wrong guess still reading when the routing arrives delays a demand read by
  at most its chunk in flight. `gain` is that rule; the simulator
  gives it each step's own slack, misses and victims, the engine fixed
  `costs`. The window then corrects the calibration online instead of
  switching layers off: per target layer, the probabilities are scaled by
  (what came true + 2) / (what was expected + 2) over the window, so a
  predictor that has drifted from its training split fetches less, down to
  nothing but free fetches.

  The prediction costs time too (the routing predictor's features and online
  counts: about 0.3 ms per layer step on a 2-core CPU). With `timed` (a live
  run), each call's own seconds and the gain it expected from the guesses it
  kept are averaged; where the guesses do not pay MARGIN times what predicting
  costs, the predictor runs only on every PROBE_EVERY-th token, to notice when
  they would again (its online state then lags: a probe predicts from older
  routing, which errs on the side of staying off).

  Last, what no model of the costs captures (the disk's own behaviour, the
  cores the guesses' copies take, a wrong calibration) is settled by measuring:
  a `Trial` runs decode steps with and without prefetching, in alternating
  blocks, and keeps prefetching only while its median step is the faster one.

Pure bookkeeping: the engine (or the simulator) moves the bytes.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .predictors.base import Predictor, rank
from .scheduler import CostModel, ExpertWork, schedule


@dataclass(frozen=True)
class Costs:
    """Seconds per expert, for the gain rule where no simulator knows the step's own figures."""

    fetch: float  # the link (on a CPU, the disk) busy with one speculative fetch
    miss: float  # what a demand miss adds to its layer step
    slack: float = 0.0  # link time per layer step that a prefetch can take without delaying the next
    victim: float = 0.0  # expected seconds lost to the expert a prefetch evicts
    cpu: float = 0.0  # yielding reads: the CPU seconds one read takes from the compute (0: a core is spare)
    chunk: float = 0.0  # yielding reads: seconds of one chunk, the most a guess delays a demand read
    yielding: bool = False  # speculative reads yield to demand reads (cache/priority.py)

    def __post_init__(self):
        if min(self.fetch, self.miss, self.slack, self.victim, self.cpu, self.chunk) < 0:
            raise ValueError("fetch, miss, slack, victim, cpu and chunk are seconds: none may be negative")


MARGIN = 1.25  # costs are weighed up by this much: a fetch must save clearly more than it costs
PROBE_EVERY = 16  # a predictor that does not pay for itself still runs on every this many tokens
SMOOTHING = 0.1  # of the averages of a call's seconds and expected gain
# Whether a live CPU run weighs the prediction's own time (offload.load reads it). The tests turn it off:
# their tiny experts read in microseconds, so predicting would never pay, and their prefetch counts would
# depend on the machine's speed; tests/test_routing_prefetch.py checks the rule with a fake clock.
TIMED = True


def gain(p: float, fetch: float, miss: float, slack: float, victim: float = 0.0, cpu: float = 0.0,
         chunk: float = 0.0, yielding: bool = False) -> float:
    """Expected seconds saved by fetching ahead an expert needed with probability p (see the module
    docstring), its costs weighed up by MARGIN (calibration and the cost figures err: where the
    trade is near even, it is not worth the risk); fetch it only where this is positive.
    `victim`: the expected seconds its evictions cost; `cpu`, `chunk`: a yielding read's costs."""
    if yielding:
        ahead = min(1.0, max(0.0, slack) / fetch) if fetch > 0 else 0.0
        late = min(chunk, max(0.0, fetch - max(0.0, slack)))
        return p * miss * ahead - MARGIN * ((1.0 - p) * (cpu * ahead + late) + victim)
    return p * miss - MARGIN * (max(0.0, fetch - max(0.0, slack)) + victim)


def gain_of(p: float, costs: Costs, slack: float | None = None) -> float:
    """`gain` with a live run's `costs` (and the slack still unspent in this step, if given)."""
    c = costs
    return gain(p, c.fetch, c.miss, c.slack if slack is None else slack, c.victim, c.cpu, c.chunk, c.yielding)


class Trial:
    """Prefetching measured against not prefetching, in the same run, on decode steps: blocks of
    `block` steps alternate between the two until each has `samples` step times; from then on the
    faster (by median) runs, prefetching only if it was faster by `edge`, with one block of the
    other every `every` steps, so that the choice follows the run. Pure bookkeeping: the engine
    calls `step(now)` at the start of every decode step and `interrupt()` at anything else (a
    prefill), whose time is not a decode step's; `on` says whether this step prefetches."""

    def __init__(self, block: int = 8, samples: int = 24, every: int = 64, edge: float = 0.01):
        self.block, self.samples, self.every, self.edge = block, samples, every, edge
        # The latest `samples` step times of each mode: this disk's speed drifts within a run.
        self.times = {True: deque(maxlen=samples), False: deque(maxlen=samples)}
        self.on, self.left = True, block  # this step's mode; steps left in the current block
        self.start: float | None = None  # when the current decode step began
        self.chosen = 0  # steps run in the chosen mode since the other one's last block

    def step(self, now: float) -> None:
        if self.start is not None:
            self.times[self.on].append(now - self.start)
        self.start = now
        if self.left == 0:  # a block has run: this step begins the next one
            self.left = self.block
            self._next_block()
        self.left -= 1

    def _next_block(self) -> None:
        if min(len(t) for t in self.times.values()) < self.samples:
            self.on = not self.on  # exploring: a block of the other mode
            return
        best = self.faster()
        if self.on != best:  # a block of the other mode has run (or the choice changed): the best again
            self.on = best
            return
        self.chosen += self.block
        if self.chosen >= self.every:  # time for a block of the other mode
            self.chosen, self.on = 0, not best

    def faster(self) -> bool:
        """Whether prefetching's median decode step beats not prefetching's by `edge`."""
        return float(np.median(self.times[True])) < (1.0 - self.edge) * float(np.median(self.times[False]))

    def interrupt(self) -> None:
        self.start = None


class Prefetcher:
    def __init__(self, predictor: Predictor, top_k: int, limit: int, threshold: float = 0.5,
                 window: int = 64, min_samples: int = 16, calibration=None, costs: Costs | None = None,
                 timed: bool = False, trial: Trial | None = None):
        self.predictor, self.top_k, self.limit = predictor, top_k, limit
        self.trial = trial  # measured on/off (a live run): while off, nothing is predicted or fetched
        # `timed`: weigh the guesses' expected gain (by gain, with costs) against the prediction's own
        # measured seconds; `tokens` counts decode tokens (steps at the first MoE layer) for the probes
        self.timed, self.tokens, self.spent, self.expected, self.pays = timed, 0, 0.0, 0.0, True
        self.threshold, self.min_samples = threshold, min_samples
        self.window_size = window
        self.calibration, self.costs = calibration, costs
        self.outcomes: dict[int, deque] = {}  # target -> (probability or None, came true) per candidate
        self.enabled: dict[int, bool] = {}
        self.predicted: dict[int, dict[int, float | None]] = {}  # target -> uncached experts predicted, their p
        self.waiting: dict[int, set[int]] = {}  # target -> experts actually fetched ahead for it
        self.given: dict[int, np.ndarray] = {}  # target -> the probabilities `plan` last gave its experts

    @property
    def by_gain(self) -> bool:
        return self.calibration is not None

    def plan(self, pos: int, hidden, tokens, chosen) -> dict[int, list[int]]:
        """Predicted experts per target MoE position, best first (for every target; see `active`).
        By gain with `costs`: only those whose expected gain is positive, the link's slack spent in order."""
        if self.by_gain and self.costs is not None and gain_of(1.0, self.costs) <= 0:
            # Not even a sure guess would pay (an I/O-bound run, a CPU with no core to spare, or no
            # fetch timed yet): skip the predictor altogether, its scores and its online learning both
            # cost time (the routing predictor: about 0.6 ms per layer step, 13% of a fast CPU decode).
            return {}
        if self.trial is not None and not self.trial.on:
            return {}
        start, expected = time.perf_counter(), 0.0  # the call's seconds, and the gain its guesses expect
        timed = self.timed and self.by_gain and self.costs is not None
        if timed:
            self.tokens += pos == 0
            if not self.pays and self.tokens % PROBE_EVERY:
                # Predicting costs more than its guesses are expected to save. Probes take a whole
                # token (every layer), so that no layer is sampled more than another.
                return {}
        scores = self.predictor.scores(pos, hidden if self.predictor.needs_hidden else None, tokens, chosen)
        self.predictor.observe(pos, tokens, chosen)
        out = {}
        for target, s in scores.items():
            ranked = rank(s, self.top_k, self.limit)
            if self.by_gain and self.costs is not None:
                p, c = self.probabilities(target, s), self.costs
                self.given[target] = p
                keep, slack = [], c.slack
                for e in ranked:
                    g = gain_of(p[e], c, slack)
                    if g > 0:
                        keep.append(e)
                        slack -= c.fetch
                        expected += g
                ranked = keep
            out[target] = ranked
        if timed:
            self.spent += SMOOTHING * ((time.perf_counter() - start) - self.spent)
            self.expected += SMOOTHING * (expected - self.expected)
            self.pays = self.expected > MARGIN * self.spent
        return out

    def probabilities(self, target: int, scores: np.ndarray) -> np.ndarray:
        """[N, E] or [E] scores -> [E]: P(some token of the step needs the expert at `target`), as
        calibrated, times the target's online correction."""
        p = np.atleast_2d(self.calibration(scores))
        either = 1.0 - np.prod(1.0 - p, axis=0)  # [E]
        return np.clip(either * self.reliability(target), 0.0, 1.0)

    def reliability(self, target: int) -> float:
        """What came true over what the calibrated probabilities expected, over the window (1 at first)."""
        window = [(p, hit) for p, hit in self.outcomes.get(target, ()) if p is not None]
        return (sum(hit for _, hit in window) + 2.0) / (sum(p for p, _ in window) + 2.0)

    def active(self, target: int) -> bool:
        if self.by_gain:
            return True  # the gain rule decides expert by expert
        return self.enabled.setdefault(target, True)

    def candidates(self, target: int, experts: list[int], probabilities=None) -> None:
        """The predicted experts that were not cached: what a prefetch fetches (or, off, would have);
        with the probabilities the gain rule gave them (a mapping or array indexed by expert; by
        default those `plan` gave)."""
        if probabilities is None:
            probabilities = self.given.pop(target, None)
        self.predicted[target] = {e: (None if probabilities is None else float(probabilities[e])) for e in experts}

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
        window.extend((p, e in requested) for e, p in predicted.items())
        if len(window) >= self.min_samples:
            self.enabled[pos] = sum(hit for _, hit in window) / len(window) >= self.threshold

    def precision(self, pos: int) -> float | None:
        window = self.outcomes.get(pos)
        return sum(hit for _, hit in window) / len(window) if window else None


class LinkClock:
    """The gain rule's costs in a live run, measured as it goes (the engine has no simulator to ask):

      fetch   seconds one fetch keeps the I/O path busy: the median of the recent demand reads (and
              copies)
      miss    what a demand miss adds to its step: at most one fetch, taken as one
      slack   I/O time per layer step left idle: the step's wall time less the time some read was
              in flight (one read stream fills a disk or a link: two at once do not go twice as
              fast), averaged over steps
      cpu     yielding reads on a CPU with no core to spare: the median CPU seconds of a read (the
              copy out of the page cache and the syscalls, taken from the experts)

    An I/O-bound run has no slack, so a guess costs a whole fetch and saves at most one: the rule
    turns prefetching off there, and on where reads leave the link idle. Reads that do not yield
    (a GPU's copies) and `spare_core=False` (a CPU run whose threads take every core: the copy out of
    the page cache takes a core from the experts) leave no slack at all. Yielding reads
    (cache/priority.py) run only while no demand read does, so the slack is the time no demand read
    is in flight, and their CPU time is charged as `cpu` instead. `chunk_fraction`: one chunk's share
    of an expert's bytes. I/O threads call `span`; the main thread calls `costs` once per layer step."""

    def __init__(self, io_threads: int, keep: int = 32, smoothing: float = 0.2, spare_core: bool = True,
                 yielding: bool = False, chunk_fraction: float = 0.0):
        self.io_threads, self.smoothing, self.spare_core = max(1, io_threads), smoothing, spare_core
        self.yielding, self.chunk_fraction = yielding, chunk_fraction
        # Appended by I/O threads, read by the main thread (deque appends and pops are thread-safe):
        self.reads: deque = deque(maxlen=keep)  # (seconds, CPU seconds) of the latest demand reads
        # (start, end) of the reads that kept the link busy, not yet counted; bounded, as nothing drains
        # it where `costs` is never called (no prefetch by gain)
        self.busy: deque = deque(maxlen=keep * 8)
        self.slack = 0.0
        self.begin: float | None = None

    def span(self, start: float, end: float, cpu: float = 0.0, demand: bool = True) -> None:
        if demand:
            self.reads.append((end - start, cpu))
        if demand or not self.yielding:
            self.busy.append((start, end))

    def costs(self, now: float, victim: float = 0.0) -> Costs:
        # Called once per layer step on the hot path: a few dozen floats, no numpy (this was 6% of an
        # int4 disk-bound decode when it kept 256 spans).
        reads = list(self.reads)
        fetch = statistics.median(r for r, _ in reads) if reads else 0.0
        ended = [self.busy.popleft() for _ in range(len(self.busy))]  # each read counts in the step it ends in
        if self.begin is not None and (self.spare_core or self.yielding):
            step = max(0.0, (now - self.begin) - _covered(ended, self.begin, now))
            self.slack += self.smoothing * (step - self.slack)
        self.begin = now
        if not self.yielding:
            return Costs(fetch=fetch, miss=fetch, slack=self.slack, victim=victim)
        cpu = 0.0 if self.spare_core or not reads else statistics.median(c for _, c in reads)
        return Costs(fetch=fetch, miss=fetch, slack=self.slack, victim=victim, cpu=cpu,
                     chunk=fetch * self.chunk_fraction, yielding=True)


def _covered(spans: list, begin: float, end: float) -> float:
    """Seconds of [begin, end] during which at least one of the (start, stop) spans ran."""
    total, reach = 0.0, begin
    for start, stop in sorted((max(s, begin), min(e, end)) for s, e in spans if e > begin and s < end):
        if stop > reach:
            total += stop - max(start, reach)
            reach = stop
    return total


class Evictions:
    """What one more admission into a full tier costs, in expected seconds, learned as the run goes.

    An LRU (or FIFO) tier of C slots that admits one expert more than it would have evicts its
    oldest expert one admission early, and so on down the queue for as long as the extra expert
    stays: about C evictions, each one admission early. Such an early eviction costs a miss when
    the victim is requested before the admission that would have evicted it anyway. This watches
    every eviction (by demand or prefetch: the victim is the policy's either way) and adds up what
    those requests cost (where the victim then was); one more admission costs C x that per
    eviction. Until evictions settle, half the `prior` (the costlier miss) per eviction, worth two
    (cautious: early prefetches must not cost)."""

    def __init__(self, capacity: int, per_layer: bool, prior: float):
        self.capacity, self.per_layer = max(1, capacity), per_layer
        self.admissions: dict = {}  # group -> experts admitted so far
        self.watched: dict = {}  # evicted key -> (group, admissions of its group then)
        self.lost, self.settled, self.prior = 0.0, 0, prior

    def admitted(self, key, evicted=None) -> None:
        group = key[0] if self.per_layer else None
        self._settle(group)
        self.admissions[group] = self.admissions.get(group, 0) + 1
        if evicted is not None:
            self.watched[evicted] = (group, self.admissions[group])

    def _settle(self, group) -> None:
        """Victims of `group` not requested before its next admission: evicting them early cost nothing."""
        at = self.admissions.get(group, 0)
        for key, (g, when) in list(self.watched.items()):
            if g == group and when <= at:
                del self.watched[key]
                self.settled += 1

    def requested(self, key, seconds: float) -> None:
        """`key` was requested and is not in the tier: a miss of `seconds` if it was evicted early."""
        if self.watched.pop(key, None) is not None:
            self.settled += 1
            self.lost += seconds

    def seconds(self, prior: float | None = None) -> float:
        """Expected seconds one more admission costs (`prior`: the miss cost to assume until evictions
        settle, where it was not known when this was made: a live run's measured fetch time)."""
        return self.capacity * (self.lost + (self.prior if prior is None else prior)) / (self.settled + 2.0)


class MissCost:
    """What one demand miss adds to a decode layer step, beside the misses it shares the step with,
    as the scheduler plans it: a host miss computed on the CPU while a disk read runs costs next to
    nothing, alone it costs its CPU time or its copy. From the scheduler's layer time with h misses
    from host RAM and d from disk (0..top_k each), interpolated between whole counts."""

    def __init__(self, cost: CostModel, top_k: int, allow_cpu: bool):
        self.top_k = top_k
        self.grid = np.array([[schedule([ExpertWork(i, 1, "host") for i in range(h)]
                                        + [ExpertWork(h + i, 1, "disk") for i in range(d)], cost, allow_cpu).time
                               for d in range(top_k + 1)] for h in range(top_k + 1)])  # [h, d] seconds
        self.alone = {"host": float(self.grid[1, 0] - self.grid[0, 0]),  # a miss alone in its step
                      "disk": float(self.grid[0, 1] - self.grid[0, 0])}

    def of(self, where: str, host: float, disk: float) -> float:
        """A miss from `where` ("host" or "disk") beside `host` and `disk` other misses (expected counts)."""
        more = (1.0, 0.0) if where == "host" else (0.0, 1.0)
        return self._time(host + more[0], disk + more[1]) - self._time(host, disk)

    def _time(self, h: float, d: float) -> float:
        k, t = self.top_k, self.grid
        h, d = min(max(h, 0.0), k), min(max(d, 0.0), k)
        h0, d0 = min(int(h), k - 1), min(int(d), k - 1)
        fh, fd = h - h0, d - d0
        return float((1 - fh) * (1 - fd) * t[h0, d0] + fh * (1 - fd) * t[h0 + 1, d0]
                     + (1 - fh) * fd * t[h0, d0 + 1] + fh * fd * t[h0 + 1, d0 + 1])
