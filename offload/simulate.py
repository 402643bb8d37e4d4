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

Sizes come from a model's config.json (shipped for Mixtral-8x7B and two Qwen
MoE models, or any local file or hub id: only config.json is fetched), and
the expert slots from the runtime's own `placement.plan` with the profile's
memory in place of measured free memory, so the simulator plans exactly as a
run on that machine would. Routing comes from the trace; when the model has
more MoE layers than the trace, the trace's layers repeat (MoE layer m
replays trace layer m mod L).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache.policy import make_policy
from .cache.state import ExpertCache
from .config import ModelConfig, RuntimeConfig
from .errors import OffloadError
from .models import family_for
from .placement import Placement, plan, resident_bytes
from .predictors.base import rank
from .profile import HardwareProfile
from .scheduler import CostModel, ExpertWork, schedule

SHAPES_DIR = Path(__file__).parent / "shapes"


def shipped_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape(name: str) -> ModelConfig:
    """A shipped shape's name, a config.json (or the directory holding one), or a hub id
    (only its config.json is downloaded)."""
    from .checkpoint import read_json, resolve_model_path

    path = SHAPES_DIR / f"{name}.json"
    if not path.exists():
        path = Path(name).expanduser()
        if not path.exists() and name.count("/") != 1:
            raise OffloadError(f"unknown shape {name!r}; choose one of {', '.join(shipped_shapes())}, "
                               "or pass a config.json, a model directory or a hub id")
        if not path.exists():
            path = resolve_model_path(name, patterns=["config.json"])
        if path.is_dir():
            path = path / "config.json"
    raw = read_json(path, "a model shape is its config.json")
    return ModelConfig.from_dict(raw, family_for(raw))


@dataclass
class SimResult:
    tokens_per_second: float
    hit_rate: float
    disk_bytes_per_token: float
    link_bytes_per_token: float
    cpu_share: float  # share of missed experts computed on the CPU
    prefetch_issued: int
    prefetch_used: int
    placement: Placement


def placement_on(cfg: ModelConfig, profile: HardwareProfile, options: RuntimeConfig) -> tuple[Placement, torch.dtype]:
    """Where the runtime would put the experts on the profile's machine, and in which dtype."""
    device = torch.device(profile.device)
    dtype = options.compute_dtype(cfg.dtype, device)
    try:
        return plan(cfg, options, device, dtype, resident_bytes(cfg, dtype), host_free=profile.host_memory,
                    device_free=profile.device_memory), dtype
    except OffloadError as exc:
        raise OffloadError(f"on {profile.name}: {exc}") from None


def simulate(trace, profile: HardwareProfile, cfg: ModelConfig, policy: str = "lru", scores: dict | None = None,
             cpu: bool = True, gpu_memory: int | None = None, cpu_memory: int | None = None,
             max_tokens: int = 512, cache_split: str = "auto", dtype: str | None = None) -> SimResult:
    """Decode the trace's tokens one by one; `scores` are a predictor's, from
    `predictors.evaluate.all_scores` ({trace layer: {trace layer + 1: [T, E]}})."""
    if (trace.num_experts, trace.top_k) != (cfg.num_experts, cfg.top_k):
        raise OffloadError(f"the trace routes top-{trace.top_k} of {trace.num_experts} experts but the model "
                           f"uses top-{cfg.top_k} of {cfg.num_experts}; record a trace of that routing shape")
    options = RuntimeConfig(dtype=dtype, gpu_memory=gpu_memory, cpu_memory=cpu_memory, cache_policy=policy,
                            cache_split=cache_split)
    placement, torch_dtype = placement_on(cfg, profile, options)
    on_cpu_device = profile.device == "cpu"
    layers = list(range(placement.sparse_layers))  # MoE positions
    device = ExpertCache(placement.device_slots, make_policy(policy), layers, placement.split)
    host = (ExpertCache(placement.host_slots, make_policy(policy), layers, placement.split)
            if placement.host_slots else None)
    weight_bytes = torch.empty((), dtype=torch_dtype).element_size()
    expert_bytes = placement.expert_bytes
    cost = CostModel(profile, cfg.hidden_size, cfg.moe_intermediate_size, weight_bytes=weight_bytes)
    # Non-expert work per MoE layer step at batch 1: every resident weight but the embedding
    # table (a lookup, not a matmul; unless tied, when it is also the output matmul).
    params = placement.resident_bytes // weight_bytes - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    gflops = profile.cpu_gflops_1 if on_cpu_device else profile.device_gflops_1
    other_seconds = 2 * params / len(layers) / (gflops * 1e9)
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
            decision = schedule(work, cost, allow_cpu=cpu and not on_cpu_device)
            busy = [(m, e) for e in need]
            for w in work:
                if w.where == "device":
                    hits += 1
                    continue
                misses += 1
                if w.where == "disk":
                    disk += expert_bytes
                    if host is not None:  # read into the host tier on the way, whichever side computes
                        host.admit((m, w.expert), busy)
                if decision.assignment[w.expert] == "cpu":
                    on_cpu += 1
                else:
                    moved += 0 if on_cpu_device else expert_bytes
                    device.admit((m, w.expert), busy)
            requests += len(need)
            step = decision.time + other_seconds + carry  # carry: last layer's prefetches still arriving
            carry = 0.0
            if scores is not None and m + 1 < len(layers) and (src + 1) % trace.num_layers in scores[src]:
                # Prefetches start when the link (on a CPU, the disk) is done with this layer's own
                # fetches; whatever outlasts the layer delays the next one (the engine waits for them).
                cursor = decision.finish("disk" if on_cpu_device else "link")
                nxt = m + 1
                for e in rank(scores[src][(src + 1) % trace.num_layers][t], cfg.top_k, cfg.top_k):
                    key = (nxt, e)
                    if key in device or not device.can_admit(key, []):
                        continue
                    in_host = host is not None and key in host
                    cursor += expert_bytes / (link if in_host else min(link, profile.disk_bandwidth))
                    device.admit(key, [])
                    arrived.setdefault(nxt, set()).add(e)
                    issued += 1
                    disk += 0 if in_host else expert_bytes
                    moved += 0 if on_cpu_device else expert_bytes
                carry = max(0.0, cursor - step)
            total += step
    return SimResult(T / total, hits / requests, disk / T, moved / T, on_cpu / misses if misses else 0.0,
                     issued, used, placement)


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
