"""Random checkpoints of a real model's shape, for benchmarks and the GPU check: any layer count
of a Mixtral- or Qwen3-MoE-shaped model (offload/shapes/*.json), drawn on the CPU or, much
faster, on a GPU, written one safetensors shard per layer (memory stays at one layer) into a
temporary directory renamed at the end. No tokenizer: benchmarks feed token ids.

The routers are drawn wider than the other weights (router_scale) so routing is peaked and
input-dependent, as in trained models, instead of near uniform.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .writer import staged_directory

# Per family: the MoE block's name, the router's, and each expert's gate / up / down names.
LAYOUTS = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}


def make_synthetic(path, config: dict, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                   router_scale: float = 0.5, progress=None) -> Path:
    """Write a random checkpoint with `config` (a config.json dict: a shape file with any overrides)
    to `path`, unless one is there already. `progress(layer)` is called after each layer."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    family = config["model_type"]
    if family not in LAYOUTS:
        raise ValueError(f"synthetic checkpoints are made for {', '.join(LAYOUTS)}, not {family}")
    moe, router, (gate, up, down) = LAYOUTS[family]
    hidden, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_local_experts") or config["num_experts"]
    width = config["intermediate_size" if family == "mixtral" else "moe_intermediate_size"]
    gen = torch.Generator(device).manual_seed(seed)

    def rand(*shape, std=0.02):  # drawn where asked (a GPU draws gigabytes in seconds), kept on the CPU
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype).cpu()

    def ones(n):
        return torch.ones(n, dtype=dtype)

    from safetensors.torch import save_file

    with staged_directory(path) as tmp:
        weight_map = {}

        def shard(name: str, tensors: dict) -> None:
            save_file(tensors, tmp / name)
            weight_map.update(dict.fromkeys(tensors, name))

        shard("model-embed.safetensors", {"model.embed_tokens.weight": rand(vocab, hidden),
                                          "model.norm.weight": ones(hidden), "lm_head.weight": rand(vocab, hidden)})
        for i in range(layers):
            p = f"model.layers.{i}."
            tensors = {
                p + "input_layernorm.weight": ones(hidden),
                p + "post_attention_layernorm.weight": ones(hidden),
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                f"{p}{moe}.{router}.weight": rand(experts, hidden, std=router_scale),
            }
            if family == "qwen3_moe":  # per-head RMSNorm of queries and keys
                tensors[p + "self_attn.q_norm.weight"] = ones(head_dim)
                tensors[p + "self_attn.k_norm.weight"] = ones(head_dim)
            for e in range(experts):
                q = f"{p}{moe}.experts.{e}."
                tensors[f"{q}{gate}.weight"] = rand(width, hidden)
                tensors[f"{q}{up}.weight"] = rand(width, hidden)
                tensors[f"{q}{down}.weight"] = rand(hidden, width)
            shard(f"model-layer{i:03d}.safetensors", tensors)
            del tensors
            if progress is not None:
                progress(i)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.update(dtype=str(dtype).replace("torch.", ""), torch_dtype=str(dtype).replace("torch.", ""),
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return path


def shape_config(name: str, **overrides) -> dict:
    """A shipped shape (offload/shapes/NAME.json) as a config dict, with overrides (num_hidden_layers=4)."""
    from .simulate import SHAPES_DIR

    config = json.loads((SHAPES_DIR / f"{name}.json").read_text())
    config.update(overrides)
    return config
