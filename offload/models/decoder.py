"""The shared MoE decoder, as nn.Modules whose parameter names follow the
checkpoint (`model.layers.{i}.self_attn.q_proj.weight`, ...), so loading is a
name-for-name copy. Routed experts are not parameters here: the MoE block
routes and hands the work to an `ExpertExecutor` (see offload/experts.py).
Shapes: B batch, T new tokens, L cached + new tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..experts import ACT, ExpertExecutor
from ..kv_cache import KVCache
from .mla import LatentAttention, latent_rope_tables
from .norm import RMSNorm
from .routing import Router


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] for integer positions [B, T] (linear scaling divides positions)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
    inv_freq = inv_freq / cfg.rope_scaling_factor
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        mode = cfg.family.qk_norm
        if mode == "head":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        elif mode == "full":
            self.q_norm = RMSNorm(cfg.num_heads * d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.num_kv_heads * d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int) -> torch.Tensor:
        cfg, mode = self.cfg, self.cfg.family.qk_norm
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, heads * D]
        if mode == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, -1, cfg.head_dim)  # [B, T, A, D]
        k = k.view(b, t, -1, cfg.head_dim)  # [B, T, Hkv, D]
        if mode == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, D]
        v = v.view(b, t, -1, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.append(layer, k, v)  # [B, Hkv, L, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=cfg.head_dim**-0.5, enable_gqa=cfg.num_heads != cfg.num_kv_heads
        )  # [B, A, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DenseMLP(nn.Module):
    """gate/up/down MLP: dense layers, Qwen2-MoE's shared expert, DeepSeek's shared experts."""

    def __init__(self, hidden: int, width: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)
        self.act = ACT[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = Router(cfg)  # the family's routing rule (offload/models/routing.py)
        if cfg.family.shared_expert:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        # DeepSeek: resident shared experts, added to every token without a gate.
        self.shared = cfg.family.shared_experts and cfg.shared_expert_intermediate_size > 0
        if self.shared:
            self.shared_experts = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act,
                                           cfg.mlp_bias)
        self.executor: ExpertExecutor | None = None  # set by the runtime after loading

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, H] -> (weights [N, K], ids [N, K], probs [N, E] float32)."""
        return self.gate(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, hdim = x.shape
        h = x.reshape(-1, hdim)  # [N, H]
        weights, ids, probs = self.route(h)
        out = self.executor(self.layer, h, ids, weights, probs)  # [N, H]
        if self.cfg.family.shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        if self.shared:
            out = out + self.shared_experts(h)
        return out.view(b, t, hdim)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = LatentAttention(cfg) if cfg.family.attention == "mla" else Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        ffn = MoEBlock(cfg, layer) if cfg.sparse_layers[layer] else DenseMLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        # The attribute name is the checkpoint's ("block_sparse_moe" in Mixtral); dense layers are "mlp".
        self.ffn_name = cfg.family.moe_prefix if cfg.sparse_layers[layer] else "mlp"
        self.add_module(self.ffn_name, ffn)
        self.layer = layer

    def forward(self, x, cos, sin, mask, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoECausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.token_listener = None  # set with the executor: called with each step's input ids

    def moe_blocks(self) -> list[MoEBlock]:
        return [m for m in self.modules() if isinstance(m, MoEBlock)]

    def set_executor(self, executor: ExpertExecutor) -> None:
        for block in self.moe_blocks():
            block.executor = executor
        # An executor that prefetches wants each step's token ids (the affinity predictor's prior).
        self.token_listener = getattr(executor, "begin_step", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """input_ids, positions, valid [B, T] -> logits [B, T or 1, V] (float32).

        `valid` marks real tokens (False on left padding); `cache` holds what
        came before and receives these T tokens.
        """
        if self.token_listener is not None:
            self.token_listener(input_ids)
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        tables = latent_rope_tables if self.cfg.family.attention == "mla" else rope_tables
        cos, sin = tables(self.cfg, positions, x.dtype)
        cache.reserve(valid)
        masks = {w: attention_mask(cache, input_ids.shape[1], w) for w in set(self.cfg.sliding_windows)}
        for layer, block in enumerate(self.model.layers):
            x = block(x, cos, sin, masks[self.cfg.sliding_windows[layer]], cache)
        cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()


def attention_mask(cache: KVCache, t: int, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, L]: causal, real keys only, within `window` if set.

    A padding query may see no real key at all; letting every query see its
    own slot keeps softmax finite (its output is never used).
    """
    start, end = cache.length, cache.length + t
    q = torch.arange(start, end, device=cache.valid.device)[:, None]  # [T, 1]
    k = torch.arange(end, device=cache.valid.device)[None, :]  # [1, L]
    allowed = k <= q
    if window:
        allowed = allowed & (q - k < window)
    allowed = allowed[None] & cache.valid[:, None, :end]  # [B, T, L]
    allowed = allowed | (k == q)[None]
    return allowed[:, None]
