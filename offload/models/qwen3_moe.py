"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): RMSNorm on each head of q and k
before RoPE, explicit head_dim, softmax top-k router renormalised with
`norm_topk_prob`, no shared expert, optional dense layers."""

from .family import Family, sparse_layer_flags


def _parse(raw: dict) -> dict:
    layers = int(raw["num_hidden_layers"])
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    bias = bool(raw.get("attention_bias", False))
    return dict(
        num_experts=int(raw.get("num_experts") or raw["num_local_experts"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        qkv_bias=bias,
        o_bias=bias,
        sparse_layers=sparse_layer_flags(raw, layers),
        sliding_windows=(window,) * layers,
    )


FAMILY = Family(
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    qk_norm="head",
    float_weights=False,
    parse=_parse,
)
