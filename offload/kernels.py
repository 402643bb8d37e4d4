"""Expert FFN kernels, one per (format, device), picked once at load:

    kernel = expert_kernel(fmt, device, act)
    y = kernel(x, packed)          # x [n, H], packed = fmt.views(slot bytes) -> y [n, H]

The engine and the resident executor call only this, so they never branch on
formats. What each computes is down(act(gate(x)) * up(x)):

  dense               F.linear in the compute dtype
  int8, CPU           torch._weight_int8pack_mm (bf16 activations) below DEQUANT_TOKENS["int8"] tokens
  int4, CPU           torch._weight_int4pack_mm_for_cpu (bf16 activations, the slot's nibbles as read
                      from disk) below DEQUANT_TOKENS["int4"] tokens
  int8, int4, CUDA    offload/triton_moe.py's Triton kernels, straight from the packed bytes (a group
                      of one: the bits of the grouped call over a layer's experts, offload/grouped.py)
  quantized, else     dequantize into the compute dtype, then F.linear: mxfp4, a GPU without Triton,
                      prefill-sized batches on the CPU (where bf16 GEMMs beat the weight-only kernels),
                      and a torch whose int4 packing changed

The choice depends only on the format, the device and the number of tokens an
expert gets, never on where the expert sits, so resident and offloaded runs
of one model stay bit-identical. torch's int8/int4 ops are private; they are
used only through this file, with the dequantize path as the fallback.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from . import triton_moe
from .formats import DENSE_NAMES, ExpertFormat
from .quant import INT4_BLOCK, pack_int4

Kernel = Callable[[torch.Tensor, tuple], torch.Tensor]
# From this many tokens per expert on, the CPU dequantizes and runs bf16/fp32 GEMMs: the weight-only
# kernels win at batch 1 (int8 2.0x, int4 3.4-3.7x faster than a bf16 expert) and lose at prefill
# sizes, int4 much later, its dequantization costing more. Expert 1024 x 3584, medians of 15 (scripts/
# bench_cpu_experts.py --formats bf16,int8,int4 --threads 1 / 2), weight-only vs dequantize ms at
# 1 thread: int8 2.6 / 4.6 at 16 tokens, 9.0 / 6.9 at 64; int4 34.1 / 50.8 at 256, about even at 640,
# 102.0 / 84.3 at 768; at 2 threads: int8 4.9 / 4.2 at 64; int4 17.2 / 20.3 at 256, 51.0 / 47.0 at 768.
# A whole number applies to every format (tests set 1 to force the dequantize path).
DEQUANT_TOKENS: dict[str, int] | int = {"int8": 64, "int4": 768}


def dense_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Callable,
              glu: Callable | None = None, biases: tuple = (None, None), interleaved: bool = False) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for one expert; x [n, H] -> [n, H]. `glu(gate, up)` replaces
    act(gate) * up where a family gates differently (GPT-OSS); `biases` for experts that have them."""
    gate, up = split_gate_up(F.linear(x, gate_up, biases[0]), interleaved)  # [n, I] each
    return F.linear(act(gate) * up if glu is None else glu(gate, up), down, biases[1])


def split_gate_up(gate_up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 2I] -> gate, up [n, I]: halves, or GPT-OSS's alternating columns."""
    return (gate_up[..., ::2], gate_up[..., 1::2]) if interleaved else gate_up.chunk(2, dim=-1)


def dequant_tokens(kind: str) -> int:
    """Tokens per expert from which a `kind` expert is dequantized on the CPU (DEQUANT_TOKENS)."""
    return DEQUANT_TOKENS if isinstance(DEQUANT_TOKENS, int) else DEQUANT_TOKENS.get(kind, 0)


