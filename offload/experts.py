"""Routed expert execution, behind one replaceable interface.

The MoE block routes tokens and hands the expert work to an `ExpertExecutor`:
`executor(layer, hidden [N, H], ids [N, K], weights [N, K], probs) -> [N, H]`.
`ResidentExperts` keeps every expert on the compute device; the offloaded
engine (offload/engine.py) implements the same call with caches and a tiered
store. Both use `contribution` and `accumulate`, so their arithmetic (and
output) is identical.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .formats import ExpertFormat
from .kernels import Kernel, expert_kernel
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


def contribution(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: int,
                 packed: tuple, kernel: Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to `expert` and weight * expert(x) for them: ([n], [n, H]).

    hidden [N, H]; ids, weights [N, K]; `packed` is the expert in its format, `kernel` the
    format's FFN (offload/kernels.py). Tokens are gathered in (k slot, token) order, as
    transformers does. The intermediates are allocated per call: a preallocated workspace
    measured 1-8% slower at 1-64 tokens on the CPU (scripts/bench_cpu_experts.py keeps it,
    to measure again elsewhere)."""
    k_slot, token = torch.where(ids.T == expert)  # [n], [n]
    y = kernel(hidden[token], packed)  # [n, H]
    return token, y * weights[token, k_slot, None]


def accumulate(hidden: torch.Tensor, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum the experts' contributions in ascending expert order, whatever order
    they were computed in, so every placement adds in the same order as the
    resident model (and transformers) and the result is bit-identical."""
    out = torch.zeros_like(hidden)  # [N, H]
    for expert in sorted(parts):
        token, y = parts[expert]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class ResidentExperts:
    """Every routed expert held on the compute device: per layer, one slot per expert."""

    def __init__(self, pools: dict, kernel: Kernel, stats: ExpertStats | None = None):
        self.pools = pools  # layer -> SlotPool of E slots, in the model's expert format
        self.kernel = kernel
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
        return cls(pools, expert_kernel(fmt, device, ACT[cfg.hidden_act], gating(cfg)), stats)

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        pool = self.pools[layer]
        experts = torch.unique(ids).tolist()
        self.stats[layer].hits += len(experts)  # resident: every request is a hit
        parts = {e: contribution(hidden, ids, weights, e, pool[e], self.kernel) for e in experts}
        return accumulate(hidden, parts)

    def nbytes(self) -> int:
        return sum(pool.nbytes for pool in self.pools.values())
