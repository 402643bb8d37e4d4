"""Routed expert execution, behind one replaceable interface.

The MoE block routes tokens and hands the expert work to an `ExpertExecutor`:
`executor(layer, hidden [N, H], ids [N, K], weights [N, K], probs) -> [N, H]`.
`ResidentExperts` keeps every expert on the compute device; the offloaded
engine (offload/engine.py) implements the same call with caches and a tiered
store. Both use `contribution` and `accumulate`, so their arithmetic (and
output) is identical.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .stats import ExpertStats

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, H], ids and weights [N, K], router probs [N, E] -> [N, H]."""


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for one expert; x [n, H] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act(gate) * up, down)


def contribution(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: int,
                 gate_up: torch.Tensor, down: torch.Tensor, act: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to `expert` and weight * expert(x) for them: ([n], [n, H]).

    hidden [N, H]; ids, weights [N, K]. Tokens are gathered in (k slot,
    token) order, as transformers does. The intermediates are allocated per
    call: a preallocated workspace measured 1-8% slower at 1-64 tokens on the
    CPU (scripts/bench_cpu_experts.py keeps it, to measure again elsewhere)."""
    k_slot, token = torch.where(ids.T == expert)  # [n], [n]
    y = expert_ffn(hidden[token], gate_up, down, act)  # [n, H]
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
    """Every routed expert held on the compute device, stacked per layer."""

    def __init__(self, gate_up: dict[int, torch.Tensor], down: dict[int, torch.Tensor], act: str,
                 stats: ExpertStats | None = None):
        self.gate_up = gate_up  # layer -> [E, 2I, H]
        self.down = down  # layer -> [E, H, I]
        self.act = ACT[act]
        self.stats = stats or ExpertStats(gate_up)

    @classmethod
    def load(cls, checkpoint, device: torch.device, dtype: torch.dtype, stats: ExpertStats) -> "ResidentExperts":
        cfg = checkpoint.config
        from .cache.store import ExpertReader, SlotPool

        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        # Experts are read with pread straight into their final place (through one
        # staging slot for a GPU): no mmap, so the file's pages never count as our RSS,
        # and the peak is the result plus one expert.
        reader = ExpertReader(checkpoint.expert_extents, checkpoint.shard_files())
        staging = None if device.type == "cpu" else SlotPool(1, h, i, torch.device("cpu"), dtype)
        gate_up, down = {}, {}
        try:
            for layer in cfg.moe_layers:
                gate_up[layer] = torch.empty((e, 2 * i, h), device=device, dtype=dtype)
                down[layer] = torch.empty((e, h, i), device=device, dtype=dtype)
                for expert in range(e):
                    if staging is None:
                        reader.read(layer, expert, gate_up[layer][expert], down[layer][expert])
                    else:
                        reader.read(layer, expert, *staging[0])
                        gate_up[layer][expert].copy_(staging.gate_up[0])
                        down[layer][expert].copy_(staging.down[0])
        finally:
            reader.close()
        return cls(gate_up, down, cfg.hidden_act, stats)

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        gate_up, down = self.gate_up[layer], self.down[layer]
        experts = torch.unique(ids).tolist()
        self.stats[layer].hits += len(experts)  # resident: every request is a hit
        parts = {e: contribution(hidden, ids, weights, e, gate_up[e], down[e], self.act) for e in experts}
        return accumulate(hidden, parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.gate_up, self.down) for t in d.values())
