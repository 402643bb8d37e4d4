"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v bias, softmax top-k
router (renormalised only with `norm_topk_prob`), a shared expert scaled by
sigmoid(shared_expert_gate(x)) added to every token, and optional dense layers."""

from .family import Family, sparse_layer_flags


def _sliding_windows(raw: dict, layers: int) -> tuple:
    if not raw.get("use_sliding_window"):
        return (None,) * layers
    window = raw.get("sliding_window")
    kinds = raw.get("layer_types")
    if kinds is None:  # transformers' rule when the config predates layer_types
        limit = raw.get("max_window_layers", layers)
        kinds = ["sliding_attention" if (i + 1) % 2 and i < limit else "full_attention" for i in range(layers)]
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


def _parse(raw: dict) -> dict:
    layers = int(raw["num_hidden_layers"])
    return dict(
        num_experts=int(raw["num_experts"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        shared_expert_intermediate_size=int(raw["shared_expert_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        qkv_bias=bool(raw.get("qkv_bias", True)),
        sparse_layers=sparse_layer_flags(raw, layers),
        sliding_windows=_sliding_windows(raw, layers),
    )


FAMILY = Family(
    architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    qk_norm="none",
    float_weights=False,
    shared_expert=True,
    parse=_parse,
)
