"""Routed expert execution, behind one replaceable interface.

The MoE block routes tokens and hands the expert work to an `ExpertExecutor`:
`executor(layer, hidden [N, H], ids [N, K], weights [N, K]) -> [N, H]`.
`ResidentExperts` keeps every expert on the compute device; the offloaded
engine implements the same call with caches and a tiered store. Both run
the same `combine`, so their arithmetic (and output) is identical.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# One expert's weights on the compute device: gate_up [2I, H] (gate rows first), down [H, I].
ExpertWeights = tuple[torch.Tensor, torch.Tensor]


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for one expert; x [n, H] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act(gate) * up, down)


def combine(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: list[int],
    weights_of: Callable[[int], ExpertWeights],
    act: Callable,
) -> torch.Tensor:
    """Sum over the routed experts of weight * expert(x), for the experts in `experts` order.

    hidden [N, H]; ids, weights [N, K]. Tokens are gathered per expert in
    (k slot, token) order and accumulated with index_add_, as transformers
    does, so the resident result matches it bit for bit on the same device.
    """
    out = torch.zeros_like(hidden)  # [N, H]
    for e in experts:
        k_slot, token = torch.where(ids.T == e)  # [n], [n]
        y = expert_ffn(hidden[token], *weights_of(e), act)  # [n, H]
        y = y * weights[token, k_slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def stack_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
    """Checkpoint matrices -> the layout `expert_ffn` reads: (gate_up [2I, H], down [H, I])."""
    return torch.cat([gate, up], dim=0), down


class ResidentExperts:
    """Every routed expert held on the compute device, stacked per layer."""

    def __init__(self, gate_up: dict[int, torch.Tensor], down: dict[int, torch.Tensor], act: str):
        self.gate_up = gate_up  # layer -> [E, 2I, H]
        self.down = down  # layer -> [E, H, I]
        self.act = ACT[act]

    @classmethod
    def load(cls, checkpoint, device: torch.device, dtype: torch.dtype) -> "ResidentExperts":
        cfg = checkpoint.config
        gate_up, down = {}, {}
        for layer in (i for i, sparse in enumerate(cfg.sparse_layers) if sparse):
            pairs = [stack_expert(*checkpoint.expert(layer, e)) for e in range(cfg.num_experts)]
            gate_up[layer] = torch.stack([p[0] for p in pairs]).to(device=device, dtype=dtype)
            down[layer] = torch.stack([p[1] for p in pairs]).to(device=device, dtype=dtype)
        return cls(gate_up, down, cfg.hidden_act)

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up[layer], self.down[layer]
        experts = torch.unique(ids).tolist()  # ascending, as transformers visits them
        return combine(hidden, ids, weights, experts, lambda e: (gate_up[e], down[e]), self.act)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.gate_up, self.down) for t in d.values())
