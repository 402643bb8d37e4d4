"""DeepSeek-V3 (V3, V3.1, R1): DeepSeek-V2's decoder (multi-head latent attention,
dense first layers, ungated shared experts) with another router: float32 sigmoid
scores; the choice adds `e_score_correction_bias` and keeps the `topk_group` best of
`n_group` groups (ranked by the sum of each group's two best biased scores); the
weights are the unbiased scores of the chosen experts, renormalised with
`norm_topk_prob`, times `routed_scaling_factor`. RoPE pairs are interleaved
(`rope_interleave`, default true) and rotated in the activation dtype.
The multi-token-prediction layer of the released checkpoints (layer 61) is not
part of the model and is never read.
"""

from .deepseek_v2 import parse_deepseek
from .family import Family

# transformers' DeepseekV3Config defaults, for keys a config.json leaves out.
V3_DEFAULTS = dict(first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                   topk_method="noaux_tc", norm_topk_prob=True, n_shared_experts=1, q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   moe_intermediate_size=2048, n_routed_experts=256)


def _parse(raw: dict) -> dict:
    layout = "interleave" if raw.get("rope_interleave", True) else "half"
    # transformers' V3 router always does the bias-corrected group-limited choice, whatever topk_method says.
    return parse_deepseek({**raw, "topk_method": "noaux_tc"}, V3_DEFAULTS, layout, ("noaux_tc",))


FAMILY = Family(
    architecture="DeepseekV3ForCausalLM",
    model_type="deepseek_v3",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    qk_norm="none",
    float_weights=True,
    shared_experts=True,
    router="deepseek_v3",
    attention="mla",
    parse=_parse,
)
