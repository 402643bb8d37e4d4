"""Opt-in int8 weights for the resident, non-expert layers (`offload.load(..., dense="int8")`).

With int4 experts a decode token on the CPU still reads every attention projection and the LM
head in 16 bits: on the 2.2 GB synthetic Mixtral that is 128 of the ~275 MB a token reads, which
caps the int4 speed-up near 2.2x. Per-output-channel symmetric int8 (offload/quant.py's, as for
int8 experts) halves those bytes; torch's weight-only int8 kernel reads them at about the speed
of reading the bytes. Lossy, and named so: describe() and the stats say "dense int8".

Quantized: the attention projections of standard attention, dense MLPs and shared experts, and
the LM head. Kept: routers (a flipped expert choice costs more than the bytes), norms, the
embedding (one row per token is read), latent attention's projections (their weights are also
read directly, absorbed into other products), and anything narrower than 32 outputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import dequant_tokens
from .quant import dequantize_int8, quantize_int8

# torch's int8 kernel with bf16 activations needs the reduced width in multiples of 32 (kernels.py).
K_MULTIPLE = 32


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 [N, K] and a scale per output row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach())
        dtype = linear.weight.dtype
        self.register_buffer("q", q.to(linear.weight.device))  # [N, K] int8
        self.register_buffer("scale", scale.to(dtype).to(linear.weight.device))  # [N], the activations' dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fast = _kernel_runs(self.q.device, dtype) and (dtype == torch.float32 or self.in_features % K_MULTIPLE == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.fast and x2.shape[0] < dequant_tokens("int8"):  # decode-sized: the weight-only kernel
            y = torch._weight_int8pack_mm(x2, self.q, self.scale)  # [M, N]
            if self.bias is not None:
                y = y + self.bias
        else:  # prefill-sized (the kernel is slower there, as for experts), or a device or width it
            # does not take: the weights dequantized per call
            y = F.linear(x2, dequantize_int8(self.q, self.scale, x.dtype), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@functools.cache
def _kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(2, 64, dtype=dtype, device=device)
        y = torch._weight_int8pack_mm(x, torch.ones(32, 64, dtype=torch.int8, device=device),
                                      torch.ones(32, dtype=dtype, device=device))
        return bool((y == 64).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def quantize_dense(model: nn.Module) -> int:
    """Replace the model's quantizable nn.Linear layers by Int8Linear, in place; the bytes saved."""
    from .models.decoder import Attention, DenseMLP

    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            names += [f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif isinstance(module, DenseMLP):
            names += [f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    names.append("lm_head")
    saved = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear) or linear.out_features < K_MULTIPLE:
            continue
        replacement = Int8Linear(linear)
        saved += linear.weight.numel() * linear.weight.element_size() - replacement.q.numel() - \
            replacement.scale.numel() * replacement.scale.element_size()
        setattr(parent, attr, replacement)
    return saved
