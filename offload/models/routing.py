"""The router of a MoE block: logits -> (weights, experts), one rule per family.

The same module answers the gate predictor (predictors/gate.py), which applies
a later layer's router to this layer's hidden state: `choice_scores` ranks the
experts exactly as the router chooses them (its per-token top-k are the router's
experts), so prefetches follow each family's own rule, biases and groups included.

Rules (Family.router), each as transformers computes it:
  softmax      float32 softmax of logits in the activation dtype, top-k, optionally
               renormalised (norm_topk_prob); weights float32 or cast back (family.float_weights)
  deepseek_v2  float32 logits and softmax; top-k greedily, or only within the `topk_group` groups
               (of `n_group`) with the highest best score; weights x routed_scaling_factor
  deepseek_v3  float32 logits, sigmoid scores; the choice uses scores + e_score_correction_bias,
               within the `topk_group` groups whose two best biased scores sum highest; the
               weights are the unbiased scores, renormalised with norm_topk_prob, x routed_scaling_factor
  gpt_oss      logits = linear(h, weight, bias) in the activation dtype; the top-k logits chosen;
               weights = their softmax (in the activation dtype), the other experts not counted.
               `probs` (for the score policy and traces) is the float32 softmax over all E logits:
               the router's own weights are not a distribution over every expert, this is the one
               that ranks experts as the router does and sums to 1 like the other rules' probs
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class Router(nn.Module):
    """weight [E, H] (checkpoint `...gate.weight`), plus DeepSeek-V3's `e_score_correction_bias` [E]
    or GPT-OSS's `bias` [E] (checkpoint `...router.weight`, `...router.bias`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.rule = cfg, cfg.family.router
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if self.rule == "deepseek_v3":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts))
        if self.rule == "gpt_oss":
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, H] -> [N, E]: in the activation dtype, or float32 for DeepSeek (whose gate is float32)."""
        if self.rule == "softmax":
            return F.linear(h, self.weight)
        if self.rule == "gpt_oss":
            return F.linear(h, self.weight, self.bias)
        return F.linear(h.float(), self.weight.float())

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, H] -> (weights [N, K], ids [N, K], probs [N, E] float32).

        `probs` feeds the score cache policy and traces: the softmax for softmax routers (and over
        all logits for GPT-OSS), the sigmoid scores normalised to sum 1 for DeepSeek-V3."""
        cfg, logits = self.cfg, self.logits(h)
        if self.rule == "gpt_oss":
            top, ids = torch.topk(logits, cfg.top_k, dim=-1)  # [N, K]
            weights = torch.softmax(top, dim=1, dtype=top.dtype)
            return weights, ids, torch.softmax(logits.float(), dim=-1)
        if self.rule == "softmax":
            probs = torch.softmax(logits.float(), dim=-1)
            weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
            if cfg.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if not cfg.family.float_weights:
                weights = weights.to(logits.dtype)
            return weights, ids, probs
        if self.rule == "deepseek_v2":
            probs = logits.softmax(dim=-1, dtype=torch.float32)
            # transformers' V2 router leaves the k weights unnormalised, whatever norm_topk_prob says.
            weights, ids = torch.topk(self._v2_choice(probs), cfg.top_k, dim=-1, sorted=False)
            return weights * cfg.routed_scaling_factor, ids, probs
        scores = logits.sigmoid()  # [N, E]
        choice = self._v3_choice(scores, masked=float("-inf"))
        ids = torch.topk(choice, cfg.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)  # [N, K]
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids, scores / scores.sum(dim=-1, keepdim=True)

    def choice_scores(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, H] -> float32 [N, E]: higher is likelier; each row's top-k are the experts `forward` picks."""
        logits = self.logits(h)
        if self.rule in ("softmax", "gpt_oss"):  # monotone in the logits: the same top-k
            return torch.softmax(logits.float(), dim=-1)
        if self.rule == "deepseek_v2":
            return self._v2_choice(logits.softmax(dim=-1, dtype=torch.float32))
        choice = self._v3_choice(logits.sigmoid(), masked=float("-inf"))
        # Excluded groups rank below every allowed expert of the row, finitely (scores are summed over tokens).
        allowed = torch.isfinite(choice)
        floor = torch.where(allowed, choice, torch.inf).amin(dim=-1, keepdim=True) - 1
        return torch.where(allowed, choice, floor)

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, G] group scores -> bool [N, E]: the experts of each token's `topk_group` best groups."""
        cfg = self.cfg
        top = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]  # [N, topk_group]
        keep = torch.zeros_like(group_scores).scatter_(1, top, 1).bool()  # [N, G]
        return keep[:, :, None].expand(-1, -1, cfg.num_experts // cfg.n_group).reshape(-1, cfg.num_experts)

    def _v2_choice(self, probs: torch.Tensor) -> torch.Tensor:
        """Softmax probs [N, E], zero outside the chosen groups when the choice is group-limited."""
        cfg = self.cfg
        if cfg.topk_method != "group_limited_greedy":
            return probs
        best = probs.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group).max(dim=-1).values  # [N, G]
        return probs.masked_fill(~self._group_mask(best), 0.0)

    def _v3_choice(self, scores: torch.Tensor, masked: float) -> torch.Tensor:
        """Biased sigmoid scores [N, E], `masked` outside the chosen groups."""
        cfg = self.cfg
        biased = scores + self.e_score_correction_bias.float()
        groups = biased.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        best = groups.topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]: each group's two best
        return biased.masked_fill(~self._group_mask(best), masked)
