"""GPT-OSS (gpt-oss-20b, gpt-oss-120b), as transformers' GptOssForCausalLM computes it:

  attention  GQA with q/k/v/o biases (attention_bias), head_dim given, RoPE on the two halves
             of each head (default or YaRN, whose attention factor scales cos and sin), and a
             learned logit per head, `self_attn.sinks`, joining each query's softmax and then
             dropped (decoder.sink_attention); `layer_types` alternates sliding (sliding_window)
             and full attention
  router     `mlp.router.weight` [E, H] and `.bias` [E]: logits = linear(h) in the activation
             dtype, the top-k logits chosen, their softmax the weights (no other expert counts)
  experts    every layer sparse, `intermediate_size` the expert width; gate_up [H, 2I] with gate
             and up in alternating columns, down [I, H], both with biases; the gating is a clamped
             SwiGLU: gate <= limit, -limit <= up <= limit, (up + 1) * gate * sigmoid(alpha * gate)
  norms      RMSNorm scaling in float32 before the cast (transformers keeps them float32)

Released checkpoints store the experts as MXFP4 (`*_blocks`, `*_scales`, with
`quantization_config.quant_method = "mxfp4"`); they are read as shipped (offload/formats.py).
"""

from __future__ import annotations

import torch

from ..errors import OffloadError
from .family import Family

SWIGLU_ALPHA = 1.702  # transformers' GptOssConfig default
LAYER_TYPES = ("sliding_attention", "full_attention")


def _layer_types(raw: dict, layers: int) -> list[str]:
    kinds = raw.get("layer_types")
    if kinds is None:  # transformers' default: sliding first, then alternating
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or any(k not in LAYER_TYPES for k in kinds):
        raise OffloadError(f"config.json's layer_types must list {layers} of {', '.join(LAYER_TYPES)}; "
                           f"got {kinds!r}")
    return kinds


def _parse(raw: dict) -> dict:
    layers = int(raw["num_hidden_layers"])
    width = int(raw.get("intermediate_size", 2880))
    bias = bool(raw.get("attention_bias", True))
    window = raw.get("sliding_window", 128)
    return dict(
        num_experts=int(raw["num_local_experts"]),
        moe_intermediate_size=width,
        intermediate_size=width,
        norm_topk_prob=False,  # the router's softmax over the k chosen logits already sums to 1
        qkv_bias=bias,
        o_bias=bias,
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(raw.get("swiglu_alpha", SWIGLU_ALPHA)),
        sparse_layers=(True,) * layers,
        sliding_windows=tuple(window if kind == "sliding_attention" else None
                              for kind in _layer_types(raw, layers)),
    )


def clamped_swiglu(cfg):
    """The experts' glu(gate, up) for this config, as transformers' GptOssExperts._apply_gate."""
    limit, alpha = cfg.swiglu_limit, cfg.swiglu_alpha

    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [n, I] each
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


FAMILY = Family(
    architecture="GptOssForCausalLM",
    model_type="gpt_oss",
    moe_prefix="mlp",
    expert_names=("gate_up_proj", "gate_up_proj", "down_proj"),  # fused: see checkpoint.expert_extents
    qk_norm="none",
    float_weights=False,
    router="gpt_oss",
    router_name="router",
    parse=_parse,
    sinks=True,
    norm_upcast=True,
    glu=clamped_swiglu,
    expert_layout="gpt_oss",
    default_rope_theta=150000.0,
)
