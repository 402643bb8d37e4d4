"""GPTQ, AWQ and FP8 checkpoints -> this runtime's own model directory, converted once and cached.

A model directory whose config.json has a `quantization_config` comes here (sources/__init__.py).
It is rewritten, one decoder layer at a time, into offload/writer.py's layout in the user's cache
and loaded from there like any other model:

  source (quant_method)                      routed experts become         other quantized linears
  gptq, 4 bits ("gptq" or "gptq_v2" format)  int4, the source's groups     dequantized to the
  awq, 4 bits (version "gemm")               int4, the source's groups     config's dtype (fp16,
  gptq, 8 bits                               int8 per output row (lossy)   bf16...): routers, norms
  fp8 (float8 weights, weight_scale_inv)     int8 per output row (lossy)   and embeddings stay as stored

The sources' arithmetic, for a linear W [N, K] (N outputs, K inputs, groups of g inputs):

  GPTQ  qweight int32 [K*b/32, N], packed along K: int32 row r holds inputs (32/b)*r + j in bits
        b*j.. (low bits first); qzeros int32 [K/g, N*b/32], the same packing along N ("gptq"
        stores z - 1, "gptq_v2" z); scales fp16 [K/g, N]; g_idx int32 [K], each input's group
        (act-order where it is not k // g).  W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])
  AWQ   qweight int32 [K, N/8], packed along N: column 8c + j sits in nibble AWQ_ORDER[j] of int32 c;
        qzeros int32 [K/g, N/8] the same; scales fp16 [K/g, N].  W = (q - z) * s
  FP8   weight float8_e4m3fn [N, K]; weight_scale_inv fp32 [ceil(N/bn), ceil(K/bk)] for blocks
        [bn, bk] = weight_block_size, or weight_scale, one per tensor.  W = weight * its block's scale

Our int4 is W = (q - 8) * scale + zero per group along K (offload/quant.py), so a GPTQ or AWQ
nibble is kept as it is, with scale = s and zero = s * (8 - z), both rounded to bf16: that rounding
is the only loss, |8 - q| * |ds| + |dz| <= s / 32 (2^-9 relative each; a symmetric checkpoint
has z = 8 and zero = 0, so <= s / 64). A source group that is a multiple of ours (256, or -1 for
one group per row) repeats its scales over our groups, also exactly.

GPTQ act-order (g_idx not k // g) scatters a group's inputs along K. For down_proj, K is the
expert's intermediate dimension, private to the expert: sorting it by group and moving gate's and
up's output rows the same way changes nothing the expert computes, so down stays exact. For
gate/up, K is the hidden state shared by every expert: keeping their groups would need the
activations permuted on every call, which the expert kernels do not do, so those matrices are
dequantized and rounded again to our int4 grid (up to half a step more error; counted in the
model's `moe_offload_source` note as `requantized`). FP8 and 8-bit GPTQ experts are dequantized and
rounded to our int8 (symmetric per output row): no kernel here computes FP8 (CPUs have none; FP8
matmuls need an sm89+ GPU), so their bytes per expert stay 1 per weight but the values move.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OffloadError

SUPPORTED = ("gptq (4-bit to int4, 8-bit to int8), awq (4-bit, version \"gemm\", to int4) and fp8 "
             "(float8 weights with block scales `weight_scale_inv`, to int8)")
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ "gemm": column 8c + j of a row is nibble AWQ_ORDER[j] of int32 c
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
# FP8: `weight_scale_inv` (block scales, DeepSeek-V3 / Qwen3 style) or `weight_scale` (one scale per
# tensor, AutoFP8 style); either multiplies the float8 values. Activation scales go unused: activations
# stay in the compute dtype.
FP8_SCALES = ("weight_scale_inv", "weight_scale")
FP8_PARTS = ("weight", *FP8_SCALES, "input_scale", "activation_scale")
# Not model weights: the side files of GPTQ/AWQ tools, and other weight formats.
SKIPPED_FILES = ("quantize_config.json", "quant_config.json")
SOURCE_NOTE = "moe_offload_source"  # config.json key describing what the model was converted from


@dataclass(frozen=True)
class Scheme:
    """A source's quantization_config, checked: how to read its quantized linears."""

    method: str  # "gptq", "awq" or "fp8"
    label: str  # for messages and the cache name: "gptq", "gptq_v2", "awq", "fp8"
    bits: int = 0  # gptq/awq
    group_size: int = 0  # gptq/awq, along K; -1: one group per row
    zero_offset: int = 0  # added to stored zero points (1 for "gptq" v1 checkpoints)
    block: tuple[int, int] | None = None  # fp8 weight_block_size [bn, bk]; None: inferred from the scales
    note: dict = field(default_factory=dict, compare=False)

    @property
    def int4(self) -> bool:
        return self.method in ("gptq", "awq") and self.bits == 4


