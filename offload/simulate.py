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

`experts=` ("int8", "int4", "int4-g64", ...) models quantized experts as
`load(experts=...)` runs them: slots are sized by the format's bytes (scales
included), disk reads and copies move those bytes, and the CPU's batch-1
expert speed scales with them (scheduler.CostModel says why; the device's
does not). The non-expert weights stay in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .cache.policy import make_policy
from .cache.state import ExpertCache
from .config import ModelConfig, RuntimeConfig
from .errors import OffloadError
from .formats import ExpertFormat, parse_experts, stored_format
from .kernels import cpu_weight_only
from .models import family_for
from .placement import Placement, expert_format, plan, resident_bytes
from .predictors.base import rank
from .profile import HardwareProfile
from .scheduler import CostModel, ExpertWork, schedule

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
        work = []
        for e in need:
            key = (m, e)
            device.policy.access(key)
            where = "device" if key in device else "host" if host is not None and key in host else "disk"
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
                    host.admit((m, w.expert), busy)
            if decision.assignment[w.expert] == "cpu":
                self.on_cpu += decode
            else:
                self.moved += 0 if self.on_cpu_device else expert_bytes * decode
                device.admit((m, w.expert), busy)
        seconds = decision.time + self.other_seconds(len(tokens)) + self.carry
        self.carry = 0.0
        if decode and self.scores is not None and m + 1 < len(self.layers):
            self.carry = max(0.0, self._prefetch(m, src, tokens[0], decision) - seconds)
        return seconds

    def _prefetch(self, m: int, src: int, t: int, decision) -> float:
        """Fetch the predicted experts of the next layer; when the last of them lands (from this
        layer's start). They start when the link (on a CPU, the disk) is done with this layer's own
        fetches; whatever outlasts the layer delays the next one, as the engine waits for them."""
        nxt_src = (src + 1) % self.trace.num_layers
        cursor = decision.finish("disk" if self.on_cpu_device else "link")
        if nxt_src not in self.scores[src]:
            return cursor
        expert_bytes = self.placement.expert_bytes
        for e in rank(self.scores[src][nxt_src][t], self.top_k, self.top_k):
            key = (m + 1, e)
            if key in self.device or not self.device.can_admit(key, []):
                continue
            in_host = self.host is not None and key in self.host
            cursor += expert_bytes / (self.link if in_host else min(self.link, self.profile.disk_bandwidth))
            self.device.admit(key, [])
            self.arrived.setdefault(m + 1, set()).add(e)
            self.issued += 1
            self.disk += 0 if in_host else expert_bytes
            self.moved += 0 if self.on_cpu_device else expert_bytes
        return cursor

    def result(self, decoded: int, prefill_seconds: float) -> SimResult:
        if decoded == 0:
            raise OffloadError("no decode steps to replay: the trace's sequences are no longer than the prompt")
        return SimResult(decoded / self.time, self.hits / self.requests, self.disk / decoded, self.moved / decoded,
                         self.on_cpu / self.misses if self.misses else 0.0, self.issued, self.used, self.placement,
                         prefill_seconds)


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
