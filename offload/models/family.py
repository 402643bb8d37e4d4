"""What differs between MoE families, as data.

Every supported family is a pre-norm decoder with RoPE attention and a MoE
block; they differ in a handful of switches (q/k norm, qkv bias, how the
router turns logits into weights, a shared expert, dense layers) and in the
checkpoint's names. One `Family` per file under `offload/models/` says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

# Names of one expert's three matrices in the checkpoint, in the order
# (gate, up, down): gate and up are [I, H], down is [H, I].
ExpertNames = tuple[str, str, str]


@dataclass(frozen=True)
class Family:
    architecture: str  # config.json "architectures"[0], e.g. "MixtralForCausalLM"
    model_type: str  # config.json "model_type"
    moe_prefix: str  # attribute of the MoE block in a layer ("mlp" / "block_sparse_moe")
    expert_names: ExpertNames  # per-expert weight names under `experts.{e}.`
    qk_norm: Literal["none", "head", "full"]  # "head": RMSNorm over head_dim; "full": over all heads
    # Router: softmax over experts in float32, top-k, then optionally renormalise
    # the k weights; `float_weights` keeps them float32 (Mixtral) instead of
    # casting back to the activation dtype (Qwen, OLMoE). Both as transformers does.
    float_weights: bool
    shared_expert: bool = False  # Qwen2-MoE: sigmoid-gated shared expert
    # DeepSeek: `shared_experts`, one MLP of n_shared_experts x the expert width, added to every
    # token with no gate (a resident weight, never a routed expert).
    shared_experts: bool = False
    # How the router turns logits into (weights, experts), offload/models/routing.py: "softmax" (above),
    # "deepseek_v2" (fp32 softmax, greedy or group-limited top-k, routed_scaling_factor) or
    # "deepseek_v3" (fp32 sigmoid, e_score_correction_bias and top-2-per-group limits for the choice only).
    router: Literal["softmax", "deepseek_v2", "deepseek_v3"] = "softmax"
    # "gqa": q/k/v projections and RoPE over head_dim; "mla": DeepSeek's multi-head latent attention
    # (offload/models/mla.py), whose KV cache holds one compressed latent per token.
    attention: Literal["gqa", "mla"] = "gqa"
    # Reads the family's own config.json keys into ModelConfig keyword arguments.
    parse: Callable[[dict], dict] | None = None
    # Alternative prefixes under which a checkpoint may store the MoE block
    # (transformers' fused format names Mixtral's block "mlp").
    moe_aliases: tuple[str, ...] = ()


def sparse_layer_flags(raw: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen-style `mlp_only_layers` and `decoder_sparse_step`: which layers have a MoE block."""
    dense = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
