"""Intra-layer CPU/GPU scheduling: for one MoE layer step, decide per routed
expert whether to compute it where it already is (hit), copy it into a device
slot and compute it there (fetch), or compute it on the CPU where its weights
already sit and move only the activations (cpu). Pure Python, no torch: the
plan can be tested and simulated on recorded traces like the cache policies.

The cost model is a roofline per side (HybriMoE's intra-layer model, with the
constants read from a hardware profile instead of hard-coded):

    throughput(n) = min(gflops_batch, gflops_1 * n)      GFLOP/s at n tokens

Below saturation an expert's matmuls are matrix-vector products bound by
reading the weights: one token streams every weight once, and each extra
token reuses the same bytes, so throughput grows with n until the compute
roof `gflops_batch`. Hence decode (1 token per expert) costs the CPU about as
much as one pass over the weights, which beats a copy over a slow link, while
prefill (hundreds of tokens per expert) costs the CPU n times the compute and
makes the copy cheap by comparison. Prefill and decode come out differently
from the arithmetic, not from a special case.

Quantized experts (int8, int4): copies and reads move the format's bytes
(`weight_bytes` per weight, scales included). On the CPU, the batch-1 figure
scales with bytes too: torch's weight-only int8/int4 kernels stream the
packed weights as F.linear streams bf16 ones, so

    cpu gflops_1 at a format = cpu_gflops_1 * cpu_weight_bytes / weight_bytes

with `cpu_weight_bytes` the bytes per weight the profile's CPU figures were
taken at (2 for bf16; `offload profile` on a quantized model records its own,
so a measured int4 figure is not scaled again), still capped by the batch
roof. Measured on a 2-core EPYC, one thread, H=1024 I=3584 at 1 token: bf16
1.5 ms, int8 0.67 ms (bytes / 2.0, time / 2.2), int4-g32 0.37 ms (bytes /
3.2, time / 4.1): proportional to bytes, or better. The device figures are
not scaled: the runtime's GPU path dequantizes a quantized expert into the
compute dtype and runs the dense matmul (offload/kernels.py), so it is no
faster than dense; the dequantize pass itself is not modeled, which flatters
quantized experts computed on a GPU.

Resources, each serial, running concurrently with the others:

    disk    reads disk experts into host RAM (either side needs the bytes first)
    link    host -> device copies of fetched experts
    device  hits, then fetched experts as their copies land
    cpu     CPU experts, activations over the link included

Layer time = when the last of them finishes. On a CPU-only profile the device
is the CPU and host RAM is its slot tier: "hit" = in RAM, "fetch" = read from
disk into RAM, and there is no link and no separate CPU side.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:  # the profile module imports nothing heavy, but the scheduler needs only its figures
    from .profile import HardwareProfile

WHERE = ("device", "host", "disk")
ACTIONS = ("hit", "fetch", "cpu")
EXACT_LIMIT = 4096  # distinct assignments searched exhaustively (at least every case with <= 12 misses)
TIE = 1e-9  # relative: times closer than this are equal, and the tie goes to "fetch" (it warms the cache)


@dataclass(frozen=True)
class ExpertWork:
    expert: Hashable  # index within the layer (or any id unique in one schedule call)
    tokens: int  # tokens routed to this expert in this layer step
    where: str  # "device" (in a GPU slot), "host" (host RAM) or "disk"

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"expert {self.expert!r}: tokens must be >= 1 (an expert with no tokens is not work)")
        if self.where not in WHERE:
            raise ValueError(f"expert {self.expert!r}: where={self.where!r} must be one of {WHERE}")


@dataclass(frozen=True)
class CostModel:
    """Modeled seconds for each step of one expert's work, from a profile and the expert's shape."""

    profile: HardwareProfile
    hidden: int  # H
    intermediate: int  # I, the routed expert width
    weight_bytes: float = 2.0  # per expert weight, scales included: 2 for bf16/fp16, ~0.53-0.63 for int4
    act_bytes: float = 2.0  # per activation element sent over the link

    def __post_init__(self):
        if self.hidden < 1 or self.intermediate < 1 or self.weight_bytes <= 0 or self.act_bytes <= 0:
            raise ValueError("hidden, intermediate, weight_bytes and act_bytes must be positive")

    @property
    def cpu_only(self) -> bool:
        return self.profile.device == "cpu"

    @property
    def expert_bytes(self) -> float:
        return 3 * self.hidden * self.intermediate * self.weight_bytes  # gate, up, down: [I, H] each

    def flops(self, n: int) -> float:
        return 2 * 3 * self.hidden * self.intermediate * n  # one multiply-add per weight per token

    @staticmethod
    def _seconds(flops: float, gflops_1: float, gflops_batch: float, n: int) -> float:
        return flops / (min(gflops_batch, gflops_1 * n) * 1e9)

    @property
    def cpu_gflops_1(self) -> float:
        """The profile's CPU batch-1 figure at this format's bytes per weight (see the module docstring)."""
        p = self.profile
        return p.cpu_gflops_1 * p.cpu_weight_bytes / self.weight_bytes

    def cpu_compute(self, n: int) -> float:
        return self._seconds(self.flops(n), self.cpu_gflops_1, self.profile.cpu_gflops_batch, n)

    def device_compute(self, n: int) -> float:
        if self.cpu_only:
            return self.cpu_compute(n)
        p = self.profile
        return self._seconds(self.flops(n), p.device_gflops_1, p.device_gflops_batch, n)

    def transfer(self, expert: ExpertWork) -> float:
        """Copying the expert's weights host -> device (nothing if it is there, or there is no link)."""
        if self.cpu_only or expert.where == "device":
            return 0.0
        return self.expert_bytes / self.profile.h2d_bandwidth

    def disk_read(self, expert: ExpertWork) -> float:
        return self.expert_bytes / self.profile.disk_bandwidth if expert.where == "disk" else 0.0

    def activations(self, n: int) -> float:
        """n tokens' hidden states to the CPU and the expert's outputs back: [n, H] each way. Counted
        on the CPU's timeline, not the link's: next to a weight copy they are tiny."""
        if self.cpu_only:
            return 0.0
        return 2 * n * self.hidden * self.act_bytes / self.profile.h2d_bandwidth


