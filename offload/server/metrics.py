"""Server counters and the runtime's statistics in Prometheus' text exposition format (version 0.0.4).

Written by hand rather than with prometheus_client: a dozen lines of text need
no dependency and no process-wide registry."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class LastGeneration:
    tokens_per_second: float = 0.0
    time_to_first_token: float = 0.0


class Metrics:
    """Counted from two threads (the event loop and the generation worker), hence the lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, HTTP status) -> count
        self.generations: Counter[str] = Counter()  # finish reason, "cancelled" or "error" -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.generation_seconds = 0.0  # time the worker spent generating
        self.queue_depth = 0  # requests waiting for the worker
        self.running = 0  # 0 or 1: the worker is generating
        self.last = LastGeneration()

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def queued(self, delta: int) -> None:
        with self._lock:
            self.queue_depth += delta

    def started(self) -> None:
        with self._lock:
            self.running = 1

    def finished(self, outcome: str, seconds: float, prompt_tokens: int = 0, completion_tokens: int = 0,
                 last: LastGeneration | None = None) -> None:
        with self._lock:
            self.running = 0
            self.generations[outcome] += 1
            self.generation_seconds += seconds
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if last is not None:
                self.last = last

    def render(self, runtime_stats) -> str:
        """The exposition text; `runtime_stats` is the Runtime's `stats` (expert traffic since load)."""
        with self._lock:
            requests, generations = dict(self.requests), dict(self.generations)
            scalars = (self.prompt_tokens, self.completion_tokens, self.generation_seconds, self.queue_depth,
                       self.running, self.last)
        prompt, completion, seconds, depth, running, last = scalars
        experts = runtime_stats.experts.total()
        out: list[str] = []
        _family(out, "offload_requests_total", "counter", "HTTP requests answered, by route and status code.",
                [({"route": r, "code": str(c)}, n) for (r, c), n in sorted(requests.items())])
        _family(out, "offload_generations_total", "counter",
                "Generations run by the worker, by outcome (stop, length, cancelled, error).",
                [({"outcome": k}, n) for k, n in sorted(generations.items())])
        _family(out, "offload_queue_depth", "gauge", "Requests waiting for the generation worker.", [({}, depth)])
        _family(out, "offload_requests_running", "gauge", "Requests being generated now (0 or 1).", [({}, running)])
        _family(out, "offload_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                [({}, prompt)])
        _family(out, "offload_completion_tokens_total", "counter", "Tokens generated.", [({}, completion)])
        _family(out, "offload_generation_seconds_total", "counter", "Time the worker spent generating.",
                [({}, seconds)])
        _family(out, "offload_tokens_per_second", "gauge", "Decode speed of the last finished generation.",
                [({}, last.tokens_per_second)])
        _family(out, "offload_time_to_first_token_seconds", "gauge",
                "Prefill plus first token of the last finished generation.", [({}, last.time_to_first_token)])
        _family(out, "offload_expert_hits_total", "counter", "Expert requests found on the compute device.",
                [({}, experts.hits)])
        _family(out, "offload_expert_misses_total", "counter", "Expert requests that had to be fetched.",
                [({}, experts.misses)])
        _family(out, "offload_expert_hit_rate", "gauge", "hits / (hits + misses) since the model was loaded.",
                [({}, experts.hit_rate)])
        _family(out, "offload_bytes_from_disk_total", "counter", "Expert bytes read from disk.",
                [({}, experts.bytes_from_disk)])
        _family(out, "offload_bytes_to_device_total", "counter", "Expert bytes copied host -> GPU.",
                [({}, experts.bytes_to_device)])
        _family(out, "offload_stall_seconds_total", "counter", "Time compute waited for experts to arrive.",
                [({}, experts.stall_seconds)])
        _family(out, "offload_prefetch_issued_total", "counter", "Experts fetched ahead on a prediction.",
                [({}, experts.prefetch_issued)])
        _family(out, "offload_prefetch_used_total", "counter", "Prefetched experts that were then used.",
                [({}, experts.prefetch_used)])
        _family(out, "offload_prefetch_cancelled_total", "counter",
                "Prefetches stopped before their read ended: wrong guesses that yielded to demand reads.",
                [({}, experts.prefetch_cancelled)])
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        out.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
