"""OLMoE (OLMoE-1B-7B): RMSNorm over the whole q and k projections (all heads
at once), optional clamping of q/k/v (`clip_qkv`), softmax top-k router with
no renormalisation by default; `intermediate_size` is the expert width."""

from .family import Family


def _parse(raw: dict) -> dict:
    layers = int(raw["num_hidden_layers"])
    width = int(raw["intermediate_size"])
    bias = bool(raw.get("attention_bias", False))
    clip = raw.get("clip_qkv")
    return dict(
        num_experts=int(raw["num_experts"]),
        moe_intermediate_size=width,
        intermediate_size=width,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=None if clip is None else float(clip),
        sparse_layers=(True,) * layers,
        sliding_windows=(None,) * layers,
    )


FAMILY = Family(
    architecture="OlmoeForCausalLM",
    model_type="olmoe",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    qk_norm="full",
    float_weights=False,
    parse=_parse,
)
