"""Weight-only quantization of expert matrices: the arithmetic and the byte layouts.

Both formats quantize a weight matrix W [N, K] (N outputs, K inputs) row by row:

  int8   symmetric per output row:   W ~ q * s,                 q int8 in [-127, 127], s [N] bf16
  int4   asymmetric per group of g inputs along K:
                                     W ~ (q - 8) * scale + zero, q in [0, 15],
                                     scales and zeros [K/g, N, 2] bf16 ([..., 0] scale, [..., 1] zero)

The int4 convention (q - 8, scale and zero per group, [K/g, N, 2]) is the one
torch's int4 matmuls take. Nibbles are stored in blocks of 64 output rows:
for each block and each k, 32 bytes whose byte j holds row j in its low nibble
and row j + 32 in its high nibble ([N/64, K, 32] bytes = [N, K/2]). That is the
layout `torch._convert_weight_to_int4pack_for_cpu` produces, so a CPU slot can
be handed to the kernel exactly as read from disk; the layout is defined here
(not by torch), and offload/kernels.py checks once per process that torch still
agrees before using its kernel. Scales and zeros are rounded to bf16 before the
nibbles are chosen, so each q is the best one for the scale actually stored.
"""

from __future__ import annotations

import torch

INT4_BLOCK = 64  # output rows per nibble block
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scales bf16 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)  # [N]
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q [N, K], scales [N]) -> W [N, K] in `dtype`."""
    return (q.to(dtype) * scale.to(dtype)[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q uint8 [N, K] in 0..15, scales_and_zeros bf16 [K/g, N, 2])."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)  # [N, G, g]
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)  # [N, G]
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)  # q = 0 maps to the group's minimum
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    return q.reshape(n, k).to(torch.uint8), sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q [N, K] in 0..15, scales_and_zeros [K/g, N, 2]) -> W [N, K] in `dtype`."""
    n, k = q.shape
    group = k // sz.shape[0]
    scale = sz[..., 0].to(dtype).T.repeat_interleave(group, dim=1)  # [N, K]
    zero = sz[..., 1].to(dtype).T.repeat_interleave(group, dim=1)
    return (q.to(dtype) - 8) * scale + zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Nibbles q [N, K] (uint8 in 0..15, N a multiple of 64) -> blocked bytes [N, K/2]."""
    n, k = q.shape
    blocks = q.reshape(n // INT4_BLOCK, INT4_BLOCK, k)  # [B, 64, K]
    low, high = blocks[:, :32].transpose(1, 2), blocks[:, 32:].transpose(1, 2)  # [B, K, 32] each
    return (low | (high << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Blocked bytes [N, K/2] -> nibbles [N, K] (uint8 in 0..15)."""
    n, half = packed.shape
    k = 2 * half
    b = packed.reshape(n // INT4_BLOCK, k, 32)  # [B, K, 32]
    low, high = b & 0xF, b >> 4
    return torch.cat([low.transpose(1, 2), high.transpose(1, 2)], dim=1).reshape(n, k)


# ---- MXFP4 (OCP microscaling FP4, as GPT-OSS ships its experts) --------------------------------
# Per 32 inputs one E8M0 scale byte (2^(e - 127)); each weight an E2M1 nibble, low nibble first.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32


def dequantize_mxfp4(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(nibbles q uint8 [N, K/2], E8M0 scales uint8 [N, K/32]) -> W [N, K] in `dtype`.

    One table lookup per byte (both nibbles at once), then a multiply by the group's power of
    two: exact, as ldexp is, and 2x faster than two nibble lookups and an ldexp per weight."""
    n, half = q.shape
    values = _FP4_PAIRS.to(q.device)[q.int()].view(n, -1, MXFP4_GROUP)  # [N, K/32, 32]
    scale = torch.ldexp(torch.ones(scales.shape, device=q.device), scales.to(torch.int32) - 127)  # [N, K/32]
    return (values * scale[..., None]).view(n, 2 * half).to(dtype)


# Byte b -> (E2M1 value of its low nibble, of its high nibble).
_FP4_PAIRS = torch.stack([torch.tensor(FP4_VALUES).repeat(16), torch.tensor(FP4_VALUES).repeat_interleave(16)], -1)
