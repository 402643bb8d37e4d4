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
# The same functions computed in place, for the workspace path (same kernels, so the same bits).
ACT_INPLACE = {
    "silu": lambda x: F.silu(x, inplace=True),
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": torch.relu_,
}


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, H], ids and weights [N, K], router probs [N, E] -> [N, H]."""


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for one expert; x [n, H] -> [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act(gate) * up, down)


class Workspace:
    """Scratch memory for one thread's expert calls: the gathered input [n, H], the
    gate/up product [n, 2I], the activation [n, I] and the expert's output [n, H] are
    views of one buffer kept across calls and grown only when a call needs more. On a
    CPU that saves an allocation (and, for prefill-sized n, fresh pages faulted in) per
    matmul; the arithmetic is the same kernels as `expert_ffn`, so the same bits.
    Not thread-safe: one workspace per thread that computes experts."""

    def __init__(self, act: str):
        self.act_ = ACT_INPLACE[act]
        self.buffer = torch.empty(0)

    def ffn(self, hidden: torch.Tensor, token: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
        """expert_ffn(hidden[token], gate_up, down) into the workspace; valid until the next call."""
        n, h, i = token.numel(), hidden.shape[1], down.shape[1]
        need = n * (2 * h + 3 * i)
        if self.buffer.numel() < need or self.buffer.dtype != hidden.dtype or self.buffer.device != hidden.device:
            self.buffer = torch.empty(need, dtype=hidden.dtype, device=hidden.device)
        x, gu, a, y = torch.split(self.buffer[:need], (n * h, n * 2 * i, n * i, n * h))
        x, gu, a, y = x.view(n, h), gu.view(n, 2 * i), a.view(n, i), y.view(n, h)
        torch.index_select(hidden, 0, token, out=x)  # [n, H]
        torch.mm(x, gate_up.t(), out=gu)  # [n, 2I], what F.linear computes
        gate, up = gu.chunk(2, dim=-1)  # [n, I] each, views
        torch.mul(self.act_(gate), up, out=a)  # [n, I]
        return torch.mm(a, down.t(), out=y)  # [n, H]


def contribution(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: int,
                 gate_up: torch.Tensor, down: torch.Tensor, act: Callable,
                 workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to `expert` and weight * expert(x) for them: ([n], [n, H]).

    hidden [N, H]; ids, weights [N, K]. Tokens are gathered in (k slot,
    token) order, as transformers does. With a workspace the intermediates
    live in it and only the returned [n, H] is allocated."""
    k_slot, token = torch.where(ids.T == expert)  # [n], [n]
    if workspace is None:
        y = expert_ffn(hidden[token], gate_up, down, act)  # [n, H]
    else:
        y = workspace.ffn(hidden, token, gate_up, down)  # [n, H], in the workspace
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
        on_cpu = next(iter(gate_up.values())).device.type == "cpu" if gate_up else False
        self.workspace = Workspace(act) if on_cpu else None  # the GPU's caching allocator already reuses

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
        parts = {e: contribution(hidden, ids, weights, e, gate_up[e], down[e], self.act, self.workspace)
                 for e in experts}
        return accumulate(hidden, parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.gate_up, self.down) for t in d.values())