def dequantize(fmt: ExpertFormat, packed: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fmt.dequantize(packed, dtype), bit for bit, faster for int4: (gate_up [2I, H], down [H, I]),
    int4 ones as transposed views of [H, 2I] and [I, H] (F.linear takes them as they are)."""
    if fmt.kind != "int4":
        return fmt.dequantize(packed, dtype)
    return _int4_transposed(packed[0], packed[1], dtype).t(), _int4_transposed(packed[2], packed[3], dtype).t()


def _int4_transposed(q: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocked nibbles q [N, K/2] and scales_and_zeros [K/g, N, 2] (offload/quant.py) -> W^T [K, N].

    W^T is written straight from the nibble blocks, and its rows fall in groups of g sharing one
    row of scales, so the scales broadcast instead of being repeated to [N, K]. The arithmetic is
    dequantize_int4's, (q - 8) * scale + zero with each step rounded to `dtype`, done in fp32
    (where bf16 and fp16 ops run anyway; a product of a nibble and a bf16 scale is exact there):
    same bits, about 3x faster: a 1024 x 3584 expert's dequantize path took 128 ms with
    dequantize_int4 and takes 40-46 ms with this (bf16, one thread, scripts/bench_cpu_experts.py)."""
    n, half = q.shape
    k, groups = 2 * half, sz.shape[0]
    blocks = q.view(n // INT4_BLOCK, k, INT4_BLOCK // 2).transpose(0, 1)  # [K, N/64, 32]: row j low, j+32 high
    wt = torch.empty(k, n // INT4_BLOCK, 2, INT4_BLOCK // 2, dtype=torch.float32, device=q.device)  # W^T [K, N]
    wt[:, :, 0] = blocks & 0xF
    wt[:, :, 1] = blocks >> 4
    w = wt.view(groups, k // groups, n).sub_(8)  # [K/g, g, N]
    w.mul_(sz[..., 0].to(dtype).float()[:, None, :])
    if dtype != torch.float32:
        w = w.to(dtype).float()  # the product, rounded as a `dtype` multiply rounds it
    w.add_(sz[..., 1].to(dtype).float()[:, None, :])
    return w.view(k, n).to(dtype)


@functools.cache
def cpu_int4_kernel_agrees() -> bool:
    """Whether this torch has the CPU int4 kernel and packs nibbles in our on-disk layout."""
    try:
        q = torch.randint(0, 16, (64, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        return torch.equal(torch._convert_weight_to_int4pack_for_cpu(q, 1), pack_int4(q.to(torch.uint8)))
    except (AttributeError, RuntimeError):
        return False


# torch's CPU int8 kernel with bf16 activations reads the reduction dimension in blocks of 32: at
# other widths it returned garbage or NaN, or crashed (torch 2.13; K=24 and 40 tried), so those
# experts are dequantized instead (no released MoE model has such a width).
INT8_K_MULTIPLE = 32


def int8_kernel_fits(fmt: ExpertFormat) -> bool:
    """Whether both of an int8 expert's products reduce over multiples of INT8_K_MULTIPLE (H and I)."""
    return fmt.hidden % INT8_K_MULTIPLE == 0 and fmt.width % INT8_K_MULTIPLE == 0


@functools.cache
def cpu_int8_kernel_available() -> bool:
    try:
        x = torch.zeros(1, 32, dtype=torch.bfloat16)
        torch._weight_int8pack_mm(x, torch.zeros(32, 32, dtype=torch.int8), torch.ones(32, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError):
        return False


def expert_kernel(fmt: ExpertFormat, device: torch.device, act: Callable, glu: Callable | None = None) -> Kernel:
    """`act` is the family's activation (gate side); `glu(gate, up)`, when given, the whole gating."""
    def dequantized(x, packed):  # dense experts: the weights as they are (transposed views for GPT-OSS)
        gate_up, down = dequantize(fmt, packed, x.dtype)
        return dense_ffn(x, gate_up, down, act, glu, fmt.biases(packed, x.dtype), fmt.interleaved)

    if fmt.kind == "dense":
        return dequantized

    if device.type != "cpu":
        return triton_kernel(fmt, act, glu) if triton_runs(fmt, device) else dequantized
    if fmt.kind == "int8" and cpu_int8_kernel_available() and int8_kernel_fits(fmt):
        def matmul(x, q, s):
            return torch._weight_int8pack_mm(x, q, s)
    elif fmt.kind == "int4" and cpu_int4_kernel_agrees():
        group = fmt.group_size

        def matmul(x, q, sz):
            return torch._weight_int4pack_mm_for_cpu(x, q, group, sz)
    else:
        return dequantized

    def weight_only(x, packed):
        if x.shape[0] >= dequant_tokens(fmt.kind):
            return dequantized(x, packed)
        xb = x.to(torch.bfloat16)  # [n, H]: the kernels take bf16 activations
        b1, b2 = fmt.biases(packed, torch.bfloat16)
        gate_up = matmul(xb, packed[0], packed[1])  # [n, 2I]
        gate, up = split_gate_up(gate_up if b1 is None else gate_up + b1, fmt.interleaved)  # [n, I] each
        y = matmul(act(gate) * up if glu is None else glu(gate, up), packed[2], packed[3])  # [n, H]
        return (y if b2 is None else y + b2).to(x.dtype)

    return weight_only


def triton_runs(fmt: ExpertFormat, device: torch.device) -> bool:
    """Whether `fmt` experts run through offload/triton_moe.py's kernels on this GPU."""
    return device.type == "cuda" and fmt.kind in ("int8", "int4") and triton_moe.available(device, fmt.dtype)


def triton_kernel(fmt: ExpertFormat, act: Callable, glu: Callable | None) -> Kernel:
    """One expert as a group of one through the Triton kernels, in the activations' dtype."""
    def weight_only(x, packed):
        b1, b2 = fmt.biases(packed, x.dtype)
        gate_up = triton_moe.linear(fmt.kind, x, packed[0], packed[1])  # [n, 2I]
        gate, up = split_gate_up(gate_up if b1 is None else gate_up + b1, fmt.interleaved)  # [n, I] each
        y = triton_moe.linear(fmt.kind, act(gate) * up if glu is None else glu(gate, up), packed[2], packed[3])
        return y if b2 is None else y + b2  # [n, H]

    return weight_only


def cpu_weight_only(fmt: ExpertFormat) -> bool:
    """Whether the CPU computes `fmt` at about the speed of reading its bytes (dense, or a weight-only
    kernel), rather than dequantizing every expert on every call (mxfp4: 100x slower at batch 1)."""
    return fmt.kind == "dense" or (fmt.kind == "int8" and cpu_int8_kernel_available() and int8_kernel_fits(fmt)) or (
        fmt.kind == "int4" and cpu_int4_kernel_agrees())


def kernel_name(fmt: ExpertFormat, device: torch.device) -> str:
    """What `expert_kernel` picked, in words (describe() prints it)."""
    if fmt.kind == "dense":
        return f"{fmt.name} F.linear"
    if device.type == "cpu" and ((fmt.kind == "int8" and cpu_int8_kernel_available() and int8_kernel_fits(fmt))
                                 or (fmt.kind == "int4" and cpu_int4_kernel_agrees())):
        return (f"torch's {fmt.kind} weight-only kernel below {dequant_tokens(fmt.kind)} tokens per expert, "
                f"dequantized GEMM above")
    if triton_runs(fmt, device):
        return f"Triton {fmt.kind} kernel from the packed bytes ({DENSE_NAMES[fmt.dtype]} dot, fp32 accumulation)"
    return "dequantized to the compute dtype, then F.linear"
