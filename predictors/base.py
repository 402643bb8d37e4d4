"""The predictor interface: guess which experts later MoE layers will need.

Layers are numbered by position among the MoE layers (0 .. L-1), as in
traces. At MoE layer `pos`, once its router has run, the engine asks:

    scores(pos, hidden [N, H] | None, token_ids [N], chosen [N, K]) -> {pos + d: [N, E] scores}

for d = 1 .. lookahead (only targets that exist). Higher is likelier;
`rank` turns scores into the experts to fetch. `observe` feeds back the
routing actually chosen, for predictors that learn online. `replay(trace)`
scores a recorded trace offline (evaluate.py, the simulator).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class Predictor:
    name = "none"
    lookahead = 1
    needs_hidden = False
    calibrated = False  # whether `scores` are probabilities, fitted out of sample (predictors/calibrate.py)

    def scores(self, pos: int, hidden, token_ids: np.ndarray, chosen: np.ndarray) -> dict[int, np.ndarray]:
        return {}

    def observe(self, pos: int, token_ids: np.ndarray, chosen: np.ndarray) -> None:
        pass

    def replay(self, trace) -> dict[int, dict[int, np.ndarray]]:
        """{pos: {target: [T, E]}} for every token of a trace, as `scores` gives them in a run.
        This default asks once per layer with all the tokens; a predictor that also draws on a
        token's sequence (its earlier tokens' routing) replays it itself, causally."""
        out = {}
        for pos in range(trace.num_layers):
            hidden = trace.hidden[:, pos] if trace.hidden is not None else None
            out[pos] = self.scores(pos, hidden, trace.token_ids, trace.topk_ids[:, pos])
        return out


def rank(scores: np.ndarray, per_token: int, limit: int | None = None) -> list[int]:
    """Experts to fetch for one target layer: the union of every token's top
    `per_token`, ordered by summed score, cut at `limit`. scores [N, E]."""
    if scores.ndim == 1:
        scores = scores[None]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :per_token]  # [N, per_token]
    picked = np.unique(top)
    order = picked[np.argsort(-scores[:, picked].sum(0), kind="stable")]
    return order[:limit].tolist() if limit is not None else order.tolist()


def recall_precision(predicted: Sequence[int], actual: Sequence[int]) -> tuple[float, float]:
    p, a = set(predicted), set(actual)
    hit = len(p & a)
    return (hit / len(a) if a else 1.0), (hit / len(p) if p else 0.0)
