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
    # "deepseek_v2" (fp32 softmax, greedy or group-limited top-k, routed_scaling_factor),
    # "deepseek_v3" (fp32 sigmoid, e_score_correction_bias and top-2-per-group limits for the choice only) or
    # "gpt_oss" (biased logits, top-k of the logits, softmax over the k chosen).
    router: Literal["softmax", "deepseek_v2", "deepseek_v3", "gpt_oss"] = "softmax"
    # The router's attribute in the MoE block, as the checkpoint names it ("router" in GPT-OSS).
    router_name: str = "gate"
    # "gqa": q/k/v projections and RoPE over head_dim; "mla": DeepSeek's multi-head latent attention
    # (offload/models/mla.py), whose KV cache holds one compressed latent per token.
    attention: Literal["gqa", "mla"] = "gqa"
    # Reads the family's own config.json keys into ModelConfig keyword arguments.
    parse: Callable[[dict], dict] | None = None
    # Alternative prefixes under which a checkpoint may store the MoE block
    # (transformers' fused format names Mixtral's block "mlp").
    moe_aliases: tuple[str, ...] = ()
    # GPT-OSS: a learned logit per head (`self_attn.sinks`) joins each query's softmax and is dropped.
    sinks: bool = False
    # GPT-OSS: RMSNorm scales in float32 and casts after (transformers keeps those norms in float32).
    norm_upcast: bool = False
    # The experts' gating, glu(gate, up) replacing act(gate) * up, built from the config (GPT-OSS's
    # clamped SwiGLU); None: act(gate) * up.
    glu: Callable | None = None
    # How routed experts are stored: "split" (gate, up, down per expert, or transformers' fused gate_up
    # [E, 2I, H] and down [E, H, I]) or "gpt_oss" (gate_up [E, H, 2I] with gate/up in alternating
    # columns, down [E, I, H], both with biases; or MXFP4 blocks and scales: offload/formats.py).
    expert_layout: Literal["split", "gpt_oss"] = "split"
    # RoPE theta when config.json names none (transformers' default_theta of the family's config).
    default_rope_theta: float = 10000.0


def sparse_layer_flags(raw: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen-style `mlp_only_layers` and `decoder_sparse_step`: which layers have a MoE block."""
    dense = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
