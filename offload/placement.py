"""Where the experts go, decided once from the budgets: how many expert slots
the compute device gets, how many the pinned host tier gets, and whether
everything simply fits (resident mode).

Budgets: `gpu_memory` covers everything on the GPU (resident weights plus
expert slots); `cpu_memory` covers host RAM for expert weights only (the
resident weights are counted apart). On a CPU device the two tiers are one
RAM cache in front of disk, sized by `cpu_memory`. A budget left as None is
measured: free memory minus a stated margin.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import psutil
import torch

from .config import ModelConfig, RuntimeConfig
from .errors import OffloadError
from .formats import ExpertFormat, parse_experts

GiB = 1 << 30
# Measured budgets keep this much back: the OS, activations, the KV cache and allocator slack.
HOST_MARGIN = 2 * GiB
DEVICE_MARGIN = 1 * GiB


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass(frozen=True)
class Placement:
    mode: str  # "resident": all experts on the compute device; "offloaded": tiered store
    device_type: str
    expert_bytes: int  # one routed expert in the compute dtype
    total_experts: int  # routed experts over all sparse layers
    sparse_layers: int
    resident_bytes: int  # non-expert weights on the compute device
    device_slots: int  # experts held where they are computed (GPU slots, or the RAM cache on a CPU)
    host_slots: int  # pinned host RAM tier in front of disk (GPU only; 0 on a CPU)
    split: str = "layer"  # slots in equal per-layer shares, or one "global" pool (both tiers)
    expert_format: str = ""  # "bf16", "int8", "int4-g32", ... (offload/formats.py)

    def describe(self) -> str:
        lossy = self.expert_format.startswith("int")
        what = f"{self.expert_format} experts" + (" (quantized, lossy)" if lossy else "") if self.expert_format else "experts"
        if self.mode == "resident":
            return (f"all {self.total_experts} {what} resident on {self.device_type} "
                    f"({fmt_bytes(self.total_experts * self.expert_bytes)}), "
                    f"other weights {fmt_bytes(self.resident_bytes)}")
        where = "RAM cache" if self.device_type == "cpu" else "GPU slots"
        text = (f"{self.device_slots}/{self.total_experts} {what} in the {where} "
                f"({fmt_bytes(self.device_slots * self.expert_bytes)})")
        if self.device_type != "cpu":
            text += f", {self.host_slots} in pinned host RAM ({fmt_bytes(self.host_slots * self.expert_bytes)})"
        if self.split == "global":
            text += ", one pool shared by all layers"
        if min(self.total_experts, max(self.device_slots, self.host_slots)) < self.total_experts:
            text += ", the rest read from disk"
        return text + f"; other weights {fmt_bytes(self.resident_bytes)}"


def expert_format(cfg: ModelConfig, dtype: torch.dtype, experts=None) -> ExpertFormat:
    """The format of `experts` ("int4", "int8", None = dense in `dtype`) at the model's shape."""
    kind, group = parse_experts(experts)
    return ExpertFormat(kind, cfg.hidden_size, cfg.moe_intermediate_size, dtype, group)


def expert_bytes(cfg: ModelConfig, dtype: torch.dtype, experts=None) -> int:
    return expert_format(cfg, dtype, experts).nbytes