def read_scheme(q: dict) -> Scheme:
    """config.json's quantization_config -> Scheme, or one OffloadError saying what is supported."""
    if not isinstance(q, dict):
        raise OffloadError("config.json's quantization_config is not an object; re-download the model")
    method = str(q.get("quant_method", "")).lower()
    if method == "gptq":
        bits = q.get("bits")
        if bits not in (4, 8):
            raise OffloadError(f"this GPTQ checkpoint has {bits}-bit weights; moe-offload converts 4-bit GPTQ "
                               "(to its int4) and 8-bit GPTQ (to int8); use a 4- or 8-bit checkpoint or the "
                               "unquantized original")
        form = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if form not in ("gptq", "gptq_v2"):
            raise OffloadError(f"this GPTQ checkpoint is stored in the {form!r} format; moe-offload reads the "
                               "\"gptq\" and \"gptq_v2\" formats (GPTQModel can save those)")
        group = _group(q.get("group_size", 128), "GPTQ")
        return Scheme("gptq", form, bits, group, 1 if form == "gptq" else 0,
                      note={"format": form, "bits": bits, "group_size": group, "sym": q.get("sym"),
                            "desc_act": q.get("desc_act")})
    if method == "awq":
        bits = q.get("bits", q.get("w_bit", 4))
        if bits != 4:
            raise OffloadError(f"this AWQ checkpoint has {bits}-bit weights; moe-offload converts 4-bit AWQ only")
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise OffloadError(f"this AWQ checkpoint is packed for the {version!r} kernels; moe-offload reads "
                               "AWQ version \"gemm\" (the common one: AutoAWQ's default)")
        if q.get("zero_point") is False:
            raise OffloadError("this AWQ checkpoint has no zero points (zero_point: false); moe-offload reads "
                               "AWQ with zero points (AutoAWQ's default)")
        group = _group(q.get("group_size", q.get("q_group_size", 128)), "AWQ")
        return Scheme("awq", "awq", 4, group, note={"format": "awq", "bits": 4, "group_size": group,
                                                    "version": "gemm"})
    if method == "fp8":
        form = str(q.get("fmt", "e4m3")).lower()
        block = q.get("weight_block_size")
        if block is not None and (not isinstance(block, (list, tuple)) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise OffloadError(f"quantization_config's weight_block_size {block!r} is not two positive integers")
        return Scheme("fp8", "fp8", block=tuple(block) if block else None,
                      note={"format": "fp8", "fmt": form, "weight_block_size": list(block) if block else None})
    shown = f"{method!r}" if method else "an unnamed method (no quant_method)"
    raise OffloadError(f"this checkpoint is quantized with {shown}, which moe-offload cannot read; it converts "
                       f"{SUPPORTED}. Load the unquantized original instead (`offload quantize` or "
                       "experts=\"int4\" makes int8/int4 experts from it)")


def _group(value, what: str) -> int:
    if not isinstance(value, int) or (value <= 0 and value != -1):
        raise OffloadError(f"this {what} checkpoint has group_size={value!r}; expected a positive integer or -1")
    return value


# ---- open: convert once into the cache ----------------------------------------------------------

def open_prequantized(path: Path, config: dict, echo=None) -> Path:
    """The cached conversion of the GPTQ/AWQ/FP8 model directory `path` (made now if absent)."""
    from . import cached_conversion

    scheme = read_scheme(config.get("quantization_config"))
    fmt = target_format(path, scheme)  # an impossible conversion fails here, before anything is written
    files = [f for f in path.iterdir() if f.name == "config.json" or f.name.endswith(".safetensors")]
    name = path.parent.parent.name if path.parent.name == "snapshots" else path.name  # hub cache: the repo
    return cached_conversion("prequantized", f"{name}-{scheme.label}", files,
                             lambda target: convert(path, target, scheme, progress=echo is not None, echo=echo),
                             f"converting the {scheme.label.upper()} checkpoint {path} ({fmt.name} experts)", echo)


def target_format(path: Path, scheme: Scheme):
    """The ExpertFormat the experts of `path` become."""
    from ..checkpoint import Checkpoint
    from ..formats import ExpertFormat
    from ..quant import GROUP_SIZES, INT4_BLOCK

    ckpt = Checkpoint(path)
    ckpt.close()
    cfg = ckpt.config
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    if not scheme.int4:
        return ExpertFormat("int8", h, i, cfg.torch_dtype)
    src = scheme.group_size
    fits = [g for g in sorted(GROUP_SIZES, reverse=True) if h % g == 0 and i % g == 0 and (src == -1 or src % g == 0)]
    if src in fits:
        fits = [src]
    if not fits or h % INT4_BLOCK or (2 * i) % INT4_BLOCK:
        raise OffloadError(
            f"this {scheme.label.upper()} checkpoint's groups of {src} inputs do not map onto moe-offload's int4 "
            f"(groups of {', '.join(map(str, GROUP_SIZES))} inputs dividing hidden_size={h} and "
            f"moe_intermediate_size={i}, with hidden_size and 2 x moe_intermediate_size multiples of {INT4_BLOCK}); "
            "use a checkpoint quantized with group size 32, 64 or 128, or the unquantized original")
    return ExpertFormat("int4", h, i, cfg.torch_dtype, fits[0])


# ---- one quantized linear, read -------------------------------------------------------------------

@dataclass
class Grouped:
    """A GPTQ or AWQ matrix, unpacked: W[n, k] = scale[g_idx[k], n] * (q[n, k] - zero[g_idx[k], n])."""

    q: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # [G, N], the checkpoint's dtype (fp16)
    zero: torch.Tensor  # int16 [G, N], the effective zero point
    g_idx: torch.Tensor  # int64 [K]
    group: int  # inputs per group (K for group_size -1)

    @property
    def contiguous(self) -> bool:
        k = self.q.shape[1]
        return torch.equal(self.g_idx, torch.arange(k) // self.group)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        s, z = self.scale.float()[self.g_idx].T, self.zero.float()[self.g_idx].T  # [N, K]
        return s * (self.q.float() - z)

    def permute_inputs(self, perm: torch.Tensor) -> Grouped:
        return Grouped(self.q[:, perm], self.scale, self.zero, self.g_idx[perm], self.group)

    def permute_outputs(self, perm: torch.Tensor) -> Grouped:
        return Grouped(self.q[perm], self.scale[:, perm], self.zero[:, perm], self.g_idx, self.group)

    def as_int4(self, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(nibbles [N, K], scales_and_zeros bf16 [K/group, N, 2]) in our int4, exactly but for the
        bf16 rounding; None where the groups do not line up (act-order)."""
        from ..quant import SCALE_DTYPE

        k = self.q.shape[1]
        if self.q.max() > 15 or self.group % group or not self.contiguous:
            return None
        theirs = torch.arange(k // group) * group // self.group  # [K/group]: their group of each of ours
        s, z = self.scale.float()[theirs], self.zero.float()[theirs]  # [K/group, N]
        return self.q, torch.stack([s, s * (8 - z)], dim=-1).to(SCALE_DTYPE)  # zero: q = 8 maps to it


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] holding 32/bits values per int32 along R, low bits first -> [R * 32/bits, C]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [R, 32/bits, C]
    return values.reshape(-1, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 [R, C] holding 32/bits values per int32 along C -> [R, C * 32/bits]; `order[j]`: the
    value slot (0 = lowest bits) holding column j of each int32 (AWQ interleaves them)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)  # [R, C, 32/bits]
    if order is not None:
        values = values[..., list(order)]
    return values.reshape(packed.shape[0], -1)


class Source:
    """The quantized linears of a checkpoint, by base name (`model.layers.0.self_attn.q_proj`)."""

    def __init__(self, ckpt, scheme: Scheme):
        self.ckpt, self.scheme = ckpt, scheme
        names = ckpt.weight_map
        markers = FP8_SCALES if scheme.method == "fp8" else ("qweight",)
        parts = FP8_PARTS if scheme.method == "fp8" else GPTQ_PARTS
        self.quantized = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] in markers}
        self.consumed = {f"{b}.{p}" for b in self.quantized for p in parts} & set(names)

    def has_matrix(self, base: str) -> bool:
        return base in self.quantized or self.ckpt.has(base + ".weight")

    def matrix(self, base: str) -> Grouped | torch.Tensor:
        """A quantized linear as Grouped (GPTQ/AWQ) or dequantized float32 (FP8); a plain one as stored."""
        if base not in self.quantized:
            w = self.ckpt.tensor(base + ".weight")
            if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise OffloadError(f"{base}.weight is float8 without a weight_scale_inv or weight_scale beside it; "
                                   "the checkpoint is damaged or in a float8 layout moe-offload does not read")
            return w
        try:
            return self._fp8(base) if self.scheme.method == "fp8" else self._grouped(base)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise OffloadError(f"cannot unpack {base} ({exc}); the checkpoint is damaged or does not match its "
                               f"quantization_config") from None

    def _grouped(self, base: str) -> Grouped:
        s, t = self.scheme, self.ckpt.tensor
        qweight, qzeros, scale = t(base + ".qweight"), t(base + ".qzeros"), t(base + ".scales")
        if s.method == "gptq":
            q = unpack_along_rows(qweight, s.bits).T  # [N, K]
            zero = unpack_along_cols(qzeros, s.bits)
            zero = (zero + s.zero_offset) & ((1 << s.bits) - 1)  # v1 stores z - 1, modulo 2^bits
        else:
            q = unpack_along_cols(qweight, 4, AWQ_ORDER).T  # [N, K]
            zero = unpack_along_cols(qzeros, 4, AWQ_ORDER)
        n, k = q.shape
        group = k if s.group_size == -1 else s.group_size
        groups = -(-k // group)
        if s.method == "gptq" and self.ckpt.has(base + ".g_idx"):
            g_idx = t(base + ".g_idx").long()
        else:
            g_idx = torch.arange(k) // group
        zero = zero[:, :n]  # N*b/32 int32 columns may carry padding
        if scale.shape != (groups, n) or zero.shape != (groups, n) or g_idx.shape != (k,) or (
                k and not 0 <= int(g_idx.min()) <= int(g_idx.max()) < groups):
            raise OffloadError(f"{base}: qweight gives a [{n}, {k}] matrix, but scales {tuple(scale.shape)}, qzeros "
                               f"(unpacked) {tuple(zero.shape)} and g_idx {tuple(g_idx.shape)} do not fit groups of "
                               f"{group}; the checkpoint is damaged or does not match its quantization_config")
        return Grouped(q.to(torch.uint8), scale, zero.to(torch.int16), g_idx, group)

    def _fp8(self, base: str) -> torch.Tensor:
        w = self.ckpt.tensor(base + ".weight")
        inv = self.ckpt.tensor(base + "." + next(n for n in FP8_SCALES if self.ckpt.has(f"{base}.{n}")))
        if inv.dtype == torch.uint8:  # E8M0 exponents stored as bytes: 2^(b - 127)
            inv = torch.exp2(inv.float() - 127)
        inv = inv.float()
        n, k = w.shape
        if inv.numel() == 1:
            return w.float() * inv.reshape(())
        bn, bk = self.scheme.block or (-(-n // inv.shape[0]), -(-k // inv.shape[1]))
        if inv.shape != (-(-n // bn), -(-k // bk)):
            raise OffloadError(f"{base}'s weight scales have shape {tuple(inv.shape)}, not one per [{bn}, {bk}] "
                               f"block of the [{n}, {k}] weight; the checkpoint does not match its weight_block_size")
        scale = inv.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]  # [N, K]
        return w.float() * scale


def dense(m: Grouped | torch.Tensor) -> torch.Tensor:
    return m.dequantize() if isinstance(m, Grouped) else m.float()


# ---- the conversion -------------------------------------------------------------------------------

@dataclass
class Tally:
    experts: int = 0
    folded: int = 0  # act-order down_proj made exact by reordering the expert's intermediate dimension
    requantized: int = 0  # expert matrices rounded again to our grid (act-order gate/up, plain float ones)


def convert(src: Path, out: Path, scheme: Scheme, progress: bool = True, echo=None) -> Path:
    """Write the GPTQ/AWQ/FP8 model directory `src` to `out` in this runtime's layout (all or nothing)."""
    from tqdm.auto import tqdm

    from ..checkpoint import Checkpoint
    from ..writer import INDEX, PACKED, ModelWriter, staged_directory

    fmt = target_format(src, scheme)
    ckpt = Checkpoint(src)
    try:
        cfg, family = ckpt.config, ckpt.family
        source = Source(ckpt, scheme)
        prefixes = "|".join(re.escape(p) for p in (family.moe_prefix, *family.moe_aliases))
        expert = re.compile(rf"model\.layers\.(\d+)\.(?:{prefixes})\.experts\.(\d+)\.")
        bases = sorted(source.quantized)
        stray = [n for n in ckpt.weight_map if ".experts." in n and not expert.match(n)]
        if stray:
            raise OffloadError(f"{src} stores routed experts as {stray[0]} (and {len(stray) - 1} more such "
                               "tensors); moe-offload converts per-expert GPTQ/AWQ/FP8 linears (experts.N.<name>) only")
        tally = Tally()
        moe = set(cfg.moe_layers)
        with staged_directory(out) as tmp:
            writer = ModelWriter(tmp)
            bar = tqdm(total=len(moe) * cfg.num_experts, unit="expert", disable=not progress,
                       desc=f"converting {scheme.label} experts to {fmt.name}", file=sys.stderr)
            try:
                for layer in range(cfg.num_layers):
                    prefix = f"model.layers.{layer}."
                    tensors = _resident(ckpt, source, [b for b in bases if b.startswith(prefix)],
                                        [n for n in ckpt.weight_map if n.startswith(prefix)], expert, cfg.torch_dtype)
                    if layer in moe:
                        packed = torch.empty((cfg.num_experts, fmt.nbytes), dtype=torch.uint8)  # [E, bytes]
                        for e in range(cfg.num_experts):
                            packed[e] = _expert(source, _expert_bases(source, family, layer, e), fmt, tally)
                            bar.update()
                        tensors[f"{prefix}{family.moe_prefix}.{PACKED}"] = packed
                    writer.add_layer(layer, tensors)
                writer.add("model-rest.safetensors", _resident(
                    ckpt, source, [b for b in bases if not b.startswith("model.layers.")],
                    [n for n in ckpt.weight_map if not n.startswith("model.layers.")], expert, cfg.torch_dtype))
            finally:
                bar.close()
            for f in src.iterdir():  # tokenizer, generation config, chat template, model card
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and (
                        f.name not in (INDEX, "config.json", *SKIPPED_FILES)):
                    shutil.copy2(f, tmp / f.name)
            config = {k: v for k, v in ckpt.raw_config.items() if k != "quantization_config"}
            config[SOURCE_NOTE] = {**scheme.note, "became": fmt.name, "act_order_folded": tally.folded,
                                   "requantized": tally.requantized}
            writer.finish(config, fmt)
    finally:
        ckpt.close()
    if echo is not None and tally.requantized:
        echo(f"note: {tally.requantized} of {3 * tally.experts} expert matrices (act-order gate/up projections, "
             f"or experts stored unquantized) were rounded again to {fmt.name}: lossy beyond the source")
    return out


def _resident(ckpt, source: Source, bases: list[str], names: list[str], expert, dtype) -> dict:
    """Non-expert tensors: quantized linears dequantized to `dtype`, everything else as stored."""
    out = {}
    for base in bases:
        if not expert.match(base + "."):
            out[base + ".weight"] = dense(source.matrix(base)).to(dtype)
    for name in names:
        if name not in source.consumed and not expert.match(name) and name not in out:
            out[name] = source.matrix(name[:-7]) if name.endswith(".weight") else ckpt.tensor(name)
    return out


def _expert_bases(source: Source, family, layer: int, e: int) -> list[str]:
    for prefix in (family.moe_prefix, *family.moe_aliases):
        bases = [f"model.layers.{layer}.{prefix}.experts.{e}.{n}" for n in family.expert_names]
        if all(source.has_matrix(b) for b in bases):
            return bases
    raise OffloadError(f"{source.ckpt.path} has no (complete) weights for expert {e} of layer {layer}; "
                       "the checkpoint does not match its config.json")


def _expert(source: Source, bases: list[str], fmt, tally: Tally) -> torch.Tensor:
    """One expert's bytes in `fmt` (gate, up, down read from the source)."""
    from ..quant import pack_int4, quantize_int4

    gate, up, down = (source.matrix(b) for b in bases)
    shapes = [tuple(m.q.shape if isinstance(m, Grouped) else m.shape) for m in (gate, up, down)]
    h, i = fmt.hidden, fmt.width
    if shapes != [(i, h), (i, h), (h, i)]:
        raise OffloadError(f"{bases[0].rsplit('.', 1)[0]} holds matrices of shapes {shapes}, but config.json implies "
                           f"{[(i, h), (i, h), (h, i)]}; the checkpoint does not match its config.json")
    tally.experts += 1
    if fmt.kind == "int8":
        return fmt.quantize(dense(gate), dense(up), dense(down))
    if isinstance(down, Grouped) and not down.contiguous:
        # Act-order down_proj: sort the intermediate dimension by group; gate's and up's output rows
        # follow, so the expert computes the same function with down's groups contiguous.
        perm = torch.argsort(down.g_idx, stable=True)
        if torch.equal(down.g_idx[perm], torch.arange(i) // down.group):
            down = down.permute_inputs(perm)
            gate, up = (m.permute_outputs(perm) if isinstance(m, Grouped) else m[perm] for m in (gate, up))
            tally.folded += 1
    parts = []
    for m in (gate, up, down):
        exact = m.as_int4(fmt.group_size) if isinstance(m, Grouped) else None
        if exact is None:  # act-order gate/up (groups scattered over the hidden state), or a float matrix
            exact = quantize_int4(dense(m), fmt.group_size)
            tally.requantized += 1
        parts.append(exact)
    (qg, szg), (qu, szu), (qd, szd) = parts
    buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    pieces = [pack_int4(torch.cat([qg, qu])), torch.cat([szg, szu], dim=1), pack_int4(qd), szd]
    for view, piece in zip(fmt.views(buf), pieces):
        view.copy_(piece)
    return buf
