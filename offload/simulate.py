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
the layer delays the next one, as the engine waits for them (the link is
serial: that layer's own fetches queue behind them). From a predictor's
calibrated probabilities (`predictor_scores`) an expert is prefetched only
where its expected gain is positive (offload/prefetch.py `gain`); from raw
scores, the predicted top-k every step.

Sizes come from a model's config.json (shipped for Mixtral-8x7B and two Qwen
MoE models, or any local file or hub id: only config.json is fetched), and
the expert slots from the runtime's own `placement.plan` with the profile's
memory in place of measured free memory, so the simulator plans exactly as a
run on that machine would. Routing comes from the trace; when the model has
more MoE layers than the trace, the trace's layers repeat (MoE layer m
replays trace layer m mod L).

`experts=` ("int8", "int4", "int4-g64", ...) models quantized experts as
`load(experts=...)` runs them: slots are sized by the format's bytes (scales
included), disk reads and copies move those bytes, and the CPU's batch-1
expert speed scales with them (scheduler.CostModel says why; the device's
does not). The non-expert weights stay in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .cache.policy import make_policy
from .cache.state import ExpertCache
from .config import ModelConfig, RuntimeConfig
from .errors import OffloadError
from .formats import ExpertFormat, parse_experts, stored_format
from .kernels import cpu_weight_only
from .models import family_for
from .placement import Placement, expert_format, plan, resident_bytes
from .predictors.base import Predictor, rank
from .predictors.calibrate import Probabilities
from .prefetch import Evictions, MissCost, Prefetcher, gain
from .profile import HardwareProfile
from .scheduler import CostModel, ExpertWork, schedule
from .stats import ExpertCounters

SHAPES_DIR = Path(__file__).parent / "shapes"


def shipped_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape(name: str) -> ModelConfig:
    """A shipped shape's name, a config.json (or the directory holding one), or a hub id
    (only its config.json is downloaded)."""
    raw = _shape_json(name)
    return ModelConfig.from_dict(raw, family_for(raw))


def shape_format(name: str, experts: str | None = None) -> ExpertFormat:
    """The experts' format a run of shape `name` uses with `load(experts=experts)`: as its
    config.json says they are stored (unquantized, written by `offload quantize`, GPT-OSS's
    MXFP4) when `experts` is None, else converted to `experts`, keeping the family's layout
    (biases, interleaved gate/up). In bf16; `simulate` computes in the profile's compute dtype."""
    raw = _shape_json(name)
    cfg = ModelConfig.from_dict(raw, family_for(raw))
    stored = stored_format(raw, cfg.hidden_size, cfg.moe_intermediate_size, torch.bfloat16)
    kind, group = parse_experts(experts)
    if experts is None or (kind, group) == (stored.kind, stored.group_size):
        return stored
    return ExpertFormat(kind, stored.hidden, stored.width, stored.dtype, group, stored.bias, stored.interleaved)


def _shape_json(name: str) -> dict:
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
    return read_json(path, "a model shape is its config.json")


@dataclass
class SimResult:
    tokens_per_second: float  # decode steps only
    hit_rate: float  # of the decode steps' expert requests
    disk_bytes_per_token: float
    link_bytes_per_token: float
    cpu_share: float  # share of missed experts computed on the CPU
    prefetch_issued: int
    prefetch_used: int
    placement: Placement
    prefill_seconds: float = 0.0  # mean modeled prefill time per sequence (0 without prompt_tokens)


def placement_on(cfg: ModelConfig, profile: HardwareProfile, options: RuntimeConfig,
                 experts: str | ExpertFormat | None = None) -> tuple[Placement, ExpertFormat]:
    """Where the runtime would put the experts on the profile's machine, and in which format
    (`experts` as for `load`, None: unquantized; or a format, e.g. from `shape_format`)."""
    device = torch.device(profile.device)
    dtype = options.compute_dtype(cfg.dtype, device)
    try:
        fmt = (replace(experts, dtype=dtype) if isinstance(experts, ExpertFormat)
               else expert_format(cfg, dtype, experts))
        return plan(cfg, options, device, dtype, resident_bytes(cfg, dtype), host_free=profile.host_memory,
                    device_free=profile.device_memory, fmt=fmt), fmt
    except OffloadError as exc:
        raise OffloadError(f"on {profile.name}: {exc}") from None


