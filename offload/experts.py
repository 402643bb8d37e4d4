"""Routed expert execution, behind one replaceable interface.

The MoE block routes tokens and hands the expert work to an `ExpertExecutor`:
`executor(layer, hidden [N, H], ids [N, K], weights [N, K], probs) -> [N, H]`.
`ResidentExperts` keeps every expert on the compute device; the offloaded
engine (offload/engine.py) implements the same call with caches and a tiered
store. Both route, compute and combine through offload/grouped.py, so their
arithmetic (and output) is identical.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .formats import ExpertFormat
from .grouped import GroupedKernel, HostTransfers, combine, grouped_kernel, route
from .kernels import expert_kernel
from .stats import ExpertStats

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def gating(cfg):
    """The family's expert gating glu(gate, up) for this config (GPT-OSS's clamped SwiGLU), or None
    for act(gate) * up: what offload/kernels.py's expert_kernel takes as `glu`."""
    return None if cfg.family.glu is None else cfg.family.glu(cfg)


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, H], ids and weights [N, K], router probs [N, E] -> [N, H]."""


class ResidentExperts:
    """Every routed expert held on the compute device: per layer, one slot per expert."""

    def __init__(self, pools: dict, grouped: GroupedKernel, stats: ExpertStats | None = None):
        self.pools = pools  # layer -> SlotPool of E slots, in the model's expert format
        self.grouped = grouped
        self.stats = stats or ExpertStats(pools)

    @classmethod
    def load(cls, checkpoint, fmt: ExpertFormat, device: torch.device, stats: ExpertStats,
             progress=None) -> "ResidentExperts":
        """Read every expert into place; `progress` (a tqdm bar, or None) is advanced by the bytes read."""
        from .cache.store import ExpertReader, SlotPool

        cfg = checkpoint.config
        # Experts are read with pread straight into their final place (through one
        # staging slot for a GPU): no mmap, so the file's pages never count as our RSS,
        # and the peak is the result plus one expert.
        reader = ExpertReader(checkpoint.expert_extents, checkpoint.shard_files())
        staging = None if device.type == "cpu" else SlotPool(1, fmt, torch.device("cpu"))
        pools = {}
        try:
            for layer in cfg.moe_layers:
                pools[layer] = pool = SlotPool(cfg.num_experts, fmt, device)
                for expert in range(cfg.num_experts):
                    if staging is None:
                        n = reader.read(layer, expert, pool.targets(expert))
                    else:
                        n = reader.read(layer, expert, staging.targets(0))
                        pool.data[expert].copy_(staging.data[0])
                    if progress is not None:
                        progress.update(n)
        finally:
            reader.close()
        act, glu = ACT[cfg.hidden_act], gating(cfg)
        return cls(pools, grouped_kernel(fmt, device, expert_kernel(fmt, device, act, glu), act, glu), stats)

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        pool = self.pools[layer]
        routes = route(ids, weights, pool.slots)  # rows grouped by expert, on the device
        x = hidden[routes.tokens]  # [M, H]
        if self.grouped.fused:  # one grouped call over the layer's stack, no host sync
            y = self.grouped.all(x, pool.data, routes.offs)
        else:  # the format's kernel per expert, from the offsets read back once
            y = self.grouped.loop(x, HostTransfers.read(routes.offs), pool.__getitem__)
        self.stats.count_hits(layer, routes.offs)  # resident: every request is a hit
        return combine(routes, y, hidden.dtype)  # [N, H]

    def nbytes(self) -> int:
        return sum(pool.nbytes for pool in self.pools.values())
