"""DeepSeek-V2 (DeepSeek-V2, V2-Lite, V2.5, Coder-V2): multi-head latent attention
(offload/models/mla.py), the first `first_k_dense_replace` layers dense, every MoE
layer with `n_shared_experts` ungated shared experts beside the routed ones, and a
float32 softmax router that picks top-k greedily or within the best `topk_group`
of `n_group` expert groups (by each group's best score), scaled by
`routed_scaling_factor`.

As transformers computes it (the oracle): the V2 router never renormalises the k
weights, whatever `norm_topk_prob` says (DeepSeek's own code did when it was true;
every published V2 config sets it false). `moe_layer_freq` (1 in every published
config, ignored by transformers) is honoured as DeepSeek's code did: layer i is
sparse when i >= first_k_dense_replace and i % moe_layer_freq == 0.

The parser here is shared with DeepSeek-V3 (deepseek_v3.py), whose differences are
data: the router rule, the RoPE layout and the defaults of missing keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OffloadError
from .family import Family

ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class LatentRope:
    """RoPE on the qk_rope_head_dim dimensions, as transformers' rope init functions compute it."""

    layout: str  # "complex": pairs (x0, x1), (x2, x3) rotated in float32 (V2); "interleave": the same pairs,
    #              output as [evens, odds] in the activation dtype (V3); "half": rotate_half (V3, rope_interleave=false)
    kind: str  # "default", "linear" or "yarn"
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int = 0  # YaRN: the pretraining context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # scales cos and sin (YaRN's mscale / mscale_all_dim)


@dataclass(frozen=True)
class LatentAttentionShape:
    """Multi-head latent attention: keys and values are rebuilt from one compressed latent per token."""

    kv_lora_rank: int  # R: the latent the KV cache holds (after kv_a_layernorm)
    q_lora_rank: int | None  # None: a plain q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    qk_nope_head_dim: int  # per head: query/key dims without position
    qk_rope_head_dim: int  # per token: the shared, rotated key dims (cached beside the latent)
    v_head_dim: int
    bias: bool  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj carry biases
    softmax_scale: float  # qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) ** 2
    rope: LatentRope

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent plus the rotated key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(raw: dict, layout: str) -> tuple[LatentRope, float]:
    """(the RoPE, the softmax scale's factor) from `rope_parameters` (transformers 5) or `rope_scaling`."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise OffloadError(f"RoPE type {kind!r} is not supported for multi-head latent attention; "
                           f"supported: {', '.join(ROPE_TYPES)}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if kind == "default":
        return LatentRope(layout, kind, theta), 1.0
    factor = params.get("factor")
    scale = 1.0
    mscale_all_dim = params.get("mscale_all_dim")
    if mscale_all_dim:  # transformers' yarn_apply_mscale: any non-default type with mscale_all_dim
        scale = _yarn_mscale(float(factor), float(mscale_all_dim)) ** 2
    if kind == "linear":
        return LatentRope(layout, kind, theta, factor=float(factor)), scale
    # A top-level original_max_position_embeddings wins, as in transformers' standardize_rope_params.
    original = int(raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or raw.get("max_position_embeddings", 4096))
    if factor is None:
        factor = int(raw.get("max_position_embeddings", 4096)) / original
    factor = float(factor)
    attention = params.get("attention_factor")
    if attention is None:
        mscale = params.get("mscale")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)
    rope = LatentRope(layout, kind, theta, factor, original, float(params.get("beta_fast") or 32),
                      float(params.get("beta_slow") or 1), bool(params.get("truncate", True)), float(attention))
    return rope, scale


# transformers' DeepseekV2Config defaults, for keys a config.json leaves out.
V2_DEFAULTS = dict(first_k_dense_replace=0, n_group=None, topk_group=None, routed_scaling_factor=1.0,
                   topk_method="greedy", norm_topk_prob=False, n_shared_experts=2, q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   moe_intermediate_size=1407, n_routed_experts=64, rope_interleave=None)


def parse_deepseek(raw: dict, defaults: dict, rope_layout: str, topk_methods: tuple[str, ...]) -> dict:
    """ModelConfig keyword arguments of a DeepSeek-V2/V3 config.json."""
    def get(key):
        return raw[key] if key in raw else defaults[key]

    layers = int(raw["num_hidden_layers"])
    first_dense = int(get("first_k_dense_replace") or 0)
    freq = int(raw.get("moe_layer_freq") or 1)
    method = get("topk_method") or "greedy"
    if method not in topk_methods:
        raise OffloadError(f"topk_method {method!r} is not supported for {raw.get('model_type')}; "
                           f"supported: {', '.join(topk_methods)}")
    q_lora = get("q_lora_rank")
    rope_dim = int(get("qk_rope_head_dim"))
    rope, mscale = _rope(raw, rope_layout)
    nope, v_dim = int(get("qk_nope_head_dim")), int(get("v_head_dim"))
    mla = LatentAttentionShape(
        kv_lora_rank=int(get("kv_lora_rank")), q_lora_rank=None if q_lora is None else int(q_lora),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
        bias=bool(raw.get("attention_bias", False)), softmax_scale=(nope + rope_dim) ** -0.5 * mscale, rope=rope)
    width = int(get("moe_intermediate_size"))
    return dict(
        num_experts=int(get("n_routed_experts")),
        moe_intermediate_size=width,
        intermediate_size=int(raw["intermediate_size"]),
        shared_expert_intermediate_size=int(get("n_shared_experts") or 0) * width,
        norm_topk_prob=bool(get("norm_topk_prob")),
        routed_scaling_factor=float(get("routed_scaling_factor")),
        n_group=int(get("n_group") or 1),
        topk_group=int(get("topk_group") or 1),
        topk_method=method,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        # The KV cache's layout: one "head" per token holding the latent and the rotated key.
        num_kv_heads=1,
        head_dim=mla.cache_width,
        mla=mla,
        rope_theta=rope.theta,
        sparse_layers=tuple(i >= first_dense and i % freq == 0 for i in range(layers)),
        sliding_windows=(None,) * layers,
    )


def _parse(raw: dict) -> dict:
    return parse_deepseek(raw, V2_DEFAULTS, "complex", ("greedy", "group_limited_greedy"))


FAMILY = Family(
    architecture="DeepseekV2ForCausalLM",
    model_type="deepseek_v2",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    qk_norm="none",
    float_weights=True,
    shared_experts=True,
    router="deepseek_v2",
    attention="mla",
    parse=_parse,
)
