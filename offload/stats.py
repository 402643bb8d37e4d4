"""Run statistics: what a generation cost, readable as attributes, a dict, or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0  # prefill plus the first sampled token
    decode_tokens: int = 0  # tokens after the first step, the ones decode_seconds paid for

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first step over the time they took."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens, {self.tokens_per_second:.1f} tok/s, "
                f"first token {self.time_to_first_token * 1000:.0f} ms, prompt {self.prompt_tokens} tokens")


@dataclass
class RuntimeStats:
    """Totals over the runtime's life plus the last generation's figures."""

    requests: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    last: GenerationStats | None = None

    def record(self, run: GenerationStats) -> None:
        self.requests += 1
        self.prompt_tokens += run.prompt_tokens
        self.new_tokens += run.new_tokens
        self.last = run

    @property
    def tokens_per_second(self) -> float:
        return self.last.tokens_per_second if self.last else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.last.time_to_first_token if self.last else 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_per_second": self.tokens_per_second,
            "time_to_first_token": self.time_to_first_token,
            "last": self.last.as_dict() if self.last else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)
