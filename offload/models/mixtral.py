"""Mixtral (MixtralForCausalLM): GQA, RoPE, top-k softmax router with the k
weights renormalised and kept in float32, experts w1 (gate), w3 (up), w2 (down)."""

from .family import Family


def _parse(raw: dict) -> dict:
    layers = int(raw["num_hidden_layers"])
    width = int(raw["intermediate_size"])
    return dict(
        num_experts=int(raw["num_local_experts"]),
        moe_intermediate_size=width,
        intermediate_size=width,
        norm_topk_prob=True,
        sparse_layers=(True,) * layers,
        sliding_windows=(raw.get("sliding_window"),) * layers,
    )


FAMILY = Family(
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    moe_prefix="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
    qk_norm="none",
    float_weights=True,
    parse=_parse,
    moe_aliases=("mlp",),
)
