"""`offload quantize`: a model directory with int8 or int4 experts, written once.

The output is an ordinary model directory: config.json (the source's, plus a
`quantization` block naming the format), the tokenizer files copied, and
safetensors shards holding the non-expert weights unchanged and, per MoE
layer, one uint8 tensor `...experts.packed` [E, bytes per expert] whose row e
is expert e in the format of offload/formats.py (one contiguous extent).

It streams: one layer's non-expert tensors and packed experts at a time, each
expert read alone, so the peak memory is about one layer in the output format
plus one expert in float. Everything is written into a hidden temporary
directory next to `out`, renamed into place at the end; an error or Ctrl-C
removes it, so `out` is either complete or absent.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import OffloadError
from .formats import ExpertFormat, parse_experts
from .writer import INDEX, PACKED, ModelWriter, check_new_directory, staged_directory


def quantize_model(model, out, experts: str = "int4", group_size: int | None = None, progress: bool = True) -> Path:
    """Write `model` (a directory or hub id) with its experts in `experts` ("int8" or "int4") to `out`."""
    from tqdm.auto import tqdm

    from .cache.store import ExpertReader, SlotPool

    kind, default_group = parse_experts(experts)
    if kind == "dense":
        raise OffloadError(f"experts={experts!r} is not a quantized format; use int8 or int4")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise OffloadError(f"group_size={group_size!r} must be a positive whole number (32, 64 or 128), or None")
    group = (group_size or default_group) if kind == "int4" else 0
    if kind == "int8" and group_size:
        raise OffloadError("--group-size applies to int4 only; int8 has one scale per output channel")
    out = Path(out).expanduser()
    check_new_directory(out)
    from .sources import model_directory

    src = model_directory(model)  # a GGUF, GPTQ, AWQ or FP8 source is converted first (and refused below)
    ckpt = Checkpoint(src)
    try:
        # GPT-OSS's MXFP4 experts may be quantized again (lossy, opt-in): on a CPU they dequantize per call
        # (hundreds of ms per expert), where int8 (0.8% from the MXFP4 weights) and int4 have fast kernels.
        if ckpt.expert_format.quantized and ckpt.expert_format.kind != "mxfp4":
            raise OffloadError(f"{src} already holds {ckpt.expert_format.name} experts; quantize the original "
                               "(unquantized) checkpoint instead")
        cfg = ckpt.config
        have = ckpt.expert_format  # GPT-OSS: transposed, interleaved, with biases (kept: bias, interleaved)
        fmt = ExpertFormat(kind, cfg.hidden_size, cfg.moe_intermediate_size, cfg.torch_dtype, group,
                           bias=have.bias, interleaved=have.interleaved)
        reading = SlotPool(1, replace(have, dtype=torch.float32), torch.device("cpu"))
        names = [n for n in ckpt.weight_map if n.startswith(("model.", "lm_head."))]
        moe = set(cfg.moe_layers)
        with staged_directory(out) as tmp:
            writer = ModelWriter(tmp)
            reader = ExpertReader(ckpt.expert_extents, ckpt.shard_files())
            bar = tqdm(total=len(moe) * cfg.num_experts, unit="expert", disable=not progress,
                       desc=f"quantizing experts to {fmt.name}", file=sys.stderr)
            try:
                for layer in range(cfg.num_layers):
                    prefix = f"model.layers.{layer}."
                    tensors = {n: ckpt.tensor(n) for n in names if n.startswith(prefix) and not _is_expert(n)}
                    if layer in moe:
                        packed = torch.empty((cfg.num_experts, fmt.nbytes), dtype=torch.uint8)  # [E, bytes]
                        for e in range(cfg.num_experts):
                            reader.read(layer, e, reading.targets(0))
                            gate_up, down = have.dequantize(reading[0], torch.float32)  # [2I, H], [H, I]
                            # The rows' halves as the slot holds them: gate then up, or GPT-OSS's
                            # alternating rows (kept in that order; quantization is row by row).
                            packed[e] = fmt.quantize(gate_up[:cfg.moe_intermediate_size],
                                                     gate_up[cfg.moe_intermediate_size:], down,
                                                     have.biases(reading[0], torch.float32) if have.bias else None)
                            bar.update()
                        tensors[f"{prefix}{cfg.family.moe_prefix}.{PACKED}"] = packed
                    writer.add_layer(layer, tensors)
                rest = [n for n in names if not n.startswith("model.layers.")]
                for i, name in enumerate(rest):  # one shard each: embeddings and LM head can be the largest
                    writer.add(f"model-rest{i:02d}.safetensors", {name: ckpt.tensor(name)})
            finally:
                bar.close()
                reader.close()
            for f in src.iterdir():  # tokenizer, generation config, chat template, model card
                if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX, "config.json"):
                    shutil.copy2(f, tmp / f.name)
            # The experts are no longer the source's MXFP4: its quantization_config would misdescribe them.
            writer.finish({k: v for k, v in ckpt.raw_config.items() if k != "quantization_config"}
                          if have.kind == "mxfp4" else ckpt.raw_config, fmt)
    finally:
        ckpt.close()
    return out


def _is_expert(name: str) -> bool:
    """Routed expert weights (per-expert or fused); routers and shared experts are not."""
    return ".experts." in name


# ---- load(model, experts="int4"): quantize once into the user's cache ----------------

def cached_quantized(src: Path, experts: str, echo=None) -> Path:
    """The quantized copy of `src` in the cache (made now if absent)."""
    from .sources import cached_conversion

    kind, group = parse_experts(experts)
    fmt = f"{kind}-g{group}" if kind == "int4" else kind
    files = [f for f in src.iterdir() if f.name == "config.json" or f.name.endswith(".safetensors")]
    return cached_conversion("quantized", f"{src.name}-{fmt}", files,
                             lambda target: quantize_model(src, target, kind, group or None, progress=echo is not None),
                             f"quantizing the experts of {src} to {fmt}", echo)
