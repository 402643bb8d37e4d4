"""The predictor interface: guess which experts later MoE layers will need.

Layers are numbered by position among the MoE layers (0 .. L-1), as in
traces. At MoE layer `pos`, once its router has run, the engine asks:

    scores(pos, hidden [N, H] | None, token_ids [N], chosen [N, K]) -> {pos + d: [N, E] scores}

for d = 1 .. lookahead (only targets that exist). Higher is likelier;
`rank` turns scores into the experts to fetch. `observe` feeds back the
routing actually chosen, for predictors that learn online.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class Predictor:
    name = "none"
    lookahead = 1
    needs_hidden = False

    def scores(self, pos: int, hidden, token_ids: np.ndarray, chosen: np.ndarray) -> dict[int, np.ndarray]:
        return {}

    def observe(self, pos: int, token_ids: np.ndarray, chosen: np.ndarray) -> None:
        pass


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