@dataclass(frozen=True)
class Span:
    expert: Hashable
    start: float  # seconds from the start of the layer step
    end: float


@dataclass(frozen=True)
class Plan:
    assignment: dict  # expert -> "hit" | "fetch" | "cpu"
    time: float  # modeled layer time in seconds: the last resource to finish
    timelines: dict  # "disk" | "link" | "device" | "cpu" -> tuple[Span, ...] in execution order

    def finish(self, resource: str) -> float:
        spans = self.timelines[resource]
        return spans[-1].end if spans else 0.0

    def experts(self, action: str) -> list:
        return [e for e, a in self.assignment.items() if a == action]


def evaluate(work: list[ExpertWork], assignment: dict, cost: CostModel) -> Plan:
    """The timelines and layer time of one given assignment; schedule() calls it per candidate."""
    by_id = {w.expert: w for w in work}
    side = dict(assignment)
    if set(side) != set(by_id):
        raise ValueError("the assignment must name exactly the experts in the work list")
    for w in work:
        action = side[w.expert]
        if action not in ACTIONS or (action == "hit") != _is_hit(w, cost) or (action == "cpu" and cost.cpu_only):
            raise ValueError(f"expert {w.expert!r} at {w.where!r} cannot be planned as {action!r}")

    def tail(w: ExpertWork) -> float:  # work left after the disk read
        if side[w.expert] == "cpu":
            return cost.activations(w.tokens) + cost.cpu_compute(w.tokens)
        return cost.transfer(w) + cost.device_compute(w.tokens)

    # One disk: reads in order of the longest remaining work, so the long chains start first (a heuristic).
    ready, disk, t = {}, [], 0.0
    for w in sorted((w for w in work if w.where == "disk"), key=tail, reverse=True):
        disk.append(Span(w.expert, t, t + cost.disk_read(w)))
        t = ready[w.expert] = disk[-1].end
    ready_at = lambda e: ready.get(e, 0.0)  # noqa: E731

    # Each serial resource takes its jobs in order of release time: that minimises its finish time.
    link, landed, t = [], {}, 0.0
    fetched = sorted((e for e in side if side[e] == "fetch"), key=ready_at)
    for e in fetched:
        start = max(t, ready_at(e))
        t = start + cost.transfer(by_id[e])
        landed[e] = t
        if t > start:
            link.append(Span(e, start, t))

    # Hits first: they need nothing, and run while the first copies are still on the link.
    device, t = [], 0.0
    for e in [e for e in side if side[e] == "hit"] + sorted(fetched, key=landed.get):
        start = max(t, landed.get(e, 0.0))
        t = start + cost.device_compute(by_id[e].tokens)
        device.append(Span(e, start, t))

    cpu, t = [], 0.0
    for e in sorted((e for e in side if side[e] == "cpu"), key=ready_at):
        n = by_id[e].tokens
        start = max(t, ready_at(e))
        t = start + cost.activations(n) + cost.cpu_compute(n)
        cpu.append(Span(e, start, t))

    timelines = {"disk": tuple(disk), "link": tuple(link), "device": tuple(device), "cpu": tuple(cpu)}
    time = max((s[-1].end for s in timelines.values() if s), default=0.0)
    return Plan(assignment=side, time=time, timelines=timelines)