def simulate(trace, profile: HardwareProfile, cfg: ModelConfig, policy: str = "lru", scores: dict | None = None,
             cpu: bool = True, gpu_memory: int | None = None, cpu_memory: int | None = None,
             max_tokens: int = 512, cache_split: str = "auto", dtype: str | None = None,
             prompt_tokens: int = 0, experts: str | ExpertFormat | None = None) -> SimResult:
    """Decode the trace's tokens one by one; `scores` are a predictor's, from
    `predictors.evaluate.all_scores` ({trace layer: {trace layer + 1: [T, E]}}).

    With `prompt_tokens`, the first that many tokens of each trace sequence are one prefill
    step (every layer's experts with their token counts, as `generate` runs a prompt) and only
    the rest are decode steps: figures then match a run's decode phase after a warm-up.
    `experts`: the experts' format, as `load(experts=...)` takes it ("int8", "int4", "int4-g64";
    None: unquantized), or an ExpertFormat: `shape_format(name)` is the one a shape's experts are
    stored in (a quantized model directory's, GPT-OSS's MXFP4)."""
    if (trace.num_experts, trace.top_k) != (cfg.num_experts, cfg.top_k):
        raise OffloadError(f"the trace routes top-{trace.top_k} of {trace.num_experts} experts but the model "
                           f"uses top-{cfg.top_k} of {cfg.num_experts}; record a trace of that routing shape")
    options = RuntimeConfig(dtype=dtype, gpu_memory=gpu_memory, cpu_memory=cpu_memory, cache_policy=policy,
                            cache_split=cache_split)
    placement, fmt = placement_on(cfg, profile, options, experts)
    replay = _Replay(trace, profile, cfg, placement, fmt, policy, scores, cpu)
    prefill, decoded = [], 0
    for rows in trace.sequences():
        tokens = list(range(rows.start, rows.stop))
        head = min(prompt_tokens, len(tokens) - 1)
        if head > 0:
            prefill.append(replay.step(tokens[:head], decode=False))
        for t in tokens[head:][:max_tokens - decoded]:
            replay.step([t], decode=True)
            decoded += 1
        if decoded >= max_tokens:
            break
    return replay.result(decoded, sum(prefill) / len(prefill) if prefill else 0.0)