def resident_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the non-expert weights, from the model built on the meta device."""
    from .models.decoder import MoECausalLM

    with torch.device("meta"):  # nothing allocated, however large the config says the model is
        model = MoECausalLM(cfg)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def plan(cfg: ModelConfig, options: RuntimeConfig, device: torch.device, dtype: torch.dtype,
         resident_bytes: int, host_free: int | None = None, device_free: int | None = None,
         fmt: ExpertFormat | None = None) -> Placement:
    """`host_free` and `device_free` (bytes) are measured here when None; the simulator
    passes a hardware profile's memory instead, so it plans exactly as a run on that machine.
    Slots are sized by `fmt`, the experts' format (default: dense in `dtype`)."""
    fmt = fmt or expert_format(cfg, dtype)
    per_expert = fmt.nbytes
    layers = sum(cfg.sparse_layers)
    total = layers * cfg.num_experts

    def slots(budget: int, split: str) -> int:
        # Split per layer, slots come in equal shares: allocate no remainder that no layer could use.
        unit = layers if split == "layer" else 1
        return min(total, max(0, budget) // per_expert) // unit * unit

    def common(split: str) -> dict:
        return dict(device_type=device.type, expert_bytes=per_expert, total_experts=total, sparse_layers=layers,
                    resident_bytes=resident_bytes, split=split, expert_format=fmt.name)

    def resident() -> Placement:
        return Placement("resident", device_slots=total, host_slots=0, **common("layer"))

    if device.type == "cpu":
        budget = options.cpu_memory
        measured = budget is None
        if measured:
            budget = _host_free(host_free) - resident_bytes - HOST_MARGIN
        split = _split(options.cache_split, slots(budget, "layer"), _minimum(cfg, "layer"))
        ram_slots = slots(budget, split)
        if measured and ram_slots >= total:
            return resident()
        _check(ram_slots, _minimum(cfg, split), per_expert, "cpu_memory", 0, measured, budget, split)
        return Placement("offloaded", device_slots=ram_slots, host_slots=0, **common(split))

    free = torch.cuda.mem_get_info(device)[0] if device_free is None else device_free
    gpu_budget = options.gpu_memory
    gpu_measured = gpu_budget is None
    if gpu_measured:
        gpu_budget = free - DEVICE_MARGIN
    if options.gpu_memory is not None and options.gpu_memory > free:
        raise OffloadError(f"gpu_memory={fmt_bytes(options.gpu_memory)} but only {fmt_bytes(free)} is free on {device}")
    host_budget = options.cpu_memory
    if host_budget is None:
        host_budget = _host_free(host_free) - resident_bytes - HOST_MARGIN
    # Both tiers share one split: per-layer shares only when each tier's share holds a token's experts
    # (a T4 fits 2 int8 Mixtral experts per layer on the GPU but not in its 12.7 GB of RAM).
    layer_slots = min(slots(gpu_budget - resident_bytes, "layer"), slots(host_budget, "layer"))
    split = _split(options.cache_split, layer_slots, _minimum(cfg, "layer"))
    device_slots = slots(gpu_budget - resident_bytes, split)
    if gpu_measured and options.cpu_memory is None and device_slots >= total:
        return resident()
    minimum = _minimum(cfg, split)
    _check(device_slots, minimum, per_expert, "gpu_memory", resident_bytes, gpu_measured, gpu_budget, split)
    host_slots = slots(host_budget, split)
    _check(host_slots, minimum, per_expert, "cpu_memory", 0, options.cpu_memory is None, host_budget, split)
    return Placement("offloaded", device_slots=device_slots, host_slots=host_slots, **common(split))


def _split(asked: str, layer_slots: int, one_token_everywhere: int) -> str:
    """"auto": per-layer shares when every layer's share holds one token's experts, else one
    global pool whose slots the layers take turns with (Mixtral in fp16 on a 16 GB GPU)."""
    if asked != "auto":
        return asked
    return "layer" if layer_slots >= one_token_everywhere else "global"


def _minimum(cfg: ModelConfig, split: str) -> int:
    """One token's experts must fit at once: top_k in each layer's share, or top_k in the global pool."""
    return cfg.top_k * sum(cfg.sparse_layers) if split == "layer" else cfg.top_k


def _host_free(given: int | None) -> int:
    return psutil.virtual_memory().available if given is None else given


def _check(slots: int, minimum: int, per_expert: int, what: str, resident: int, measured: bool, budget: int,
           split: str = "global"):
    if slots >= minimum:
        return
    need = resident + minimum * per_expert
    source = "the free memory measured" if measured else f"{what}={fmt_bytes(budget)}"
    parts = f"{minimum} expert slots (one token's top_k experts) x {fmt_bytes(per_expert)}"
    if resident:
        parts = f"the resident weights ({fmt_bytes(resident)}) plus " + parts
    other = " (or use cache_split='global', which needs top_k slots in all)" if split == "layer" else ""
    raise OffloadError(f"{source} is too small: it needs at least {fmt_bytes(need)} for {parts}; "
                       f"raise {what} to at least {fmt_bytes(need)}{other}")


def memory_available() -> int:
    """Bytes this process may still fill: free RAM, or less under a cgroup memory limit
    (v2 memory.max or v1 memory.limit_in_bytes), where the page cache counts too."""
    available = psutil.virtual_memory().available
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return available
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            files = (f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current")
        elif "memory" in controllers.split(","):
            files = (f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                     f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes")
        else:
            continue
        try:
            limit, used = (Path(p).read_text().strip() for p in files)
        except OSError:
            continue
        if limit.isdigit() and used.isdigit():
            available = min(available, int(limit) - int(used))
    return available


def page_cache_too_small(checkpoint) -> bool:
    """Whether the kernel's page cache cannot hold the checkpoint beside us: then it only duplicates
    the expert cache (each read expert held twice, evicting each other), so reads drop their pages."""
    on_disk = sum(f.stat().st_size for f in checkpoint.shard_files())
    return on_disk > memory_available()
