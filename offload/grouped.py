"""One layer's routed expert work as one grouped computation.

A layer step routes N tokens to K experts each: M = N * K (token, expert) rows. `route` sorts
the rows by group (the expert id, or the slot that holds the expert) with a stable sort, so each
group's tokens are one run of rows in ascending token order, the same rows whichever placement
ran them; `GroupedKernel` computes the runs against the weights where they lie (the resident
stack of a layer, or the offloaded slot pool) and `combine` adds each token's K contributions.

Two kernels, picked once per (format, device):
  fused   dense bf16/fp16/fp32 experts where torch.nn.functional.grouped_mm runs (CUDA sm80+
          with bf16; the CPU in torch >= 2.13), and int8/int4 experts without biases where
          offload/triton_moe.py's kernels run (CUDA; fp16 on a T4): two grouped matmuls over
          the whole stack, the activation between them, with the group offsets on the device, so
          a resident layer needs no host sync at all
  loop    every other case (mxfp4, experts with biases, dense on the T4, a torch without
          grouped_mm or a GPU without Triton): the format's per-expert kernel
          (offload/kernels.py) over each run, from host offsets

Exactness: a group's rows come out the same whatever other groups share the call (checked on
the CPU, where both dense kernels give F.linear's bits, for the Triton kernels through Triton's
interpreter, and on a GPU by the gpu-marked tests), and
`combine` reduces a [N, K, H] tensor whose K entries are in ascending expert order: resident,
offloaded and hybrid runs of one model give identical bits.

Shapes: N tokens, K top-k, M = N * K rows, H hidden, G groups (experts or slots).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import triton_moe
from .formats import ExpertFormat
from .kernels import Kernel, split_gate_up
from .triton_moe import one_group

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class HostTransfers:
    """Counts the device -> host reads the expert path makes (each one a sync on a GPU): tests
    assert a resident layer makes none and an offloaded one exactly one."""

    count = 0

    @classmethod
    def read(cls, t: torch.Tensor) -> np.ndarray:
        cls.count += 1
        return t.cpu().numpy()


@dataclass(frozen=True)
class Routes:
    """One layer step's rows, sorted by group."""

    order: torch.Tensor  # [M] int64: each row's place in the [N, K] ranking (experts ascending per token)
    tokens: torch.Tensor  # [M] int64: each row's token
    weights: torch.Tensor  # [M]: each row's router weight
    offs: torch.Tensor  # [G] int32: the end of each group's rows (grouped_mm's offsets)
    n: int
    k: int


