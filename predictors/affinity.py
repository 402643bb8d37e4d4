"""Inter-layer co-activation statistics with a token-id prior (ExFlow, OpenMoE):

    score(e' at l+d) = sum over the experts e chosen at l of P(e' at l+d | e at l)
                       + prior_weight * P(e' at l+d | token id)

Counts come from a trace (`fit`) or, with none given, from the routing the
engine observes while it runs (`observe`). Pure numpy, no model needed.
"""

from __future__ import annotations

import numpy as np

from .base import Predictor


class AffinityPredictor(Predictor):
    name = "affinity"

    def __init__(self, num_layers: int, num_experts: int, vocab_size: int, lookahead: int = 1,
                 prior_weight: float = 1.0, smoothing: float = 0.1):
        self.L, self.E, self.lookahead = num_layers, num_experts, lookahead
        self.prior_weight, self.smoothing = prior_weight, smoothing
        # co[d-1][l, e, e']: tokens that chose e at l and e' at l+d
        self.co = np.zeros((lookahead, num_layers, num_experts, num_experts), dtype=np.float64)
        # tok[l, v, e]: tokens with id v that chose e at l (sparse in practice; dict of rows)
        self.tok: dict[tuple[int, int], np.ndarray] = {}
        self.vocab_size = vocab_size
        self._recent: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # pos -> (token_ids, chosen) this step

    def fit(self, trace) -> "AffinityPredictor":
        for seq in trace.sequences():
            ids, chosen = trace.token_ids[seq], trace.topk_ids[seq]  # [n], [n, L, K]
            for pos in range(self.L):
                self._count(pos, ids, chosen[:, pos])
                for d in range(1, self.lookahead + 1):
                    if pos + d < self.L:
                        self._co(pos, d, chosen[:, pos], chosen[:, pos + d])
        return self

    def _co(self, pos, d, src, dst):  # src [n, K], dst [n, K]
        onehot_dst = np.zeros((len(dst), self.E))
        np.put_along_axis(onehot_dst, dst, 1.0, axis=1)
        for k in range(src.shape[1]):
            np.add.at(self.co[d - 1, pos], src[:, k], onehot_dst)

    def _count(self, pos, token_ids, chosen):
        for v, experts in zip(token_ids.tolist(), chosen):
            row = self.tok.setdefault((pos, v), np.zeros(self.E))
            row[experts] += 1.0

    def observe(self, pos, token_ids, chosen):
        """Online learning from the engine: count this layer, and link it to the layers before it this step."""
        self._count(pos, token_ids, chosen)
        for d in range(1, self.lookahead + 1):
            prev = self._recent.get(pos - d)
            if prev is not None and len(prev[1]) == len(chosen):
                self._co(pos - d, d, prev[1], chosen)
        self._recent[pos] = (token_ids, chosen)

    def scores(self, pos, hidden, token_ids, chosen):
        out = {}
        for d in range(1, self.lookahead + 1):
            target = pos + d
            if target >= self.L:
                break
            co = self.co[d - 1, pos] + self.smoothing  # [E, E']
            cond = co / co.sum(axis=1, keepdims=True)  # P(e' | e)
            s = cond[chosen].sum(axis=1)  # [N, E']
            for i, v in enumerate(token_ids.tolist()):
                row = self.tok.get((target, v))
                if row is not None:
                    s[i] += self.prior_weight * row / row.sum()
            out[target] = s
        return out
