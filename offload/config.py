"""Frozen configuration: the model's shape (from config.json) and the runtime's options."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import OffloadError
from .experts import ACT
from .models.family import Family

if TYPE_CHECKING:
    from .models.deepseek_v2 import LatentAttentionShape, LatentRope

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MAX_DIM = 1 << 24  # no real model has a size (hidden, vocab, experts, context...) anywhere near 16.7M
ROPE_TYPES = ("default", "linear", "yarn")


def _dtype_name(value) -> str:
    name = str(value or "float32").replace("torch.", "")
    if name not in DTYPES:
        raise OffloadError(f"unsupported dtype {value!r}; use one of: float32, bfloat16, float16")
    return name


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a MoE decoder, read from a Hugging Face config.json."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int  # routed expert width I
    intermediate_size: int  # dense MLP width (layers that are not sparse)
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling; 1.0 = default RoPE
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0
    hidden_act: str = "silu"
    dtype: str = "float32"  # the checkpoint's dtype
    sparse_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP
    sliding_windows: tuple[int | None, ...] = ()  # per layer: attention window or None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mlp_bias: bool = False  # DeepSeek-V2: biases in the dense and shared-expert MLPs
    # DeepSeek routers (offload/models/routing.py): weights x routed_scaling_factor; the choice is
    # limited to the best `topk_group` of `n_group` equal groups of experts ("group_limited_greedy" in
    # V2, always in V3).
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    # Multi-head latent attention (DeepSeek). Then num_kv_heads and head_dim describe the KV cache
    # (1 and kv_lora_rank + qk_rope_head_dim: the latent and the rotated key per token), not q/k/v heads.
    mla: LatentAttentionShape | None = None
    # YaRN RoPE of standard attention (frequencies, attention factor; decoder.rope_tables), None for
    # default or linear RoPE (rope_theta and rope_scaling_factor say all).
    rope: LatentRope | None = None
    # GPT-OSS's clamped SwiGLU (offload/models/gpt_oss.py): the clamp and the sigmoid's gain.
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self):
        if self.hidden_size <= 0 or self.num_layers <= 0 or self.num_heads <= 0:
            raise OffloadError("config.json has non-positive hidden_size, num_hidden_layers or num_attention_heads")
        sizes = {"vocab_size": self.vocab_size, "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                 "num_experts": self.num_experts, "moe_intermediate_size": self.moe_intermediate_size,
                 "max_position_embeddings": self.max_position_embeddings,
                 "intermediate_size": self.intermediate_size if not all(self.sparse_layers) else 1}
        bad = [f"{k}={v}" for k, v in sizes.items() if not 0 < v <= MAX_DIM] + (
            [f"shared_expert_intermediate_size={self.shared_expert_intermediate_size}"]
            if self.shared_expert_intermediate_size < 0 else [])
        if bad:
            raise OffloadError(f"config.json has sizes out of range ({', '.join(bad)}: each must be 1..{MAX_DIM}); "
                               "the file is damaged")
        if self.num_heads % self.num_kv_heads:
            raise OffloadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if not 0 < self.top_k <= self.num_experts:
            raise OffloadError(f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.hidden_act not in ACT:
            raise OffloadError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACT)}")
        if len(self.sparse_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise OffloadError("per-layer settings do not match num_hidden_layers")
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not all(w is None or whole(w) and w > 0 for w in self.sliding_windows):
            raise OffloadError(f"config.json's sliding_window must be a positive whole number or null, "
                               f"not {next(w for w in self.sliding_windows if w is not None)!r}")
        if not all(whole(t) for t in self.eos_token_ids) or not (self.bos_token_id is None
                                                                  or whole(self.bos_token_id)):
            raise OffloadError("config.json's bos_token_id and eos_token_id must be token ids (whole numbers)")
        grouped = self.family.router == "deepseek_v3" or self.topk_method == "group_limited_greedy"
        # V3 ranks a group by its two best experts: groups of at least two.
        smallest = 2 if self.family.router == "deepseek_v3" else 1
        if grouped and (self.n_group <= 0 or self.num_experts % self.n_group
                        or self.num_experts // self.n_group < smallest or not 0 < self.topk_group <= self.n_group
                        or self.top_k > self.topk_group * (self.num_experts // self.n_group)):
            raise OffloadError(
                f"n_group={self.n_group} must divide n_routed_experts={self.num_experts} into groups of at least "
                f"{smallest}, and topk_group={self.topk_group} groups (1..n_group) must hold "
                f"num_experts_per_tok={self.top_k} experts")
        if self.family.attention == "mla" and self.mla is None:
            raise OffloadError(f"{self.family.architecture} needs its latent attention settings (kv_lora_rank, ...)")

    @property
    def moe_layers(self) -> list[int]:
        """Decoder indices of the layers with a MoE block (position in this list = MoE position)."""
        return [i for i, sparse in enumerate(self.sparse_layers) if sparse]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the KV cache holds per token over all layers: keys and values of num_kv_heads x
        head_dim, or with latent attention one row of kv_lora_rank + qk_rope_head_dim values."""
        size = torch.empty((), dtype=dtype or self.torch_dtype).element_size()
        per_layer = self.num_kv_heads * self.head_dim * (1 if self.mla is not None else 2)
        return self.num_layers * per_layer * size

    @classmethod
    def from_dict(cls, raw: dict, family: Family) -> "ModelConfig":
        """Common keys here, family-specific ones in `family.parse`."""
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            if min(hidden, heads, layers) <= 0 or max(hidden, heads, layers) > MAX_DIM:
                raise OffloadError("config.json has non-positive hidden_size, num_hidden_layers or "
                                   "num_attention_heads; the file is damaged or not a model's config")
            # Latent attention reads its own RoPE (YaRN included) in its family's parser.
            rope_theta, rope_factor, rope = (10000.0, 1.0, None) if family.attention == "mla" else _rope(
                raw, family.default_rope_theta)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            common = dict(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                top_k=int(raw["num_experts_per_tok"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                rope_theta=rope_theta,
                rope_scaling_factor=rope_factor,
                rope=rope,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                hidden_act=str(raw.get("hidden_act", "silu")),
                dtype=_dtype_name(raw.get("dtype") or raw.get("torch_dtype")),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
            common.update(family.parse(raw))
        except KeyError as exc:
            raise OffloadError(f"config.json lacks the key {exc.args[0]!r} that {family.architecture} needs") from None
        except (TypeError, ValueError) as exc:
            raise OffloadError(f"config.json has a value of the wrong type: {exc}") from None
        return cls(family=family, **common)


def _rope(raw: dict, default_theta: float = 10000.0) -> tuple[float, float, LatentRope | None]:
    """(theta, linear factor, YaRN or None) from transformers 5's `rope_parameters` or older
    `rope_theta`/`rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise OffloadError(f"RoPE type {kind!r} is not supported yet; supported: {', '.join(ROPE_TYPES)}")
    if kind == "yarn":
        # transformers' YaRN parameters, read as for latent attention (one parser, one inv_freq: mla.py);
        # the layout is the decoder's rotate-half. A softmax-scale factor (mscale_all_dim) applies to
        # latent attention only.
        from .models.deepseek_v2 import _rope as yarn_rope

        rope, _ = yarn_rope({**raw, "rope_theta": theta}, "half")
        return theta, 1.0, rope
    factor = float(params.get("factor", scaling.get("factor", 1.0))) if kind == "linear" else 1.0
    return theta, factor, None


_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_memory(value, what: str) -> int | None:
    """'6GiB', '1.5TB', '512MiB', '4194304' or 4194304 -> bytes; None stays None (= measure).

    KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000 (any letter case; a trailing
    B alone or no unit means bytes). accelerate's convert_file_size_to_int, used before, refused
    digit strings and TiB/TB and read a lowercase 'Gb' as gigabits."""
    if value is None:
        return None
    match = _MEMORY.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match and match.group(2).lower() in _MEMORY_UNITS:
        size = int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])
    else:
        raise OffloadError(f"{what}={value!r} is not a memory size; write it like '6GiB', '512MB', '1TiB' or a "
                           "number of bytes ('4194304')")
    if size <= 0:
        raise OffloadError(f"{what}={value!r} must be positive")
    return size


CACHE_POLICIES = ("lru", "lfu", "score")
from .predictors import NAMES as PREDICTORS  # noqa: E402  (one list of names for every entry point)
DENSE_FORMATS = ("int8",)  # load(dense=...): the resident layers' weights (offload/dense.py)
CACHE_SPLITS = ("auto", "layer", "global")


@dataclass(frozen=True)
class RuntimeConfig:
    """Options of `offload.load`, validated once. Budgets and policies are
    accepted and checked here; the offloaded engine consumes them."""

    device: str = "auto"
    dtype: str | None = None  # None: the checkpoint's dtype (fp16 becomes fp32 on the CPU)
    gpu_memory: int | None = None
    cpu_memory: int | None = None
    cache_policy: str = "lru"
    cache_split: str = "auto"  # slots in equal per-layer shares, one "global" pool, or "auto" (see placement)
    predictor: str = "gate"
    profile: str | None = None
    threads: int | None = None  # torch's intra-op CPU threads; None: torch's default
    experts: str | None = None  # expert format: None (as stored), "int8", "int4", "int4-g64", ... (lossy)
    dense: str | None = None  # the resident layers' weights: None (the compute dtype) or "int8" (lossy)

    def __post_init__(self):
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise OffloadError(f"threads={self.threads!r} must be a whole number of at least 1 (or None for "
                               "torch's default, one per core)")
        if self.cache_split not in CACHE_SPLITS:
            raise OffloadError(f"cache_split={self.cache_split!r} is unknown; choose one of: {', '.join(CACHE_SPLITS)}")
        if self.cache_policy not in CACHE_POLICIES:
            raise OffloadError(f"cache_policy={self.cache_policy!r} is unknown; choose one of: {', '.join(CACHE_POLICIES)}")
        if self.predictor not in PREDICTORS:
            raise OffloadError(f"predictor={self.predictor!r} is unknown; choose one of: {', '.join(PREDICTORS)}")
        if self.dtype is not None:
            _dtype_name(self.dtype)
        resolve_device(self.device)  # raises on a bad name
        if self.experts is not None:
            from .formats import parse_experts

            parse_experts(self.experts)  # raises on an unknown format
        if self.dense is not None and self.dense not in DENSE_FORMATS:
            raise OffloadError(f"dense={self.dense!r} is not supported; use {' or '.join(DENSE_FORMATS)}, or None to "
                               "keep the checkpoint's dtype")

    @classmethod
    def build(cls, device="auto", dtype=None, gpu_memory=None, cpu_memory=None, cache_policy="lru",
              cache_split="auto", predictor="gate", profile=None, threads=None, experts=None,
              dense=None) -> "RuntimeConfig":
        return cls(
            device=str(device),
            dtype=None if dtype is None else str(dtype).replace("torch.", ""),
            gpu_memory=parse_memory(gpu_memory, "gpu_memory"),
            cpu_memory=parse_memory(cpu_memory, "cpu_memory"),
            cache_policy=str(cache_policy).lower(),
            cache_split=str(cache_split).lower(),
            predictor=str(predictor).lower(),
            profile=profile,
            threads=threads,
            experts=None if experts is None else str(experts),
            dense=None if dense is None else str(dense).lower(),
        )

    def compute_dtype(self, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[_dtype_name(self.dtype)]
        if device.type == "cpu" and checkpoint_dtype in ("float16", "fp16", "half"):
            return torch.float32  # fp16 matmuls are slow or missing on CPUs; fp32 holds fp16 exactly
        return DTYPES[checkpoint_dtype]


# An expert's matvec under this many FLOPs per token (6 * H * I) takes well under a millisecond on one
# thread: more threads only add synchronisation, and OpenMP's spinning threads collapse when another
# process holds a core (the demo model, 2 cores, one busy: 4 tok/s with 2 threads, 130-240 with 1).
SMALL_EXPERT_FLOPS = 4_000_000


def default_threads(cfg: ModelConfig) -> int:
    """torch's CPU threads when the user sets none: 1 for models whose experts are tiny, else one
    per physical core (matvecs on big experts are bound by memory bandwidth, which more cores
    draw more of; hyperthreads share a core's bandwidth and only add contention)."""
    import psutil

    if 6 * cfg.hidden_size * cfg.moe_intermediate_size < SMALL_EXPERT_FLOPS:
        return 1
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda:1' checked against what exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OffloadError(f"device={name!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OffloadError(f"device={name!r} but this torch build sees no CUDA GPU; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OffloadError(f"device={name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise OffloadError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda'")
    return device
