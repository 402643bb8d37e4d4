"""Choosing the next token: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import OffloadError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise OffloadError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise OffloadError(f"temperature={self.temperature} must be a finite number >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise OffloadError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise OffloadError(f"top_p={self.top_p} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise OffloadError(f"seed={self.seed!r} must be a whole number in 0 .. 2**63 - 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise OffloadError("stop must be a string or a list of non-empty strings")

    @classmethod
    def build(cls, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None):
        stops = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        try:
            return cls(int(max_new_tokens), float(temperature), int(top_k), float(top_p), seed, stops)
        except (TypeError, ValueError, OverflowError) as exc:
            raise OffloadError(f"a sampling option is not a number ({exc}): max_new_tokens, top_k are whole "
                               "numbers; temperature, top_p are numbers") from None


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B]."""
        p = self.params
        if p.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the mass before it already reaches top_p (the first token always stays).
            drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
