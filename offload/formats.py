"""How one routed expert is laid out in memory and on disk, whatever its format.

An expert is ONE contiguous run of bytes (one pread from disk, one
host-to-device copy, one slot): its pieces follow each other at 64-byte
aligned offsets. `ExpertFormat.views(buf)` turns a slot's bytes into the
tensors a kernel takes (offload/kernels.py); placement, slots, stats and the
cost model count `nbytes`, the format's own size.

  dense (bf16 / fp16 / fp32)  gate_up [2I, H], down [H, I] in the compute dtype
  int8                        gate_up q int8 [2I, H], scales [2I]; down q [H, I], scales [H]
  int4 (group g)              gate_up nibbles [2I, H/2], scales_and_zeros [H/g, 2I, 2];
                              down nibbles [H, I/2], scales_and_zeros [I/g, H, 2]
  mxfp4                       gate_up E2M1 nibbles [2I, H/2], E8M0 scales [2I, H/32]; down the same
                              (GPT-OSS ships its experts so; read as shipped, dequantized per call)
  + biases (GPT-OSS)          gate_up [2I] and down [H], in the compute dtype (dense) or bf16

GPT-OSS's own layouts are read as they are, without conversion: `interleaved` gate/up rows
(gate = even rows, up = odd: the kernels split the product, which costs nothing), `transposed`
dense matrices (gate_up [H, 2I], down [I, H], which F.linear takes as a transposed view), and
`apart`: the pieces are separate extents on disk (mxfp4 blocks, scales and biases), read one
by one into the slot instead of as one run.

Quantized formats are lossy and opt-in (see offload/quant.py for the arithmetic).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import OffloadError
from .quant import (GROUP_SIZES, INT4_BLOCK, MXFP4_GROUP, SCALE_DTYPE, dequantize_int4, dequantize_int8,
                    dequantize_mxfp4, pack_int4, quantize_int4, quantize_int8, unpack_int4)

ALIGN = 64
QUANTIZED = ("int8", "int4", "mxfp4")
DEFAULT_GROUP_SIZE = 32  # best held-out quality on the demo model (README, "Quantized experts")
DENSE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# config.json's block describing a quantized model directory written by `offload quantize`.
CONFIG_KEY = "quantization"
METHOD = "moe-offload"
VERSION = 1


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertFormat:
    kind: str  # "dense", "int8" or "int4"
    hidden: int  # H
    width: int  # I
    dtype: torch.dtype  # the compute dtype: dense weights are stored in it, quantized ones dequantize to it
    group_size: int = 0  # int4 only
    bias: bool = False  # experts with biases (GPT-OSS)
    interleaved: bool = False  # gate_up rows alternate gate, up (GPT-OSS) instead of all gate, then all up
    transposed: bool = False  # dense only: stored as gate_up [H, 2I], down [I, H] (GPT-OSS)
    apart: bool = False  # quantized only: the checkpoint holds each piece as its own extent

    def __post_init__(self):
        h, i = self.hidden, self.width
        if self.kind not in ("dense",) + QUANTIZED:
            raise OffloadError(f"expert format {self.kind!r} is unknown; use one of: bf16, {', '.join(QUANTIZED)}")
        if self.transposed and self.kind != "dense" or self.apart and self.kind == "dense":
            raise ValueError("transposed applies to dense experts, apart to quantized ones")
        if self.kind == "mxfp4" and (h % MXFP4_GROUP or i % MXFP4_GROUP):
            raise OffloadError(f"mxfp4 experts need hidden_size ({h}) and moe_intermediate_size ({i}) to be "
                               f"multiples of {MXFP4_GROUP}")
        if self.kind == "int4":
            if self.group_size not in GROUP_SIZES:
                raise OffloadError(f"int4 group size {self.group_size} is not supported; use one of "
                                   f"{', '.join(map(str, GROUP_SIZES))}")
            bad = [f"{name}={v}" for name, v in (("hidden_size", h), ("moe_intermediate_size", i))
                   if v % self.group_size]
            if bad:
                fits = [g for g in GROUP_SIZES if h % g == 0 and i % g == 0]
                raise OffloadError(f"int4 group size {self.group_size} does not divide {' and '.join(bad)}; "
                                   + (f"use group size {' or '.join(map(str, fits))} (--group-size "
                                      f"{fits[0]} for `offload quantize`, int4-g{fits[0]} for --experts)" if fits
                                      else "this model's shapes fit no int4 group size; use int8"))
            if h % INT4_BLOCK or (2 * i) % INT4_BLOCK:
                raise OffloadError(f"int4 needs hidden_size ({h}) and 2 x moe_intermediate_size ({2 * i}) to be "
                                   f"multiples of {INT4_BLOCK}; use int8 for this model")

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return DENSE_NAMES[self.dtype]
        return f"int4-g{self.group_size}" if self.kind == "int4" else self.kind

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"

    def pieces(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        h, i, g = self.hidden, self.width, self.group_size
        if self.kind == "dense":
            weights = ([("gate_up", self.dtype, (h, 2 * i)), ("down", self.dtype, (i, h))] if self.transposed
                       else [("gate_up", self.dtype, (2 * i, h)), ("down", self.dtype, (h, i))])
        elif self.kind == "int8":
            weights = [("gate_up.q", torch.int8, (2 * i, h)), ("gate_up.s", SCALE_DTYPE, (2 * i,)),
                       ("down.q", torch.int8, (h, i)), ("down.s", SCALE_DTYPE, (h,))]
        elif self.kind == "int4":
            weights = [("gate_up.q", torch.uint8, (2 * i, h // 2)), ("gate_up.sz", SCALE_DTYPE, (h // g, 2 * i, 2)),
                       ("down.q", torch.uint8, (h, i // 2)), ("down.sz", SCALE_DTYPE, (i // g, h, 2))]
        else:
            weights = [("gate_up.q", torch.uint8, (2 * i, h // 2)), ("gate_up.e", torch.uint8, (2 * i, h // 32)),
                       ("down.q", torch.uint8, (h, i // 2)), ("down.e", torch.uint8, (h, i // 32))]
        if not self.bias:
            return weights
        # Stored as the weights' dtype for dense experts (converted on read like them), bf16 otherwise.
        bias = self.dtype if self.kind == "dense" else SCALE_DTYPE
        return weights + [("gate_up.b", bias, (2 * i,)), ("down.b", bias, (h,))]

    @functools.cached_property
    def _offsets(self) -> list[tuple[int, torch.dtype, tuple[int, ...], int]]:
        out, at = [], 0
        for _, dtype, shape in self.pieces():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append((at, dtype, shape, size))
            at = _align(at + size)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of one expert in this format (a slot's size; what a fetch moves)."""
        last, _, _, size = self._offsets[-1]
        return _align(last + size)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (3 * self.hidden * self.width)

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A slot's bytes (uint8 [nbytes]) -> the pieces as tensors, in `pieces()` order."""
        return tuple(buf[at:at + size].view(dtype).view(shape) for at, dtype, shape, size in self._offsets)

    def stacked_views(self, data: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A pool's bytes uint8 [S, nbytes] -> each piece of every slot, [S, *shape] (strided views,
        no copy): what a grouped kernel (offload/grouped.py) takes."""
        return tuple(data[:, at:at + size].view(dtype).view(data.shape[0], *shape)
                     for at, dtype, shape, size in self._offsets)

    def read_targets(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Where a checkpoint's extents for one expert go: dense checkpoints keep gate, up and down
        apart on disk (three extents); a quantized directory stores the whole expert as one."""
        if self.apart or (not self.quantized and (self.transposed or self.interleaved)):
            return list(self.views(buf))  # GPT-OSS: whole matrices, scales and biases, each its own extent
        if not self.quantized:
            gate_up, down, *biases = self.views(buf)
            return [gate_up[:self.width], gate_up[self.width:], down, *biases]
        return [buf]

    # ---- conversion ------------------------------------------------------------

    def quantize(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One expert's float matrices (gate, up [I, H], down [H, I]; biases gate_up [2I] and
        down [H] if the format has them) -> its bytes in this format."""
        if self.kind == "mxfp4":
            raise OffloadError("mxfp4 experts are read as shipped (GPT-OSS); quantize to int4 or int8 instead")
        if self.bias != (biases is not None):
            raise ValueError("biases must be given exactly when the format has them")
        buf = torch.zeros(self.nbytes, dtype=torch.uint8)
        gate_up = torch.cat([gate, up], dim=0)  # [2I, H], gate rows first, as slots hold it
        if self.kind == "dense":
            parts = [gate_up.to(self.dtype), down.to(self.dtype)]
        elif self.kind == "int8":
            parts = [*quantize_int8(gate_up), *quantize_int8(down)]
        else:
            (q1, sz1), (q2, sz2) = quantize_int4(gate_up, self.group_size), quantize_int4(down, self.group_size)
            parts = [pack_int4(q1), sz1, pack_int4(q2), sz2]
        for view, part in zip(self.views(buf), parts + list(biases or ())):
            view.copy_(part)
        return buf

    def dequantize(self, packed: tuple[torch.Tensor, ...], dtype: torch.dtype | None = None):
        """Packed views -> (gate_up [2I, H], down [H, I]) in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if self.kind == "dense" and self.transposed:
            return packed[0].T.to(dtype), packed[1].T.to(dtype)  # views: F.linear reads them transposed
        if self.kind == "dense":
            return packed[0].to(dtype), packed[1].to(dtype)
        if self.kind == "int8":
            return dequantize_int8(packed[0], packed[1], dtype), dequantize_int8(packed[2], packed[3], dtype)
        if self.kind == "mxfp4":
            return dequantize_mxfp4(packed[0], packed[1], dtype), dequantize_mxfp4(packed[2], packed[3], dtype)
        return (dequantize_int4(unpack_int4(packed[0]), packed[1], dtype),
                dequantize_int4(unpack_int4(packed[2]), packed[3], dtype))

    def biases(self, packed: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple:
        """(gate_up bias [2I], down bias [H]) in `dtype`, or (None, None)."""
        if not self.bias:
            return None, None
        return packed[-2].to(dtype), packed[-1].to(dtype)

    # ---- config.json -------------------------------------------------------------

    def config_block(self) -> dict:
        return {"method": METHOD, "version": VERSION, "experts": self.kind, "group_size": self.group_size,
                "bias": self.bias, "interleaved": self.interleaved, "scale_dtype": "bfloat16",
                "int4_block": INT4_BLOCK, "bytes_per_expert": self.nbytes}


def parse_experts(value) -> tuple[str, int]:
    """The `experts=` option: "int4", "int4-g64", "int8", or None/"bf16"... (as stored) -> (kind, group)."""
    if value is None:
        return "dense", 0
    text = str(value).lower().replace("_", "-")
    if text in ("bf16", "fp16", "fp32", "dense", "none"):
        return "dense", 0
    if text == "int8":
        return "int8", 0
    if text == "int4":
        return "int4", DEFAULT_GROUP_SIZE
    if text.startswith("int4-g") and text[6:].isdigit():
        return "int4", int(text[6:])
    raise OffloadError(f"experts={value!r} is not a format; use int8, int4 (group {DEFAULT_GROUP_SIZE}), "
                       f"int4-g32, int4-g64 or int4-g128 (or leave it unset to keep the checkpoint's)")


def stored_format(raw_config: dict, hidden: int, width: int, dtype: torch.dtype) -> ExpertFormat:
    """The format a model directory's experts are stored in, from its config.json."""
    block = raw_config.get(CONFIG_KEY)
    if block is None and _gpt_oss(raw_config):
        # As transformers saves GPT-OSS (gate_up [E, H, 2I], down [E, I, H], biases), or as OpenAI ships
        # it: MXFP4 blocks and scales per piece (quantization_config.quant_method "mxfp4"), read as is.
        if mxfp4_checkpoint(raw_config):
            return ExpertFormat("mxfp4", hidden, width, dtype, bias=True, interleaved=True, apart=True)
        return ExpertFormat("dense", hidden, width, dtype, bias=True, interleaved=True, transposed=True)
    if block is None:
        return ExpertFormat("dense", hidden, width, dtype)
    if not isinstance(block, dict) or block.get("method") != METHOD:
        raise OffloadError(f"config.json's {CONFIG_KEY!r} block was not written by `offload quantize`; "
                           "re-create the model with `offload quantize`")
    if block.get("version") != VERSION or block.get("int4_block", INT4_BLOCK) != INT4_BLOCK:
        raise OffloadError(f"this quantized model was written by another version of moe-offload "
                           f"(format version {block.get('version')!r}, this one reads {VERSION}); quantize it again")
    kind = block.get("experts")
    if kind not in QUANTIZED:
        raise OffloadError(f"config.json's {CONFIG_KEY} block names experts={kind!r}; expected one of "
                           f"{', '.join(QUANTIZED)}")
    group, bias, interleaved = block.get("group_size", 0), block.get("bias", False), block.get("interleaved", False)
    if not isinstance(group, int) or not isinstance(bias, bool) or not isinstance(interleaved, bool):
        raise OffloadError(f"config.json's {CONFIG_KEY} block has group_size, bias or interleaved of the wrong "
                           "type; quantize the model again")
    return ExpertFormat(kind, hidden, width, dtype, group if kind == "int4" else 0, bias, interleaved)


def _gpt_oss(raw_config: dict) -> bool:
    from .models import family_for

    try:
        return family_for(raw_config).expert_layout == "gpt_oss"
    except OffloadError:
        return False


def mxfp4_checkpoint(raw_config: dict) -> bool:
    """Whether config.json says the experts are MXFP4 as GPT-OSS ships them (read natively, not converted)."""
    q = raw_config.get("quantization_config")
    return isinstance(q, dict) and str(q.get("quant_method", "")).lower() == "mxfp4" and _gpt_oss(raw_config)