def schedule(work: list[ExpertWork], cost: CostModel, allow_cpu: bool = True, search: str = "auto") -> Plan:
    """The assignment with the least modeled layer time.

    search: "exact" tries every assignment of the non-hit experts, "greedy" moves one expert at a
    time to the side that gains most, "auto" is exact up to EXACT_LIMIT distinct assignments.
    Experts with the same (where, tokens) are interchangeable, so exact search enumerates how many
    of each such group go to the CPU: the same optimum as 2^misses assignments, in fewer steps.
    """
    if search not in ("auto", "exact", "greedy"):
        raise ValueError(f"search={search!r} must be 'auto', 'exact' or 'greedy'")
    if len({w.expert for w in work}) != len(work):
        raise ValueError("each expert may appear once in a layer step")
    groups: dict[tuple, list] = {}  # (where, tokens) -> experts, in input order
    for w in work:
        if not _is_hit(w, cost):
            groups.setdefault((w.where, w.tokens), []).append(w.expert)
    sizes = [len(g) for g in groups.values()]
    if not allow_cpu or cost.cpu_only:
        sizes = [0] * len(sizes)  # no choice: every miss is fetched

    def plan_for(counts) -> Plan:  # counts[g] = how many of group g compute on the CPU (its last ones)
        side = {w.expert: "hit" for w in work if _is_hit(w, cost)}
        for members, k in zip(groups.values(), counts):
            for i, e in enumerate(members):
                side[e] = "cpu" if i >= len(members) - k else "fetch"
        return evaluate(work, {w.expert: side[w.expert] for w in work}, cost)

    combos = 1
    for s in sizes:
        combos *= s + 1
    if search == "exact" and combos > 1 << 20:
        raise ValueError(f"exact search over {combos} assignments would not finish; use search='greedy'")
    if search == "exact" or (search == "auto" and combos <= EXACT_LIMIT):
        # Ascending CPU count, and only a strictly better time replaces the best: ties stay with "fetch".
        options = sorted(itertools.product(*(range(s + 1) for s in sizes)), key=sum)
        best = None
        for counts in options:
            plan = plan_for(counts)
            if best is None or plan.time < best.time * (1 - TIE):
                best = plan
        return best
    return _greedy(sizes, plan_for)


def _greedy(sizes: list[int], plan_for) -> Plan:
    """From all-fetch, repeatedly move one expert (of some group) to the other side where that cuts
    the layer time most; stop when no single move helps. Moves that leave the layer time equal are
    compared by the two sides' summed finish times: of several experts whose move gains the same,
    the one that loads the receiving side least leaves room for the next move. Each move strictly
    improves (time, then that sum), so the walk ends."""

    def busy(plan: Plan) -> float:
        return plan.finish("device") + plan.finish("cpu")

    def better(a: Plan, b: Plan) -> bool:
        return a.time < b.time * (1 - TIE) or (a.time <= b.time * (1 + TIE) and busy(a) < busy(b) * (1 - TIE))

    counts = [0] * len(sizes)
    best = plan_for(counts)
    while True:
        moves = []
        for g, size in enumerate(sizes):
            for step in (-1, 1):
                if 0 <= counts[g] + step <= size:
                    trial = counts.copy()
                    trial[g] += step
                    moves.append((trial, plan_for(trial)))
        good = [m for m in moves if better(m[1], best)]
        if not good:
            return best
        fastest = min(m[1].time for m in good)
        good = [m for m in good if m[1].time <= fastest * (1 + TIE)]
        least = min(busy(m[1]) for m in good)
        # Still tied: the move leaving fewest experts on the CPU ("fetch" warms the cache).
        counts, best = min((m for m in good if busy(m[1]) <= least * (1 + TIE)), key=lambda m: sum(m[0]))


def _is_hit(w: ExpertWork, cost: CostModel) -> bool:
    # On a CPU-only machine host RAM is the slot tier, so a host expert is already where it runs.
    return w.where == "device" or (cost.cpu_only and w.where == "host")


def decider(cost: CostModel, exact_up_to: int = 6):
    """The engine's hook: missing experts of one layer step -> {expert: "fetch" | "cpu"}.
    Exact search for a few misses (decode), greedy beyond (prefill), to stay cheap per layer."""

    def decide(work: list[ExpertWork]) -> dict:
        search = "auto" if len(work) <= exact_up_to else "greedy"
        return schedule(work, cost, allow_cpu=True, search=search).assignment

    return decide
