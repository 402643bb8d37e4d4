"""`offload simulate`: replay a routing trace through the runtime's own cache
policies, predictors and scheduler against a hardware profile, and model the
decode speed of a configuration before anyone downloads the model.

What is shared with the engine, not copied: `ExpertCache` and the policies
(cache/), the predictors and `rank` (predictors/), and `scheduler.schedule`,
which decides hit / fetch / CPU per expert exactly as `profile=` makes the
engine decide. What is modeled: each layer step's time is the scheduler's
plan time plus the non-expert work of the layer (attention and the rest, at
the batch-1 throughput); prefetches for the next layer use the link (on a
CPU, the disk) once the layer's own fetches are done, and whatever outlasts
the layer delays the next one, as the engine waits for them.

Sizes come from a model shape (a released config), routing from the trace;
when the model has more MoE layers than the trace, the trace's layers repeat
(layer m replays trace layer m mod L).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache.policy import make_policy
from .cache.state import ExpertCache
from .errors import OffloadError
from .predictors.base import rank
from .profile import HardwareProfile
from .scheduler import CostModel, ExpertWork, schedule

GiB = 1 << 30


@dataclass(frozen=True)
class Shape:
    """What the simulator needs of a model: sizes, from its released config."""

    name: str
    hidden: int
    intermediate: int  # routed expert width
    layers: int  # MoE layers
    experts: int
    top_k: int
    other_params: int  # non-expert parameters (attention, embeddings, shared experts, ...)
    weight_bytes: float = 2.0  # bf16

    @property
    def expert_bytes(self) -> float:
        return 3 * self.hidden * self.intermediate * self.weight_bytes


SHAPES = {
    # config.json of mistralai/Mixtral-8x7B-v0.1: 32 layers, 8 experts top-2, H 4096, I 14336;
    # 46.7B parameters of which 32 x 8 x 3 x 4096 x 14336 = 45.1B in experts.
    "mixtral-8x7b": Shape("mixtral-8x7b", 4096, 14336, 32, 8, 2, 1_600_000_000),
    # Qwen/Qwen1.5-MoE-A2.7B: 24 layers, 60 experts top-4, H 2048, moe I 1408, shared expert I 5632;
    # 14.3B parameters, 24 x 60 x 3 x 2048 x 1408 = 12.5B in routed experts.
    "qwen1.5-moe-a2.7b": Shape("qwen1.5-moe-a2.7b", 2048, 1408, 24, 60, 4, 1_800_000_000),
    # Qwen/Qwen3-30B-A3B: 48 layers, 128 experts top-8, H 2048, moe I 768;
    # 30.5B parameters, 48 x 128 x 3 x 2048 x 768 = 29.0B in experts.
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", 2048, 768, 48, 128, 8, 1_500_000_000),
}


@dataclass
class SimResult:
    tokens_per_second: float
    hit_rate: float
    disk_bytes_per_token: float
    link_bytes_per_token: float
    cpu_share: float  # share of missed experts computed on the CPU
    prefetch_issued: int
    prefetch_used: int
    device_slots: int
    host_slots: int
    split: str


def slots(shape: Shape, profile: HardwareProfile, gpu_memory: int | None, cpu_memory: int | None) -> tuple[int, int]:
    """(compute-side slots, host slots) from the budgets, or the profile's memory less a margin."""
    total = shape.layers * shape.experts
    resident = shape.other_params * shape.weight_bytes
    host = cpu_memory if cpu_memory is not None else profile.host_memory - 2 * GiB
    if profile.device == "cpu":
        return int(min(total, max(0, host - resident) // shape.expert_bytes)), 0
    device = gpu_memory if gpu_memory is not None else profile.device_memory - GiB
    return (int(min(total, max(0, device - resident) // shape.expert_bytes)),
            int(min(total, max(0, host) // shape.expert_bytes)))


def simulate(trace, profile: HardwareProfile, shape: Shape, policy: str = "lru", scores: dict | None = None,
             cpu: bool = True, gpu_memory: int | None = None, cpu_memory: int | None = None,
             max_tokens: int = 512) -> SimResult:
    """Decode the trace's tokens one by one; `scores` are a predictor's, from
    `predictors.evaluate.all_scores` ({trace layer: {trace layer + 1: [T, E]}})."""
    if (trace.num_experts, trace.top_k) != (shape.experts, shape.top_k):
        raise OffloadError(f"the trace routes top-{trace.top_k} of {trace.num_experts} experts but {shape.name} "
                           f"uses top-{shape.top_k} of {shape.experts}; record a trace of that routing shape")
    device_slots, host_slots = slots(shape, profile, gpu_memory, cpu_memory)
    if device_slots < shape.top_k:
        raise OffloadError(f"{profile.name} cannot hold even {shape.top_k} experts of {shape.name} "
                           f"beside its other weights")
    layers = list(range(shape.layers))
    # Fewer slots than top_k per layer (e.g. Mixtral fp16 on a T4): one pool shared by all layers.
    split = "layer" if device_slots >= shape.top_k * shape.layers else "global"
    device = ExpertCache(device_slots, make_policy(policy), layers, split)
    host = ExpertCache(host_slots, make_policy(policy), layers, split) if host_slots else None
    cost = CostModel(profile, shape.hidden, shape.intermediate, weight_bytes=shape.weight_bytes)
    gflops = profile.device_gflops_1 if profile.device != "cpu" else profile.cpu_gflops_1
    other_seconds = 2 * shape.other_params / shape.layers / (gflops * 1e9)  # per layer, batch 1
    link = profile.h2d_bandwidth or float("inf")
    T = min(trace.num_tokens, max_tokens)
    total = hits = requests = disk = moved = on_cpu = misses = issued = used = 0
    carry = 0.0
    arrived: dict[int, set] = {}  # layer -> experts prefetched for its next step
    for t in range(T):
        for m in layers:
            src = m % trace.num_layers
            if policy == "score":
                device.policy.observe(m, trace.router_probs[t, src].tolist())
            need = [int(e) for e in trace.topk_ids[t, src]]
            used += len(arrived.pop(m, set()) & set(need))
            work = []
            for e in need:
                key = (m, e)
                device.policy.access(key)
                where = "device" if key in device else "host" if host is not None and key in host else "disk"
                work.append(ExpertWork(e, 1, where))
            plan = schedule(work, cost, allow_cpu=cpu and profile.device != "cpu")
            busy = [(m, e) for e in need]
            for w in work:
                if w.where == "device":
                    hits += 1
                    continue
                misses += 1
                if w.where == "disk":
                    disk += shape.expert_bytes
                    if host is not None:  # read into the host tier on the way, whichever side computes
                        host.admit((m, w.expert), busy)
                if plan.assignment[w.expert] == "cpu":
                    on_cpu += 1
                else:
                    moved += shape.expert_bytes if profile.device != "cpu" else 0
                    device.admit((m, w.expert), busy)
            requests += len(need)
            step = plan.time + other_seconds + carry  # carry: last layer's prefetches still arriving
            carry = 0.0
            if scores is not None and m + 1 < shape.layers and (src + 1) % trace.num_layers in scores[src]:
                # Prefetches start when the link (on a CPU, the disk) is done with this layer's own
                # fetches; whatever outlasts the layer delays the next one (the engine waits for them).
                cursor = plan.finish("link") if profile.device != "cpu" else plan.finish("disk")
                nxt = m + 1
                for e in rank(scores[src][(src + 1) % trace.num_layers][t], shape.top_k, shape.top_k):
                    key = (nxt, e)
                    if key in device or not device.can_admit(key, []):
                        continue
                    in_host = host is not None and key in host
                    cursor += shape.expert_bytes / (link if in_host else min(link, profile.disk_bandwidth))
                    device.admit(key, [])
                    arrived.setdefault(nxt, set()).add(e)
                    issued += 1
                    disk += 0 if in_host else shape.expert_bytes
                    moved += shape.expert_bytes if profile.device != "cpu" else 0
                carry = max(0.0, cursor - step)
            total += step
    return SimResult(T / total, hits / requests, disk / T, moved / T, on_cpu / misses if misses else 0.0,
                     issued, used, device_slots, host_slots, split)


def predictor_scores(name: str, fit, test, model=None) -> dict | None:
    """A predictor's scores on `test`, fitted on `fit` where it learns (None for "none")."""
    from .predictors.affinity import AffinityPredictor
    from .predictors.evaluate import all_scores
    from .predictors.learned import LearnedPredictor

    if name == "none":
        return None
    if name == "affinity":
        predictor = AffinityPredictor(test.num_layers, test.num_experts, int(test.token_ids.max()) + 1).fit(fit)
    elif name == "learned":
        if fit.hidden is None:
            raise OffloadError("predictor 'learned' needs a trace recorded with --hidden")
        predictor = LearnedPredictor.train(fit)
    elif name == "gate":
        if model is None or test.hidden is None:
            raise OffloadError("predictor 'gate' needs --model (its routers) and a trace recorded with --hidden")
        from .predictors.gate import GatePredictor, routers_from_checkpoint

        predictor = GatePredictor(routers_from_checkpoint(model))
    else:
        raise OffloadError(f"unknown predictor {name!r}; choose none, gate, learned or affinity")
    return all_scores(predictor, test)
