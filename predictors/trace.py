"""Routing traces in the `offload-trace/1` format (tests/data/demo_trace/README.md).

A trace is `trace.safetensors` (token_ids [T], topk_ids [T, L, K], topk_probs
[T, L, K], router_probs [T, L, E], sequence_starts [S], and optionally
`hidden` [T, L, H] float16: the router input of every MoE layer, what the
learned predictors train on) plus `header.json`. L counts MoE layers; the
header's `layers` gives their decoder indices (all layers when absent).
Traces replay without the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offload.errors import OffloadError
from offload.writer import as_umask_allows

FORMAT = "offload-trace/1"


@dataclass
class Trace:
    token_ids: np.ndarray  # [T] int
    topk_ids: np.ndarray  # [T, L, K] int
    topk_probs: np.ndarray  # [T, L, K] float32, not renormalised
    router_probs: np.ndarray  # [T, L, E] float
    sequence_starts: np.ndarray  # [S]
    hidden: np.ndarray | None = None  # [T, L, H] float16, router inputs
    header: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    @property
    def num_experts(self) -> int:
        return self.router_probs.shape[2]

    @property
    def layers(self) -> list[int]:
        return list(self.header.get("layers", range(self.num_layers)))

    def sequences(self) -> list[slice]:
        ends = [*self.sequence_starts.tolist()[1:], self.num_tokens]
        return [slice(s, e) for s, e in zip(self.sequence_starts.tolist(), ends)]

    def split(self, fraction: float) -> tuple["Trace", "Trace"]:
        """(first part, rest) at a sequence boundary, for training on one and scoring on the other."""
        seqs = self.sequences()
        cut = max(1, min(len(seqs) - 1, round(len(seqs) * fraction)))
        at = seqs[cut].start
        return self._slice(0, at), self._slice(at, self.num_tokens)

    def _slice(self, a: int, b: int) -> "Trace":
        starts = self.sequence_starts[(self.sequence_starts >= a) & (self.sequence_starts < b)] - a
        pick = lambda x: None if x is None else x[a:b]  # noqa: E731
        return Trace(self.token_ids[a:b], self.topk_ids[a:b], self.topk_probs[a:b], self.router_probs[a:b],
                     starts, pick(self.hidden), dict(self.header))


def load_trace(path: str | os.PathLike) -> Trace:
    from safetensors.numpy import load_file

    path = Path(path)
    header_path, data_path = path / "header.json", path / "trace.safetensors"
    if not header_path.exists() or not data_path.exists():
        raise OffloadError(f"{path} is not a trace directory (it needs header.json and trace.safetensors); "
                           "record one with `offload trace MODEL --prompts FILE --out DIR`")
    header = json.loads(header_path.read_text())
    if header.get("format") != FORMAT:
        raise OffloadError(f"{path}: trace format {header.get('format')!r}, expected {FORMAT!r}")
    t = load_file(str(data_path))
    return Trace(t["token_ids"].astype(np.int64), t["topk_ids"].astype(np.int64), t["topk_probs"],
                 t["router_probs"].astype(np.float32), t["sequence_starts"].astype(np.int64), t.get("hidden"),
                 header)


def save_trace(trace: Trace, path: str | os.PathLike, header: dict) -> None:
    """Write atomically: a temp directory renamed over nothing (an existing path is an error)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise OffloadError(f"{path} already exists and is not empty; choose another --out")
    tensors = {
        "token_ids": trace.token_ids.astype(np.int32),
        "topk_ids": trace.topk_ids.astype(np.int16),
        "topk_probs": trace.topk_probs.astype(np.float32),
        "router_probs": trace.router_probs.astype(np.float16),
        "sequence_starts": trace.sequence_starts.astype(np.int64),
    }
    if trace.hidden is not None:
        tensors["hidden"] = trace.hidden.astype(np.float16)
    full = {
        "format": FORMAT, "num_tokens": trace.num_tokens, "num_layers": trace.num_layers,
        "num_experts": trace.num_experts, "top_k": trace.top_k, "num_sequences": len(trace.sequence_starts),
        "layers": trace.layers, "has_hidden": trace.hidden is not None,
        "tensors": {
            "token_ids": "int32 [T]: input tokens, sequences concatenated",
            "topk_ids": "int16 [T, L, K]: selected experts per token and MoE layer, by descending probability",
            "topk_probs": "float32 [T, L, K]: their router softmax probabilities, not renormalised",
            "router_probs": "float16 [T, L, E]: the full router softmax",
            "sequence_starts": "int64 [S]: token index where each sequence begins",
            "hidden": "float16 [T, L, H]: the router input (normalised hidden state) of each MoE layer",
        },
        **header,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    save_file(tensors, str(tmp / "trace.safetensors"))
    (tmp / "header.json").write_text(json.dumps(full, indent=2))
    as_umask_allows(tmp)
    if path.exists():
        path.rmdir()
    tmp.rename(path)


class TraceRecorder:
    """An expert executor wrapper that records what the router chose, then delegates."""

    def __init__(self, inner, layers: list[int], keep_hidden: bool):
        self.inner, self.layers, self.keep_hidden = inner, layers, keep_hidden
        self.rows: dict[int, list] = {layer: [] for layer in layers}

    def begin_step(self, input_ids):
        if hasattr(self.inner, "begin_step"):
            self.inner.begin_step(input_ids)

    def __call__(self, layer, hidden, ids, weights, probs=None):
        top_probs = probs.gather(1, ids)  # [N, K] as selected, before any renormalisation
        self.rows[layer].append((ids.cpu().numpy(), top_probs.cpu().numpy(), probs.cpu().numpy(),
                                 hidden.float().cpu().numpy().astype(np.float16) if self.keep_hidden else None))
        return self.inner(layer, hidden, ids, weights, probs)

    def trace(self, token_ids: list[list[int]]) -> Trace:
        stack = lambda i: np.stack([np.concatenate([r[i] for r in self.rows[l]]) for l in self.layers], 1)  # noqa
        starts = np.cumsum([0] + [len(s) for s in token_ids[:-1]])
        return Trace(np.concatenate([np.asarray(s) for s in token_ids]), stack(0), stack(1), stack(2), starts,
                     stack(3) if self.keep_hidden else None, {"layers": self.layers})