class _Replay:
    """The simulated runtime: the engine's caches, the scheduler's decisions, modeled time."""

    def __init__(self, trace, profile, cfg, placement, fmt, policy, scores, cpu):
        self.trace, self.profile, self.placement, self.policy, self.scores = trace, profile, placement, policy, scores
        self.on_cpu_device = profile.device == "cpu"
        # As api.Runtime: no CPU experts for a format the CPU would dequantize on every call (MXFP4).
        self.allow_cpu = cpu and not self.on_cpu_device and cpu_weight_only(fmt)
        self.layers = list(range(placement.sparse_layers))  # MoE positions
        self.device = ExpertCache(placement.device_slots, make_policy(policy), self.layers, placement.split)
        self.host = (ExpertCache(placement.host_slots, make_policy(policy), self.layers, placement.split)
                     if placement.host_slots else None)
        if placement.mode == "resident":  # loaded before the first token
            for key in ((m, e) for m in self.layers for e in range(cfg.num_experts)):
                self.device.admit(key, [])
        self.top_k = cfg.top_k
        # As api.Runtime builds it: the format's bytes per weight (scales included) price copies,
        # disk reads and the CPU's batch-1 expert speed.
        self.cost = CostModel(profile, cfg.hidden_size, cfg.moe_intermediate_size,
                              weight_bytes=fmt.nbytes / (3 * cfg.hidden_size * cfg.moe_intermediate_size))
        # Non-expert work per MoE layer step and token: every resident weight (in the compute dtype,
        # whatever the experts' format) but the embedding table (a lookup, not a matmul; unless
        # tied, when it is also the output matmul).
        dense_bytes = torch.empty((), dtype=fmt.dtype).element_size()
        params = placement.resident_bytes // dense_bytes - (
            0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
        # On a CPU, the batch-1 figure at the dense weights' bytes, by the experts' rule.
        dense = CostModel(profile, cfg.hidden_size, cfg.moe_intermediate_size, weight_bytes=dense_bytes)
        gflops_1, gflops_b = ((dense.cpu_gflops_1, profile.cpu_gflops_batch) if self.on_cpu_device
                              else (profile.device_gflops_1, profile.device_gflops_batch))
        per_layer = 2 * params / len(self.layers)
        self.other_seconds = lambda n: per_layer * n / (min(gflops_b, gflops_1 * n) * 1e9)  # noqa: E731
        self.link = profile.h2d_bandwidth or float("inf")
        self.time = self.hits = self.requests = self.disk = self.moved = self.on_cpu = self.misses = 0
        self.issued = self.used = 0
        self.carry = 0.0  # the last layer's prefetches still arriving
        self.arrived: dict[int, set] = {}  # layer -> experts prefetched for its next step
        # Calibrated scores: prefetch by expected gain (prefetch.py), each miss priced by the
        # scheduler itself, what evictions cost learned as the replay goes.
        self.by_gain = isinstance(scores, Probabilities)
        self.prefetcher = Prefetcher(Predictor(), cfg.top_k, cfg.top_k, calibration=lambda p: p)
        self.counters = ExpertCounters()
        self.miss = MissCost(self.cost, cfg.top_k, self.allow_cpu)
        self.miss_seconds = self.miss.alone
        per_layer, costly = placement.split == "layer", self.miss_seconds["disk"]
        self.evictions = {"device": Evictions(self.device.capacity_for(0), per_layer, costly),
                          "host": Evictions(self.host.capacity_for(0) if self.host else 1, per_layer, costly)}

    def step(self, tokens: list[int], decode: bool) -> float:
        """One forward step over `tokens` (trace positions) through every MoE layer; its modeled seconds."""
        seconds = 0.0
        for m in self.layers:
            seconds += self._layer(m, tokens, decode)
        if decode:
            self.time += seconds
        return seconds

    def _layer(self, m: int, tokens: list[int], decode: bool) -> float:
        trace, device, host = self.trace, self.device, self.host
        src = m % trace.num_layers
        if self.policy == "score":
            device.policy.observe(m, trace.router_probs[tokens, src].mean(axis=0).tolist())
        counts: dict[int, int] = {}
        for t in tokens:
            for e in trace.topk_ids[t, src]:
                counts[int(e)] = counts.get(int(e), 0) + 1
        need = sorted(counts)
        self.used += len(self.arrived.pop(m, set()) & set(need)) if decode else 0
        if self.by_gain and decode:  # how the gain rule's guesses and evictions turned out
            self.prefetcher.settle(m, set(need), {e for e in need if (m, e) in device}, self.counters)
            for e in need:  # what the evictions of these cost
                in_host = host is not None and (m, e) in host
                if (m, e) not in device:
                    self.evictions["device"].requested((m, e), self.miss_seconds["host" if in_host else "disk"])
                if host is not None and not in_host:
                    self.evictions["host"].requested((m, e), self.miss_seconds["disk"] - self.miss_seconds["host"])
        work = []
        present, _ = device.request(m, need)  # the engine's own access step (cache/state.py)
        for e in need:
            key = (m, e)
            where = "device" if e in present else "host" if host is not None and key in host else "disk"
            work.append(ExpertWork(e, counts[e], where))
        decision = schedule(work, self.cost, allow_cpu=self.allow_cpu)
        expert_bytes = self.placement.expert_bytes
        for i, w in enumerate(work):
            # As in the engine: hits are computed first, then the missed experts in turn, each slot
            # free for reuse once its expert is done; what is still to come must not be evicted.
            busy = [(m, later.expert) for later in work[i:] if later.where != "device"]
            hit = w.where == "device"
            if decode:
                self.requests += 1
                self.hits += hit
            if hit:
                continue
            self.misses += decode
            if w.where == "disk":
                self.disk += expert_bytes * decode
                if host is not None:  # read into the host tier on the way, whichever side computes
                    self.evictions["host"].admitted((m, w.expert), host.admit((m, w.expert), busy)[1])
            if decision.assignment[w.expert] == "cpu":
                self.on_cpu += decode
            else:
                self.moved += 0 if self.on_cpu_device else expert_bytes * decode
                self.evictions["device"].admitted((m, w.expert), device.admit((m, w.expert), busy)[1])
        waited, self.carry = self.carry, 0.0
        seconds = decision.time + self.other_seconds(len(tokens)) + waited
        if decode and self.scores is not None and m + 1 < len(self.layers):
            # The link (disk) is serial: this layer's own fetches ran after the prefetches it waited
            # for, and its prefetches for the next layer start after both.
            prefetch = self._prefetch_by_gain if self.by_gain else self._prefetch
            self.carry = max(0.0, prefetch(m, src, tokens[0], decision, seconds, waited) - seconds)
        return seconds

    def _prefetch(self, m: int, src: int, t: int, decision, seconds: float, start: float) -> float:
        """Fetch the predicted experts of the next layer; when the last of them lands (from this
        layer's start). They start when the link (on a CPU, the disk) is done with this layer's own
        fetches, which started once the prefetches this layer waited for (`start`) had landed;
        whatever outlasts the layer delays the next one, as the engine waits for them."""
        nxt_src = (src + 1) % self.trace.num_layers
        cursor = start + decision.finish("disk" if self.on_cpu_device else "link")
        if nxt_src not in self.scores[src]:
            return cursor
        expert_bytes = self.placement.expert_bytes
        for e in rank(self.scores[src][nxt_src][t], self.top_k, self.top_k):
            key = (m + 1, e)
            if key in self.device or not self.device.can_admit(key, []):
                continue
            in_host = self.host is not None and key in self.host
            cursor += expert_bytes / (self.link if in_host else min(self.link, self.profile.disk_bandwidth))
            self._admit(key, in_host)
            self.arrived.setdefault(m + 1, set()).add(e)
            self.issued += 1
            self.disk += 0 if in_host else expert_bytes
            self.moved += 0 if self.on_cpu_device else expert_bytes
        return cursor

    def _prefetch_by_gain(self, m: int, src: int, t: int, decision, seconds: float, start: float) -> float:
        """As `_prefetch`, but an expert goes only where `prefetch.gain` is positive: its probability
        (calibrated, corrected online) times the miss it saves, less the link time it takes beyond
        what is left of this layer's step and the expected misses its evictions cause."""
        nxt_src = (src + 1) % self.trace.num_layers
        cursor = start + decision.finish("disk" if self.on_cpu_device else "link")
        if nxt_src not in self.scores[src]:
            return cursor
        target = m + 1
        p = self.prefetcher.probabilities(target, self.scores[src][nxt_src][t])  # [E]
        # Where each expert of the next layer would be a miss from, as the prefetches below change it.
        where = np.array([0 if (target, e) in self.device else 1 if self.host is not None and (target, e) in self.host
                          else 2 for e in range(len(p))])  # 0 device, 1 host, 2 disk
        # Candidates by what they are worth, a miss from disk above a likelier one from host RAM;
        # at most top_k fetched ahead, as the engine's limit.
        alone = np.array([0.0, self.miss_seconds["host"], self.miss_seconds["disk"]])[where]
        ranked = [e for e in np.argsort(-p * alone, kind="stable").tolist() if where[e] > 0 and p[e] > 0]
        self.prefetcher.candidates(target, ranked[:self.top_k], p)
        expert_bytes = self.placement.expert_bytes
        issued = 0
        for e in ranked:
            key = (target, e)
            if issued == self.top_k:
                break
            if not self.device.can_admit(key, []):
                continue
            in_host = where[e] == 1
            fetch = expert_bytes / (self.link if in_host else min(self.link, self.profile.disk_bandwidth))
            miss = self._miss(e, p, where)
            if gain(p[e], fetch, miss, seconds - cursor, self._eviction_loss(key, in_host, p)) <= 0:
                continue
            cursor += fetch
            self._admit(key, in_host)
            where[e] = 0
            issued += 1
            self.prefetcher.issued(target, e)
            self.arrived.setdefault(target, set()).add(e)
            self.issued += 1
            self.disk += 0 if in_host else expert_bytes
            self.moved += 0 if self.on_cpu_device else expert_bytes
        return cursor

    def _miss(self, e: int, p, where) -> float:
        """What expert e's miss adds to the next layer's step, given that it is needed, beside the
        other misses the prediction expects there (its probabilities of the uncached experts, scaled
        to the top_k - 1 others a token chooses)."""
        others = p * (where > 0)
        others[e] = 0.0
        scale = (self.top_k - 1) / max(float(p.sum() - p[e]), 1e-9)
        return self.miss.of("host" if where[e] == 1 else "disk", scale * others[where == 1].sum(),
                            scale * others[where == 2].sum())

    def _eviction_loss(self, key, in_host: bool, p) -> float:
        """Expected seconds lost to what prefetching `key` pushes out of the device (at least the
        prediction's chance that its victim, of the same layer, is needed next) and, read from disk,
        out of the host tier (prefetch.Evictions)."""
        loss = 0.0
        victim = _victim(self.device, key)
        if victim is not None:
            loss = self.evictions["device"].seconds()
            if victim[0] == key[0]:
                where = "host" if self.host is not None and victim in self.host else "disk"
                loss = max(loss, float(p[victim[1]]) * self.miss_seconds[where])
        if not in_host and self.host is not None and _victim(self.host, key) is not None:
            loss += self.evictions["host"].seconds()
        return loss

    def _admit(self, key, in_host: bool) -> None:
        """A prefetch lands in a device slot; read from disk, it passes through the host tier, as a
        demand fetch does (the engine reads every disk expert into a host slot first)."""
        if not in_host and self.host is not None:
            self.evictions["host"].admitted(key, self.host.admit(key, [])[1])
        self.evictions["device"].admitted(key, self.device.admit(key, [])[1])

    def result(self, decoded: int, prefill_seconds: float) -> SimResult:
        if decoded == 0:
            raise OffloadError("no decode steps to replay: the trace's sequences are no longer than the prompt")
        return SimResult(decoded / self.time, self.hits / self.requests, self.disk / decoded, self.moved / decoded,
                         self.on_cpu / self.misses if self.misses else 0.0, self.issued, self.used, self.placement,
                         prefill_seconds)


def _victim(cache: ExpertCache, key):
    """The expert admitting `key` into `cache` would evict now (None: a slot is free)."""
    group = key[0] if cache.split == "layer" else None
    return cache.policy.victim(cache.members[group]) if not cache.free[group] else None


def predictor_scores(name: str, fit, test, model=None) -> dict | None:
    """A predictor's scores on `test`, fitted on `fit` where it learns (None for "none").

    `NAME` gives probabilities, calibrated on `fit` (predictors/calibrate.py), and the simulator
    prefetches by expected gain; `NAME:topk` gives raw scores, and it fetches the predicted top-k
    every step whatever they cost."""
    from .predictors.calibrate import calibrated_scores
    from .predictors.evaluate import PREDICTORS, all_scores, predictor_factory

    base, _, mode = name.partition(":")
    if base not in PREDICTORS or mode not in ("", "topk"):
        raise OffloadError(f"unknown predictor {name!r}; choose {', '.join(PREDICTORS)}, or NAME:topk to fetch "
                           "the predicted top-k every step instead of by expected gain")
    if base == "none":
        return None
    make = predictor_factory(base, test, model)
    return all_scores(make(fit), test) if mode == "topk" else calibrated_scores(make, fit, test)
