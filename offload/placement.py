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

import psutil
import torch

from .config import ModelConfig, RuntimeConfig
from .errors import OffloadError

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

    def describe(self) -> str:
        if self.mode == "resident":
            return (f"all {self.total_experts} experts resident on {self.device_type} "
                    f"({fmt_bytes(self.total_experts * self.expert_bytes)}), "
                    f"other weights {fmt_bytes(self.resident_bytes)}")
        where = "RAM cache" if self.device_type == "cpu" else "GPU slots"
        text = (f"{self.device_slots}/{self.total_experts} experts in the {where} "
                f"({fmt_bytes(self.device_slots * self.expert_bytes)})")
        if self.device_type != "cpu":
            text += f", {self.host_slots} in pinned host RAM ({fmt_bytes(self.host_slots * self.expert_bytes)})"
        if min(self.total_experts, max(self.device_slots, self.host_slots)) < self.total_experts:
            text += ", the rest read from disk"
        return text + f"; other weights {fmt_bytes(self.resident_bytes)}"


def expert_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * torch.empty((), dtype=dtype).element_size()


def resident_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the non-expert weights, from the model built on the meta device."""
    from accelerate import init_empty_weights

    from .models.decoder import MoECausalLM

    with init_empty_weights():
        model = MoECausalLM(cfg)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def plan(cfg: ModelConfig, options: RuntimeConfig, device: torch.device, dtype: torch.dtype,
         resident_bytes: int) -> Placement:
    per_expert = expert_bytes(cfg, dtype)
    layers = sum(cfg.sparse_layers)
    total = layers * cfg.num_experts
    minimum = cfg.top_k * layers  # top_k slots per layer: one token's experts for every layer
    # Split per layer, slots come in equal shares: allocate no remainder that no layer could use.
    unit = layers if options.cache_split == "layer" else 1
    common = dict(device_type=device.type, expert_bytes=per_expert, total_experts=total, sparse_layers=layers,
                  resident_bytes=resident_bytes)

    if device.type == "cpu":
        budget = options.cpu_memory
        measured = budget is None
        if measured:
            budget = psutil.virtual_memory().available - resident_bytes - HOST_MARGIN
        slots = min(total, max(0, budget) // per_expert) // unit * unit
        if measured and slots >= total:
            return Placement("resident", device_slots=total, host_slots=0, **common)
        _check(slots, minimum, per_expert, "cpu_memory", 0, measured, budget)
        return Placement("offloaded", device_slots=slots, host_slots=0, **common)

    free = torch.cuda.mem_get_info(device)[0]
    gpu_budget = options.gpu_memory
    gpu_measured = gpu_budget is None
    if gpu_measured:
        gpu_budget = free - DEVICE_MARGIN
    if options.gpu_memory is not None and options.gpu_memory > free:
        raise OffloadError(f"gpu_memory={fmt_bytes(options.gpu_memory)} but only {fmt_bytes(free)} is free on {device}")
    device_slots = min(total, max(0, gpu_budget - resident_bytes) // per_expert) // unit * unit
    if gpu_measured and options.cpu_memory is None and device_slots >= total:
        return Placement("resident", device_slots=total, host_slots=0, **common)
    _check(device_slots, minimum, per_expert, "gpu_memory", resident_bytes, gpu_measured, gpu_budget)
    host_budget = options.cpu_memory
    if host_budget is None:
        host_budget = psutil.virtual_memory().available - resident_bytes - HOST_MARGIN
    host_slots = min(total, max(0, host_budget) // per_expert) // unit * unit
    _check(host_slots, minimum, per_expert, "cpu_memory", 0, options.cpu_memory is None, host_budget)
    return Placement("offloaded", device_slots=device_slots, host_slots=host_slots, **common)


def _check(slots: int, minimum: int, per_expert: int, what: str, resident: int, measured: bool, budget: int):
    if slots >= minimum:
        return
    need = resident + minimum * per_expert
    source = "the free memory measured" if measured else f"{what}={fmt_bytes(budget)}"
    parts = f"{minimum} expert slots (top_k per MoE layer) x {fmt_bytes(per_expert)}"
    if resident:
        parts = f"the resident weights ({fmt_bytes(resident)}) plus " + parts
    raise OffloadError(f"{source} is too small: it needs at least {fmt_bytes(need)} for {parts}; "
                       f"raise {what} to at least {fmt_bytes(need)}")
