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
from .deepseek_v2 import LatentRope
from .mla import LatentAttention, inv_freq, latent_rope_tables
from .norm import RMSNorm
from .routing import Router


def rope_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] for integer positions [B, T]: default, linear (which divides the
    frequencies) or YaRN (cfg.rope: its frequencies, and its attention factor scaling cos and sin),
    with transformers' rope init functions (mla.inv_freq, shared with latent attention)."""
    rope = cfg.rope or LatentRope("half", "linear", cfg.rope_theta, cfg.rope_scaling_factor)
    freqs = positions[..., None].float() * inv_freq(rope, cfg.head_dim, positions.device)  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    cos, sin = emb.cos(), emb.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos.to(dtype), sin.to(dtype)


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
        if cfg.family.sinks:  # GPT-OSS: one learned logit per head beside the keys (sink_attention)
            self.sinks = nn.Parameter(torch.empty(cfg.num_heads))

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
        if cfg.family.sinks:  # SDPA has no sinks: computed as transformers' eager attention does
            out = sink_attention(q, k, v, mask, self.sinks, cfg.head_dim**-0.5)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=cfg.head_dim**-0.5, enable_gqa=cfg.num_heads != cfg.num_kv_heads
            )  # [B, A, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# Queries per chunk of sink_attention are chosen so that one chunk's [B, A, T, L] logits stay under this.
SINK_CHUNK_BYTES = 256 << 20


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention whose softmax also sees one learned logit per head (GPT-OSS's sinks): the sink takes
    part of each query's probability mass and is then dropped, so the weights on the keys sum below 1.

    q [B, A, T, D]; k, v [B, Hkv, L, D]; mask bool [B, 1, T, L] (True: may attend); sinks [A] -> [B, A, T, D].
    As transformers' eager_attention_forward: logits in the activation dtype, the row max subtracted,
    softmax, the sink's column dropped. Queries go in chunks so that a long prompt never holds all
    [B, A, T, L] logits at once (each query's row is computed alone either way)."""
    b, a, t, _ = q.shape
    groups = a // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k  # [B, A, L, D]: transformers' repeat_kv
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    length = k.shape[2]
    chunk = max(1, SINK_CHUNK_BYTES // max(1, b * a * length * q.element_size()))
    outs = []
    for start in range(0, t, chunk):
        logits = torch.matmul(q[:, :, start:start + chunk], k.transpose(2, 3)) * scale  # [B, A, t, L]
        logits = logits.masked_fill(~mask[:, :, start:start + chunk], float("-inf"))
        sink = sinks.reshape(1, -1, 1, 1).expand(b, -1, logits.shape[2], 1).to(logits.dtype)  # [B, A, t, 1]
        combined = torch.cat([logits, sink], dim=-1)  # [B, A, t, L + 1]
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]  # the sink dropped
        outs.append(torch.matmul(probs.to(v.dtype), v))  # [B, A, t, D]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class UpcastRMSNorm(RMSNorm):
    """GPT-OSS's RMSNorm: the weight scales in float32 before the cast back (transformers keeps
    these norms in float32; a bf16 weight is exact in float32, so it may stay stored as loaded)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


def hidden_norm(cfg: ModelConfig) -> RMSNorm:
    """The RMSNorm over the hidden state (before attention, before the MLP, at the end)."""
    return (UpcastRMSNorm if cfg.family.norm_upcast else RMSNorm)(cfg.hidden_size, cfg.rms_norm_eps)


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
        # The family's routing rule (offload/models/routing.py), under the checkpoint's name ("gate", "router").
        self.add_module(cfg.family.router_name, Router(cfg))
        if cfg.family.shared_expert:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        # DeepSeek: resident shared experts, added to every token without a gate.
        self.shared = cfg.family.shared_experts and cfg.shared_expert_intermediate_size > 0
        if self.shared:
            self.shared_experts = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act,
                                           cfg.mlp_bias)
        self.executor: ExpertExecutor | None = None  # set by the runtime after loading

    @property
    def gate(self) -> Router:
        """The router, whatever the checkpoint calls it (predictors/gate.py applies it ahead)."""
        router = self._modules.get(self.cfg.family.router_name)
        if router is None:  # before __init__ registered it (nn.Module.add_module asks hasattr)
            raise AttributeError("gate")
        return router

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
        self.input_layernorm = hidden_norm(cfg)
        self.post_attention_layernorm = hidden_norm(cfg)
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
        self.norm = hidden_norm(cfg)


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
    if cache.pos is not None:  # static mode: one query at pos, every slot a key ([B, 1, 1, S])
        q = cache.pos[:, None]  # [1, 1]
        k = torch.arange(cache.max_len, device=cache.valid.device)[None, :]  # [1, S]
        end = cache.max_len
    else:
        start, end = cache.length, cache.length + t
        q = torch.arange(start, end, device=cache.valid.device)[:, None]  # [T, 1]
        k = torch.arange(end, device=cache.valid.device)[None, :]  # [1, L]
    allowed = k <= q
    if window:
        allowed = allowed & (q - k < window)
    allowed = allowed[None] & cache.valid[:, None, :end]  # [B, T, L]
    allowed = allowed | (k == q)[None]
    return allowed[:, None]
