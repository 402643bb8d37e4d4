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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offload.errors import OffloadError
from offload.writer import check_new_directory, staged_directory

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
        """(first `fraction` of the tokens, the rest), for fitting on one and scoring on the other.
        By tokens, not sequences: a trace of one long sequence (a server's routing log) splits too;
        a sequence cut in two continues as a new one."""
        if not 0 < fraction < 1:
            raise OffloadError(f"the fitting fraction {fraction} must be between 0 and 1 (exclusive)")
        if self.num_tokens < 2:
            raise OffloadError(f"this trace has {self.num_tokens} token(s): fitting and scoring need at least 2")
        at = min(self.num_tokens - 1, max(1, round(self.num_tokens * fraction)))
        return self._slice(0, at), self._slice(at, self.num_tokens)

    def _slice(self, a: int, b: int) -> "Trace":
        inside = self.sequence_starts[(self.sequence_starts >= a) & (self.sequence_starts < b)] - a
        starts = np.union1d(np.zeros(1, dtype=np.int64), inside)  # a cut sequence starts anew at 0
        pick = lambda x: None if x is None else x[a:b]  # noqa: E731
        return Trace(self.token_ids[a:b], self.topk_ids[a:b], self.topk_probs[a:b], self.router_probs[a:b],
                     starts, pick(self.hidden), dict(self.header))


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace. Only `topk_ids` is required: without `token_ids` every token counts as id -1
    (token-id priors become one frequency prior), without `topk_probs` the k choices weigh the
    same, and without `router_probs` the top-k probabilities stand for the full softmax (zeros
    elsewhere; the score policy then sees only the chosen experts). The header says which."""
    from safetensors.numpy import load_file

    path = Path(path)
    header_path, data_path = path / "header.json", path / "trace.safetensors"
    if not header_path.exists() or not data_path.exists():
        raise OffloadError(f"{path} is not a trace directory (it needs header.json and trace.safetensors); "
                           "record one with `offload trace MODEL --prompts FILE --out DIR`")
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OffloadError(f"{header_path} is not UTF-8 JSON ({exc}); record or import the trace again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else header
        raise OffloadError(f"{path}: trace format {found!r}, expected {FORMAT!r}")
    try:
        t = load_file(str(data_path))
    except Exception as exc:  # safetensors' own errors: truncated, bad header, ...
        raise OffloadError(f"{data_path} is damaged ({exc}); record or import the trace again") from None
    return _complete(t, header, path)


def _complete(t: dict, header: dict, path) -> Trace:
    """Check a loaded trace's tensors against each other and fill in the optional ones."""
    ids = t.get("topk_ids")
    if ids is None or ids.ndim != 3 or 0 in ids.shape:
        raise OffloadError(f"{path}: topk_ids [tokens, layers, top_k] is missing or empty")
    n, layers, k = ids.shape
    experts = int(header.get("num_experts") or (ids.max() + 1))
    if ids.min() < 0 or ids.max() >= experts:
        raise OffloadError(f"{path}: expert ids {int(ids.min())}..{int(ids.max())} fall outside 0..{experts - 1} "
                           "(header num_experts); the trace is damaged or from another model")
    expect = {"token_ids": (n,), "topk_probs": (n, layers, k), "router_probs": (n, layers, experts)}
    for name, shape in expect.items():
        if name in t and t[name].shape != shape:
            raise OffloadError(f"{path}: {name} has shape {t[name].shape}, expected {shape}")
    if "hidden" in t and t["hidden"].shape[:2] != (n, layers):
        raise OffloadError(f"{path}: hidden has shape {t['hidden'].shape}, expected ({n}, {layers}, H)")
    ids = ids.astype(np.int64)
    tokens = t["token_ids"].astype(np.int64) if "token_ids" in t else np.full(n, -1, dtype=np.int64)
    topk = t["topk_probs"].astype(np.float32) if "topk_probs" in t else np.full((n, layers, k), 1 / k, np.float32)
    if "router_probs" in t:
        router = t["router_probs"].astype(np.float32)
    else:
        router = np.zeros((n, layers, experts), dtype=np.float32)
        np.put_along_axis(router, ids, topk, axis=2)
    starts = t.get("sequence_starts", np.zeros(1, dtype=np.int64)).astype(np.int64)
    if starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n:
        raise OffloadError(f"{path}: sequence_starts must rise from 0 and stay below {n} tokens")
    header = {**header, "has_token_ids": "token_ids" in t, "has_router_probs": "router_probs" in t}
    return Trace(tokens, ids, topk, router, starts, t.get("hidden"), header)


def save_trace(trace: Trace, path: str | os.PathLike, header: dict) -> None:
    """Write atomically: a temp directory renamed over nothing (an existing non-empty path is an error)."""
    from safetensors.numpy import save_file

    path = Path(path)
    check_new_directory(path)  # before the work below, not only when staging
    tensors = {
        "token_ids": trace.token_ids.astype(np.int32),
        "topk_ids": trace.topk_ids.astype(np.int16),
        "topk_probs": trace.topk_probs.astype(np.float32),
        "router_probs": trace.router_probs.astype(np.float16),
        "sequence_starts": trace.sequence_starts.astype(np.int64),
    }
    if trace.hidden is not None:
        tensors["hidden"] = trace.hidden.astype(np.float16)
    # A trace imported without token ids or router probabilities keeps them out (load_trace fills in).
    for name, flag in (("token_ids", "has_token_ids"), ("router_probs", "has_router_probs")):
        if trace.header.get(flag) is False or header.get(flag) is False:
            del tensors[name]
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
    with staged_directory(path) as tmp:  # all or nothing, as model directories are written
        save_file(tensors, str(tmp / "trace.safetensors"))
        (tmp / "header.json").write_text(json.dumps(full, indent=2))


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
