"""Run statistics: what a generation cost, readable as attributes, a dict, or JSON."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0  # prefill plus the first sampled token
    decode_tokens: int = 0  # tokens after the first step, the ones decode_seconds paid for
    finish_reason: str = ""  # of a one-prompt run: "eos", "stop", "length" or "context" (GenerationResult's)

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
class ExpertCounters:
    """Expert traffic of one layer (or all). A request is one expert needed by
    one layer step; it hits when the expert is already on the compute device."""

    hits: int = 0
    misses: int = 0
    bytes_from_disk: int = 0
    bytes_to_device: int = 0  # host -> GPU copies; 0 when the device is the CPU
    stall_seconds: float = 0.0  # time the compute waited for experts to arrive
    prefetch_issued: int = 0  # experts of this layer fetched ahead on a prediction
    prefetch_used: int = 0  # ... that the layer then requested while still cached
    prefetch_wasted: int = 0  # ... that it did not
    prefetch_cancelled: int = 0  # ... of those, stopped before their read ended (CPU: guesses yield, cache/priority.py)
    experts_on_cpu: int = 0  # missing experts computed on the CPU from host RAM instead of fetched

    @property
    def hit_rate(self) -> float:
        requests = self.hits + self.misses
        return self.hits / requests if requests else 0.0

    def add(self, other: "ExpertCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class Event(NamedTuple):
    """One span of a recorded step. kind: "layer" (a MoE layer's whole expert step, main thread),
    "compute" (an expert on the compute device, main thread),
    "stall" (the main thread waiting for a read, copy or CPU expert), "read" (disk -> RAM, on an I/O
    thread or the CPU worker), "fetch" (host -> device copy, I/O thread), "cpu" (a missed expert
    computed on the CPU worker). Times are time.perf_counter() seconds; on a GPU they are the host's
    view (kernels and copies are queued, so "compute" and "fetch" are mostly their launch)."""

    layer: int  # decoder layer index
    kind: str
    start: float
    end: float
    expert: int = -1


@dataclass
class Timeline:
    """The expert work of one decode step (opt-in: `OffloadedExperts.record_timeline(True)`).
    Threads append to `events` while the step runs; `as_dict` gives times from the step's start."""

    start: float  # perf_counter() when the step's forward began
    tokens: int  # rows in the step (one new token each)
    events: list = field(default_factory=list)

    def as_dict(self) -> dict:
        events = sorted(list(self.events), key=lambda e: (e.start, e.layer))  # a copy: threads may append
        return {"step": "decode", "tokens": self.tokens,
                "events": [{"layer": e.layer, "kind": e.kind, "expert": e.expert,
                            "start": round(e.start - self.start, 7), "end": round(e.end - self.start, 7)}
                           for e in events]}


class ExpertStats:
    """Per-layer expert counters, and their total (and, when recorded, the last decode step's timeline)."""

    def __init__(self, layers):
        self.layers = {layer: ExpertCounters() for layer in layers}
        self.timeline: Timeline | None = None  # set by the offloaded engine while it records
        # Hits counted on the device (a resident executor never syncs to count): per layer, in
        # `layers` order, added to the counters when they are read.
        self.device_hits = None
        self.lock = threading.Lock()

    def count_hits(self, layer: int, offs) -> None:
        """A resident layer step's hits from its group offsets [E] (offload/grouped.py), on the device."""
        import torch

        if self.device_hits is None:
            with torch.inference_mode(False):  # a normal tensor, added to in place (a CUDA graph keeps it)
                self.device_hits = torch.zeros(len(self.layers), dtype=torch.int64, device=offs.device)
            self.positions = {layer: i for i, layer in enumerate(self.layers)}
            self.hits_read = [0] * len(self.layers)  # device_hits as last added to the counters
        used = torch.diff(offs, prepend=offs.new_zeros(1)) > 0  # [E]: the experts with rows
        self.device_hits[self.positions[layer]] += used.sum()

    def _settle(self) -> None:
        """Add what the device counted since the last read. The device tensor is never reset: a reader
        on another thread (the server's /metrics) must not wipe hits the generating thread adds."""
        if self.device_hits is None:
            return
        with self.lock:
            now = self.device_hits.tolist()  # the one sync, when read
            for i, layer in enumerate(self.layers):
                self.layers[layer].hits += now[i] - self.hits_read[i]
            self.hits_read = now

    def __getitem__(self, layer: int) -> ExpertCounters:
        self._settle()
        return self.layers[layer]

    def total(self) -> ExpertCounters:
        self._settle()
        total = ExpertCounters()
        for counters in self.layers.values():
            total.add(counters)
        return total

    def reset(self) -> None:
        self._settle()
        for layer in self.layers:
            self.layers[layer] = ExpertCounters()

    def as_dict(self) -> dict:
        self._settle()
        return {"total": self.total().as_dict(), "layers": {str(k): v.as_dict() for k, v in self.layers.items()}}


@dataclass
class RuntimeStats:
    """Totals over the runtime's life plus the last generation's figures.

    The expert counters (`hits`, `misses`, `bytes_from_disk`, `bytes_to_device`,
    `stall_seconds`) are totals; `experts[layer]` has them per layer."""

    experts: ExpertStats
    expert_format: str = ""  # "bf16", "int8", "int4-g32", ...: int formats are lossy (quantized)
    bytes_per_expert: int = 0  # what one fetch moves, in that format
    dense_format: str = ""  # "" (the compute dtype) or "int8": the resident layers' weights (lossy)
    requests: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    last: GenerationStats | None = None

    def __getattr__(self, name):
        if name in ExpertCounters.__dataclass_fields__ or name == "hit_rate":
            return getattr(self.experts.total(), name)
        raise AttributeError(name)

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
        timeline = self.experts.timeline
        return {
            "expert_format": self.expert_format,
            "quantized": self.expert_format.startswith("int") or bool(self.dense_format),
            "dense_format": self.dense_format,
            "bytes_per_expert": self.bytes_per_expert,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_per_second": self.tokens_per_second,
            "time_to_first_token": self.time_to_first_token,
            **self.experts.total().as_dict(),
            "layers": self.experts.as_dict()["layers"],
            "last": self.last.as_dict() if self.last else None,
            # only when recorded: the last decode step's expert work, for `offload plot`
            **({"timeline": timeline.as_dict()} if timeline is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)
