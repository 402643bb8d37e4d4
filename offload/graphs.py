"""Decode steps replayed as one CUDA graph, for a fully resident model on a GPU.

A decode step of a resident model is a few hundred small kernels whose launches cost more than
their work (one layer of a 4-layer Mixtral-shaped model: ~0.2 ms of GPU work in ~1.5 ms of
Python and launches). With the KV cache in static mode (offload/kv_cache.py) and the experts'
grouped path needing no host sync (offload/grouped.py), every step has the same shapes and
addresses, so the first decode step runs eagerly, the second is captured, and every later one
is a copy of the new token ids into the graph's input followed by one replay.

Only where nothing in a step needs the host: resident experts on the grouped kernel, and an
attention with a static mode (not latent attention). `usable` says whether a runtime qualifies;
a capture that fails leaves the loop eager (`DecodeGraph.failed` says why).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


def usable(model, experts, device: torch.device) -> bool:
    """Whether decode steps of `model` with `experts` can be captured on `device`."""
    grouped = getattr(experts, "grouped", None)
    return (device.type == "cuda" and model.cfg.family.attention != "mla" and type(experts).__name__ ==
            "ResidentExperts" and grouped is not None and grouped.fused)


def static_decode(model, device: torch.device) -> bool:
    """Whether decode runs with the static KV cache: on a GPU, for every attention that has it, so
    that a graphed resident run and an eager offloaded one compute attention the same way (same
    bits); on a CPU the cache is read only up to its length (no graphs there to pay for the rest)."""
    return device.type == "cuda" and model.cfg.family.attention != "mla"


class DecodeGraph:
    """step(tokens [B], positions [B, 1]) -> logits [B, V] of the next token, replayed from a graph
    from the second call on. The KV cache must be in static mode."""

    def __init__(self, model, cache: KVCache, batch: int, device: torch.device):
        self.model, self.cache = model, cache
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)  # the graph's inputs
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.valid = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output [B, 1, V]
        self.calls = 0
        self.failed: str | None = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(positions)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()  # advances the cache's device-side position itself
            self.cache.length += 1  # the host's count, which the replay cannot touch
            return self.logits[:, -1]
        logits = self.model(self.ids, self.positions, self.valid, self.cache, last_only=True)[:, -1]
        if self.calls == 1 and self.failed is None:  # warmed up (kernels chosen, workspaces made): capture
            self._capture()
        return logits

    def _capture(self) -> None:
        length = self.cache.length
        stream = torch.cuda.current_stream()
        graph = torch.cuda.CUDAGraph()
        try:
            # Records, runs nothing: the cache stays as the eager step left it. thread_local: a sync on
            # another thread (a /metrics scrape reading the stats) does not spoil this capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self.model(self.ids, self.positions, self.valid, self.cache, last_only=True)
        except RuntimeError as exc:  # an op that cannot be captured: stay eager
            cause = exc.__context__ or exc  # a failed capture_end hides the op that broke it
            self.failed = (str(cause).splitlines() or [type(cause).__name__])[0]
            self.logits = None
            return
        finally:
            self.cache.length = length  # capture ran the step's Python once
            torch.cuda.set_stream(stream)  # a failed capture leaves its side stream current
        self.graph = graph
