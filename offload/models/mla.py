"""Multi-head latent attention (DeepSeek-V2/V3), with a KV cache of latents.

Per token, kv_a_proj_with_mqa gives a latent c (kv_lora_rank R, then
kv_a_layernorm) and one rotated key k_rot (qk_rope_head_dim Dr) shared by all
heads; kv_b_proj expands c into each head's key part k_nope (Dn) and value (Dv).
The queries come from q_proj, or from q_a_proj -> q_a_layernorm -> q_b_proj
(q_lora_rank), split into q_nope (Dn) and q_rot (Dr).

The cache holds only [c, k_rot] per token (R + Dr values, against 2 x A x Dv-ish
for plain attention): offload/kv_cache.py `append_latent`. Attention is then
computed one of two ways, equal up to float rounding:
  expanded   rebuild k, v for every cached token (kv_b_proj over the cache), then
             ordinary attention: cheaper for a long prompt processed at once;
  absorbed   fold kv_b_proj into the query and the output (q_nope @ W_UK gives a
             query in latent space; attention runs over [c, k_rot] directly, one
             shared key/value head; the result @ W_UV^T gives each head's value):
             far cheaper for decode steps, which never expand the cache.
Which one runs depends only on the shapes, so a model gives the same result
wherever its experts live.

RoPE (transformers' rope init functions): default, linear or YaRN over Dr, cos
and sin scaled by YaRN's attention factor; the softmax scale is qk_head_dim^-0.5
times mscale(factor, mscale_all_dim)^2 (config: LatentAttentionShape).
Shapes: B batch, T new tokens, L cached + new, A heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kv_cache import KVCache
from .deepseek_v2 import LatentRope
from .norm import RMSNorm

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def inv_freq(rope: LatentRope, dim: int, device=None) -> torch.Tensor:
    """[dim / 2] inverse frequencies, as transformers' default, linear and YaRN rope init compute them."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)
    if rope.kind == "default":
        return 1.0 / pos_freqs
    if rope.kind == "linear":
        return 1.0 / pos_freqs / rope.factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    return 1.0 / (rope.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def latent_rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, Dr / 2] (one angle per rotated pair) for integer positions [B, T]."""
    m = cfg.mla
    freqs = positions[..., None].float() * inv_freq(m.rope, m.qk_rope_head_dim, positions.device)
    cos, sin = freqs.cos() * m.rope.attention_factor, freqs.sin() * m.rope.attention_factor
    if m.rope.layout == "complex":
        return cos, sin  # V2 rotates in float32
    return cos.to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """x [..., Dr] with cos, sin broadcastable to [..., Dr / 2] -> x rotated, in x's dtype.

    "complex" and "interleave" rotate the pairs (x0, x1), (x2, x3), ...; "complex" computes
    in float32 and keeps the pairs interleaved, "interleave" returns [rotated evens, rotated
    odds] (DeepSeek-V3 in transformers). "half" rotates (x_i, x_{i + Dr/2}). Queries and keys
    share the layout, so their dot products are the same."""
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
    else:
        src = x.float() if layout == "complex" else x
        x1, x2 = src[..., 0::2], src[..., 1::2]
    a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if layout == "complex":
        return torch.stack([a, b], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([a, b], dim=-1)


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, m = cfg, cfg.mla
        # None: the cheaper of absorbed / expanded for each call's shapes; tests force one or the other.
        self.absorb: bool | None = None
        h, a = cfg.hidden_size, cfg.num_heads
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(h, a * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=m.bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, a * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias=m.bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, a * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(a * m.v_head_dim, h, bias=m.bias)

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int) -> torch.Tensor:
        m, a = self.cfg.mla, self.cfg.num_heads
        b, t, _ = x.shape
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, a, m.qk_head_dim).transpose(1, 2)  # [B, A, T, Dn + Dr]
        q_nope, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, R]
        q_rot = rotate(q_rot, cos[:, None], sin[:, None], m.rope.layout)  # [B, A, T, Dr]
        k_rot = rotate(k_rot, cos, sin, m.rope.layout)  # [B, T, Dr]
        rows = cache.append_latent(layer, torch.cat([latent, k_rot], dim=-1))  # [B, L, R + Dr]
        absorb = self.absorb if self.absorb is not None else self._absorb_is_cheaper(t, rows.shape[1])
        if absorb:
            out = self._absorbed(q_nope, q_rot, rows, mask)
        else:
            out = self._expanded(q_nope, q_rot, rows, mask)  # [B, A, T, Dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _absorb_is_cheaper(self, t: int, length: int) -> bool:
        """Multiply-adds per head: expanding runs kv_b_proj over all L cached rows; absorbing
        attends over the wider latent rows (R + Dr keys, R values) but only for T queries."""
        m = self.cfg.mla
        r, dn, dr, dv = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        expanded = length * r * (dn + dv) + t * length * (dn + dr + dv)
        absorbed = t * r * (dn + dv) + t * length * (2 * r + dr)
        return absorbed < expanded

    def _expanded(self, q_nope, q_rot, rows, mask) -> torch.Tensor:
        m, a = self.cfg.mla, self.cfg.num_heads
        b, length, _ = rows.shape
        latent, k_rot = rows.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # [B, L, R], [B, L, Dr]
        kv = self.kv_b_proj(latent).view(b, length, a, -1).transpose(1, 2)  # [B, A, L, Dn + Dv]
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot[:, None].expand(-1, a, -1, -1)], dim=-1)  # [B, A, L, Dn + Dr]
        q = torch.cat([q_nope, q_rot], dim=-1)  # [B, A, T, Dn + Dr]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=m.softmax_scale)  # [B, A, T, Dv]

    def _absorbed(self, q_nope, q_rot, rows, mask) -> torch.Tensor:
        m, a = self.cfg.mla, self.cfg.num_heads
        w = self.kv_b_proj.weight.view(a, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk, w_uv = w.split([m.qk_nope_head_dim, m.v_head_dim], dim=1)  # [A, Dn, R], [A, Dv, R]
        q_latent = q_nope @ w_uk  # [B, A, T, R]: q_nope . (W_UK c) = (q_nope W_UK) . c
        q = torch.cat([q_latent, q_rot], dim=-1)  # [B, A, T, R + Dr]
        k = rows[:, None]  # [B, 1, L, R + Dr]: one key head shared by all query heads
        v = k[..., :m.kv_lora_rank]  # [B, 1, L, R]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=m.softmax_scale,
                                             enable_gqa=a > 1)  # [B, A, T, R]
        return out @ w_uv.transpose(1, 2)  # [B, A, T, Dv]