def route(ids: torch.Tensor, weights: torch.Tensor, groups: int, group_of: torch.Tensor | None = None) -> Routes:
    """ids, weights [N, K] -> rows sorted by group: the expert id, or group_of[expert] (its slot).
    Everything stays on the device (searchsorted instead of bincount, which reads its max back)."""
    n, k = ids.shape
    ranked, perm = ids.sort(dim=1)  # [N, K]: each token's experts ascending, the order combine adds them in
    keys = (ranked if group_of is None else group_of[ranked]).reshape(-1)  # [M]
    order = torch.argsort(keys, stable=True)  # [M]: by group, then by token
    offs = torch.searchsorted(keys[order], torch.arange(groups, device=ids.device), right=True)  # [G]
    return Routes(order, order // k, weights.gather(1, perm).reshape(-1)[order], offs.to(torch.int32), n, k)


def host_offsets(ids: np.ndarray, groups: int, group_of: np.ndarray | None = None) -> np.ndarray:
    """route()'s offsets [G] computed from the ids already on the host (no second transfer)."""
    keys = ids.reshape(-1) if group_of is None else group_of[ids.reshape(-1)]
    return np.cumsum(np.bincount(keys, minlength=groups))


def combine(routes: Routes, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y [M, H] (rows in group order) -> [N, H]: each row times its router weight, summed per token
    over its K experts. The sum runs over a [N, K, H] tensor in ascending expert order, so its bits
    depend only on the routing and the rows' values, never on the groups' order."""
    h = y.shape[-1]
    weighted = (y * routes.weights[:, None]).to(dtype)  # [M, H]
    ranked = torch.empty(routes.n * routes.k, h, dtype=dtype, device=y.device)
    ranked.index_copy_(0, routes.order, weighted)  # each place once: deterministic
    return ranked.view(routes.n, routes.k, h).sum(dim=1)  # [N, H]


class GroupedKernel:
    """`fused`: whether `all` runs every group in one call from device offsets; otherwise the
    caller passes host offsets and the groups run one by one through `group`."""

    def __init__(self, fmt: ExpertFormat, kernel: Kernel, act: Callable, glu: Callable | None, fused: bool):
        self.fmt, self.kernel, self.act, self.glu, self.fused = fmt, kernel, act, glu, fused
        self.per_matrix = 1 if fmt.kind == "dense" else 2  # pieces per matrix: W, or q and its scales

    def group(self, x: torch.Tensor, weights: tuple) -> torch.Tensor:
        """One group's rows x [n, H] through one expert's packed weights -> [n, H]."""
        if not self.fused:
            return self.kernel(x, weights)
        stack = [w[None] for w in weights[:2 * self.per_matrix]]  # a stack of one: the fused call's own kernel
        return self._ffn(x, stack, one_group(x.shape[0], x.device))

    def all(self, x: torch.Tensor, pool_data: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Every group's rows x [M, H] against the pool's slots [G, nbytes] -> [M, H], in one call."""
        return self._ffn(x, self.fmt.stacked_views(pool_data), offs)

    def loop(self, x: torch.Tensor, ends, weights_of: Callable[[int], tuple]) -> torch.Tensor:
        """Every non-empty group through `group`, from host offsets `ends` [G]."""
        y = torch.empty_like(x)
        start = 0
        for g, end in enumerate(ends.tolist() if hasattr(ends, "tolist") else ends):
            if end > start:
                y[start:end] = self.group(x[start:end], weights_of(g))
            start = end
        return y

    def _ffn(self, x, pieces, offs):
        # x [M, H]; pieces: stacked_views' [G, ...] pieces, gate_up's (matrix [G, 2I, H] in F.linear's
        # layout, or q and its scales), then down's ([G, H, I]).
        p = self.per_matrix
        h = self._matmul(x, pieces[:p], offs)  # [M, 2I]
        gate, up = split_gate_up(h, self.fmt.interleaved)
        a = self.act(gate) * up if self.glu is None else self.glu(gate, up)  # [M, I]
        return self._matmul(a, pieces[p:2 * p], offs)  # [M, H]

    def _matmul(self, x, matrix, offs):
        if self.per_matrix == 1:  # [G, N, K]: grouped_mm takes its transpose
            return _grouped_mm(x, matrix[0].transpose(-2, -1), offs=offs)
        return triton_moe.grouped_linear(self.fmt.kind, x, *matrix, offs)


# Set by tests to run the fused kernel on the CPU (where it gives the loop's bits) or never. Quantized
# experts run fused on the CPU only with triton_moe.INTERPRET set too (Triton's interpreter).
FUSED: bool | None = None


def grouped_kernel(fmt: ExpertFormat, device: torch.device, kernel: Kernel, act: Callable,
                   glu: Callable | None = None) -> GroupedKernel:
    """The grouped form of `kernel` (expert_kernel's choice for this format and device)."""
    if fmt.kind in ("int8", "int4"):  # biases (GPT-OSS) would be added per group: left to the loop
        fused = FUSED is not False and not fmt.bias and triton_moe.available(device, fmt.dtype)
        return GroupedKernel(fmt, kernel, act, glu, fused)
    # grouped_mm on a GPU wants 16-byte aligned strides: rows of H and I elements, slots of nbytes.
    aligned = (fmt.hidden * fmt.dtype.itemsize) % 16 == 0 and (fmt.width * fmt.dtype.itemsize) % 16 == 0
    fusable = fmt.kind == "dense" and not fmt.bias and not fmt.transposed and aligned and fmt.nbytes % 16 == 0
    if FUSED is not None:
        fused = FUSED and fusable and _grouped_mm is not None
    else:  # on the CPU grouped_mm is a loop of GEMMs itself; the per-expert loop overlaps reads
        fused = fusable and device.type == "cuda" and grouped_mm_runs(device, fmt.dtype)
    return GroupedKernel(fmt, kernel, act, glu, fused)


@functools.cache
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch and device run grouped_mm in `dtype` (CUDA: sm80+ and bf16 today)."""
    if _grouped_mm is None:
        return False
    try:  # weights as a slot pool holds them: [G, N, K] views into rows longer than one matrix
        x = torch.ones(24, 64, dtype=dtype, device=device)
        pool = torch.ones(3, 64 * 64 + 64, dtype=dtype, device=device)
        w = pool[:, :64 * 64].view(3, 64, 64)
        y = _grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([8, 8, 24], dtype=torch.int32, device=device))
        return bool((y == 64).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False
