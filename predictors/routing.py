"""A routing-only predictor: the next layer's experts from nothing but routing
(no hidden states; token ids only where the trace has them), as a server's
routing log records it.

For target layer t = pos + 1 it weighs, per candidate expert e', evidence
that single-expert affinity (`affinity.py`) averages away:

    set       P(e' | the token's whole top-k set at t-1), backed off to its
              pairs, then to single experts; and P(e' | its sets at t-1 .. t-d
              together) for d up to `history`, each backed off to the one
              before, in proportion to how often the longer key was seen
    history   P(e' | each of the token's sets at t-2, t-3, ...) alone
    request   whether the sequence's previous token chose e' at t (and
              whether this token's set at t-1 repeats the previous token's),
              P(e' | the previous token's set at t), jointly with this token's
              set at t-1, and e''s decayed frequency at t over the sequence so
              far (fast and slow)
    token     P(e' | the token id) where the trace has ids
    prior     e''s share of tokens at t

A logistic regression per layer over the logs of these turns them into
P(e' is chosen at t). `fit` trains it on counts from the other half of the
training trace (so its weights see out-of-sample counts), then counts the
whole trace: the scores are probabilities (`calibrated`), which
`offload/prefetch.py` weighs against the cost of a wrong fetch.

`replay(trace)` scores a whole trace causally (a token sees its own layers up
to `pos` and its sequence's earlier tokens); `scores` / `observe` give the
same numbers online in the engine (tests check), learning counts as they go.
Pure numpy.
"""

from __future__ import annotations

import itertools

import numpy as np

from .base import Predictor

FLOOR = 1e-4  # probabilities are clipped here before their log
LAYER_PULL = 10.0  # L2 pull of each layer's weights toward the weights shared by all layers


class _Table:
    """Sparse counts keyed by uint64 codes (a pair, or a hashed set): per code, how many
    tokens it was seen with (n) and how many of them chose each target expert (sums [., E])."""

    def __init__(self, num_experts: int):
        self.E = num_experts
        self.index: dict[int, int] = {}
        self.sums = np.zeros((0, num_experts))
        self.n = np.zeros(0)
        self._keys = self._rows = None  # sorted lookup, rebuilt after adds

    def add(self, codes: np.ndarray, targets: np.ndarray) -> None:
        """codes [N] uint64, targets [N, K] expert ids chosen at the target layer."""
        uniq, inv = np.unique(codes, return_inverse=True)
        agg = np.zeros((len(uniq), self.E))
        np.add.at(agg, (np.repeat(inv, targets.shape[1]), targets.reshape(-1)), 1.0)
        rows = np.array([self.index.setdefault(c, len(self.index)) for c in uniq.tolist()], dtype=np.int64)
        if len(self.index) > len(self.n):
            grow = max(len(self.index), 2 * len(self.n)) - len(self.n)
            self.sums = np.concatenate([self.sums, np.zeros((grow, self.E))])
            self.n = np.concatenate([self.n, np.zeros(grow)])
        self.sums[rows] += agg
        self.n[rows] += np.bincount(inv, minlength=len(uniq))
        self._keys = None

    def get(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """codes [N] -> (sums [N, E], n [N]); zeros for codes never seen."""
        if self._keys is None:
            keys = np.fromiter(self.index.keys(), dtype=np.uint64, count=len(self.index))
            order = np.argsort(keys)
            self._keys = keys[order]
            self._rows = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))[order]
        if len(self._keys) == 0:
            return np.zeros((len(codes), self.E)), np.zeros(len(codes))
        at = np.minimum(np.searchsorted(self._keys, codes), len(self._keys) - 1)
        found = self._keys[at] == codes
        rows = self._rows[at]
        return (np.where(found[:, None], self.sums[rows], 0.0), np.where(found, self.n[rows], 0.0))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64: a well-spread 64-bit code per value."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _set_codes(chosen: np.ndarray) -> np.ndarray:
    """[N, K] expert ids -> [N] uint64: one code per set, whatever its order."""
    with np.errstate(over="ignore"):
        return _mix(chosen + 1).sum(axis=1, dtype=np.uint64)


def _hot_codes(hot: np.ndarray) -> np.ndarray:
    """[N, E] multi-hot -> [N] uint64: the same code as `_set_codes` of its ones (0: no expert)."""
    with np.errstate(over="ignore"):
        return (hot.astype(np.uint64) * _mix(np.arange(1, hot.shape[1] + 1))).sum(axis=1, dtype=np.uint64)


def _join(*codes: np.ndarray) -> np.ndarray:
    """Codes of several keys -> one code for them together (order matters)."""
    h = np.zeros(len(codes[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, c in enumerate(codes, 1):
            h = _mix(h ^ c) + np.uint64(i)
    return h


def _pair_codes(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, K] -> [N, K(K-1)/2] uint64: a code per unordered pair of the set."""
    s = np.sort(chosen, axis=1).astype(np.uint64)
    pairs = list(itertools.combinations(range(chosen.shape[1]), 2))
    return np.stack([s[:, i] * np.uint64(num_experts) + s[:, j] for i, j in pairs], axis=1)


def _decayed(x: np.ndarray, starts: np.ndarray, decay: float, block: int = 128) -> np.ndarray:
    """y[t] = sum over earlier tokens j of t's sequence of decay^(t-1-j) x[j]; x [T, E] or [T]."""
    flat = x.ndim == 1
    x = x[:, None] if flat else x
    y = np.zeros_like(x, dtype=np.float64)
    ends = [*starts.tolist()[1:], len(x)]
    i = np.arange(block)
    weights = np.tril(decay ** np.maximum(i[:, None] - i[None, :], 0))  # [B, B]: decay^(i-j), j <= i
    for a, b in zip(starts.tolist(), ends):
        state = np.zeros(x.shape[1])  # inclusive sum up to the token before the block
        for c in range(a, b, block):
            n = min(block, b - c)
            inclusive = weights[:n, :n] @ x[c:c + n] + np.outer(decay ** (i[:n] + 1), state)  # [n, E]
            y[c] = state
            y[c + 1:c + n] = inclusive[:-1]
            state = inclusive[-1]
    return y[:, 0] if flat else y


def _multi_hot(chosen: np.ndarray, num_experts: int) -> np.ndarray:
    hot = np.zeros((len(chosen), num_experts))
    np.put_along_axis(hot, chosen, 1.0, axis=1)
    return hot


class RoutingPredictor(Predictor):
    name = "routing"
    lookahead = 1
    calibrated = True  # `fit` trains the probabilities on counts that the rows it fits on did not feed

    def __init__(self, num_layers: int, num_experts: int, top_k: int, history: int = 3, smoothing: float = 4.0,
                 decays: tuple[float, ...] = (0.7, 0.97), learn: bool = True):
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.history, self.beta, self.decays = history, smoothing, decays
        self.learn = learn  # whether `observe` also adds to the counts (the running state advances anyway)
        self.prior = np.zeros((num_layers, num_experts))  # tokens that chose e at l
        self.tokens = np.zeros(num_layers)
        # single[h, t, a, e']: tokens that chose a at t-1-h and e' at t; seen[h, t, a]: that chose a at t-1-h
        self.single = np.zeros((history, num_layers, num_experts, num_experts))
        self.seen = np.zeros((history, num_layers, num_experts))
        table = lambda: [_Table(num_experts) for _ in range(num_layers)]  # noqa: E731  one per target layer
        self.pairs = table()  # keyed by each pair of the set at t-1
        self.paths = [table() for _ in range(history)]  # [d - 1]: keyed by the sets at t-1 .. t-d together
        self.by_token = table()  # keyed by the token id (-1: none)
        self.markov = table()  # keyed by the previous token's set at t
        self.joint = table()  # keyed by the set at t-1 and the previous token's set at t
        self.weights = self.default_weights()  # [L, F + 1]: per target layer, the last is the bias
        self._recent: dict[int, np.ndarray] = {}  # pos -> chosen [N, K] this step (engine)
        self._state: dict[int, dict] = {}  # pos -> the request's running state at that layer (engine)

    @property
    def num_features(self) -> int:  # single, pairs, paths, history, token, markov, joint, decays, prior, prev, repeat
        return 2 * self.history + 7 + len(self.decays)

    def default_weights(self) -> np.ndarray:
        """Before any fit: the longest path's evidence alone, as a conditional probability."""
        w = np.zeros((self.L, self.num_features + 1))
        w[:, 1 + self.history] = 1.0
        return w

    # ---- features -------------------------------------------------------------

    def _prior(self, t: int) -> np.ndarray:
        return (self.prior[t] + self.K / self.E) / (self.tokens[t] + 1)  # [E], sums to about K

    def _conditional(self, h: int, t: int, chosen: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """P(e' at t | the experts chosen at t-1-h), averaged over them, smoothed toward the prior. [N, E]"""
        cond = (self.single[h, t] + self.beta * prior) / (self.seen[h, t][:, None] + self.beta)  # [E, E']
        return cond[chosen].mean(axis=1)

    def _backoff(self, table: _Table, codes: np.ndarray, below: np.ndarray) -> np.ndarray:
        """Counts under `codes`, smoothed toward `below` [N, E] by `smoothing` pseudo-tokens."""
        sums, count = table.get(codes)
        return (sums + self.beta * below) / (count + self.beta)[:, None]

    def _features(self, t: int, before: list, tokens: np.ndarray, prev: np.ndarray, same: np.ndarray,
                  emas: list) -> np.ndarray:
        """Evidence for every expert of layer t, [N, E, F]. before: the tokens' sets [N, K] at t-1,
        t-2, ... (`history` of them; None before layer 0); tokens [N]: their ids (-1: unknown);
        prev [N, E]: the previous token's set at t (zeros: none); same [N]: the share of this
        token's set at t-1 that the previous token also chose; emas: per decay, (sums [N, E],
        weights [N]) over the sequence's earlier tokens at t."""
        src = before[0]
        n, prior = len(src), self._prior(t)
        single = self._conditional(0, t, src, prior)
        level = single
        if self.K >= 2:
            sums, count = self.pairs[t].get(_pair_codes(src, self.E).reshape(-1))
            sums, count = sums.reshape(n, -1, self.E).sum(1), count.reshape(n, -1).sum(1)
            level = (sums + self.beta * level) / (count + self.beta)[:, None]
        cols = [single, level]
        codes = []
        for d in range(self.history):  # ever longer paths, each backed off to the one before
            if before[d] is not None:
                codes.append(_set_codes(before[d]))
                level = self._backoff(self.paths[d][t], _join(*codes), level)
            cols.append(level)
        flat = np.broadcast_to(prior, (n, self.E))
        cols += [self._conditional(h, t, c, prior) if c is not None else flat for h, c in enumerate(before[1:], 1)]
        cols.append(self._backoff(self.by_token[t], tokens.astype(np.int64).astype(np.uint64), flat))
        previous = _hot_codes(prev)
        cols.append(self._backoff(self.markov[t], previous, flat))
        cols.append(self._backoff(self.joint[t], _join(codes[0], previous), cols[2]))
        cols += [(sums + self.beta * prior) / (weight + self.beta)[:, None] for sums, weight in emas]
        cols.append(flat)
        logs = [np.log(np.clip(c, FLOOR, 1.0)) for c in cols]
        return np.stack([*logs, prev, prev * same[:, None]], axis=2)  # [N, E, F]

    def _trace_features(self, trace, t: int, chunk: int = 4096):
        """Layer t's features for the trace's tokens (causal), `chunk` tokens at a time (they are
        [N, E, F]: large), each with the truth [N, E]."""
        ids, starts = trace.topk_ids, trace.sequence_starts
        hot = _multi_hot(ids[:, t], self.E)  # [T, E]
        prev = _previous(hot, starts)
        same = (_multi_hot(ids[:, t - 1], self.E) * _previous(_multi_hot(ids[:, t - 1], self.E), starts)).sum(1)
        ones = np.ones(trace.num_tokens)
        emas = [(_decayed(hot, starts, d), _decayed(ones, starts, d)) for d in self.decays]
        for a in range(0, trace.num_tokens, chunk):
            rows = slice(a, a + chunk)
            before = [ids[rows, t - 1 - h] if t - 1 - h >= 0 else None for h in range(self.history)]
            yield (self._features(t, before, trace.token_ids[rows], prev[rows], same[rows] / self.K,
                                  [(sums[rows], weight[rows]) for sums, weight in emas]), hot[rows])

    def _probabilities(self, t: int, features: np.ndarray) -> np.ndarray:
        w = self.weights[t]
        return 1.0 / (1.0 + np.exp(-np.clip(features @ w[:-1] + w[-1], -50, 50)))

    # ---- counting and fitting -------------------------------------------------

    def count(self, trace) -> "RoutingPredictor":
        """Add a trace's routing to the counts (the weights stay)."""
        ids = trace.topk_ids
        for t in range(self.L):
            self._count(t, ids[:, :t + 1], trace.token_ids, _previous(_multi_hot(ids[:, t], self.E),
                                                                        trace.sequence_starts))
        return self

    def _count(self, t: int, upto: np.ndarray, tokens: np.ndarray, prev: np.ndarray) -> None:
        """upto [N, t + 1, K]: the tokens' sets at layers 0..t (only the last `history` + 1 are read);
        tokens [N]: their ids; prev [N, E]: the previous token's set at t. Counts what leads to t."""
        dst = upto[:, t]
        self.prior[t] += _multi_hot(dst, self.E).sum(0)
        self.tokens[t] += len(dst)
        self.by_token[t].add(tokens.astype(np.int64).astype(np.uint64), dst)
        self.markov[t].add(_hot_codes(prev), dst)
        codes = []
        for h in range(min(self.history, t)):
            s = t - 1 - h
            for k in range(self.K):
                np.add.at(self.single[h, t], (np.repeat(upto[:, s, k], self.K), dst.reshape(-1)), 1.0)
                np.add.at(self.seen[h, t], upto[:, s, k], 1.0)
            codes.append(_set_codes(upto[:, s]))
            self.paths[h][t].add(_join(*codes), dst)
        if t >= 1:
            self.joint[t].add(_join(codes[0], _hot_codes(prev)), dst)
            if self.K >= 2:
                pairs = _pair_codes(upto[:, t - 1], self.E)
                self.pairs[t].add(pairs.reshape(-1), np.repeat(dst, pairs.shape[1], axis=0))

    def fit(self, trace, max_rows: int = 400_000, seed: int = 0) -> "RoutingPredictor":
        """Weights from two folds (counts of one half, features of the other): shared by all layers,
        then each layer's pulled toward them; then counts of the whole trace."""
        self.weights = self.default_weights()
        if trace.num_tokens >= 8 and self.L >= 2:
            xs, ys = {t: [] for t in range(1, self.L)}, {t: [] for t in range(1, self.L)}
            rng = np.random.default_rng(seed)
            share = max_rows / (self.L - 1) / (trace.num_tokens * self.E)  # of the rows, kept for fitting
            halves = trace.split(0.5)
            for a, b in ((0, 1), (1, 0)):
                fold = type(self)(self.L, self.E, self.K, self.history, self.beta, self.decays).count(halves[a])
                for t in range(1, self.L):
                    for x, y in fold._trace_features(halves[b], t):
                        keep = rng.random(y.size) < share if share < 1 else slice(None)
                        xs[t].append(x.reshape(-1, self.num_features)[keep])
                        ys[t].append(y.reshape(-1)[keep])
            xs, ys = {t: np.concatenate(x) for t, x in xs.items()}, {t: np.concatenate(y) for t, y in ys.items()}
            shared = _logistic(np.concatenate(list(xs.values())), np.concatenate(list(ys.values())), self.weights[0])
            self.weights[0] = shared
            for t in xs:
                self.weights[t] = _logistic(xs[t], ys[t], shared, l2=LAYER_PULL)
        return self.count(trace)

    # ---- scoring --------------------------------------------------------------

    def replay(self, trace) -> dict[int, dict[int, np.ndarray]]:
        """{pos: {pos + 1: P [T, E]}} for every token of the trace, each from what precedes it."""
        out = {self.L - 1: {}}
        for t in range(1, self.L):
            out[t - 1] = {t: np.concatenate([self._probabilities(t, x) for x, _ in self._trace_features(trace, t)])}
        return dict(sorted(out.items()))

    def scores(self, pos, hidden, token_ids, chosen):
        t = pos + 1
        if t >= self.L:
            return {}
        chosen = np.asarray(chosen)
        n = len(chosen)
        before = [chosen]
        for h in range(1, self.history):
            c = self._recent.get(pos - h)  # observed earlier this step (None: before layer 0, or another batch)
            before.append(c if pos - h >= 0 and c is not None and len(c) == n else None)
        # The request's state before this step (in a prefill, every token of the step sees the same).
        state, below = self._state.get(t), self._state.get(pos)
        prev = np.broadcast_to(state["hot"] if state else np.zeros(self.E), (n, self.E))
        same = (_multi_hot(chosen, self.E) * below["hot"]).sum(1) / self.K if below else np.zeros(n)
        emas = [(np.broadcast_to(s, (n, self.E)), np.full(n, w))
                for s, w in (state["emas"] if state else [(np.zeros(self.E), 0.0)] * len(self.decays))]
        tokens = np.full(n, -1) if token_ids is None or len(token_ids) != n else np.asarray(token_ids)
        return {t: self._probabilities(t, self._features(t, before, tokens, prev, same, emas))}

    def observe(self, pos, token_ids, chosen):
        """Online, in the engine: count this layer against the ones before it this step, and
        advance the request's running state at this layer by the step's tokens, in order."""
        chosen = np.asarray(chosen)
        n = len(chosen)
        state = self._state.setdefault(pos, {"hot": np.zeros(self.E),
                                             "emas": [(np.zeros(self.E), 0.0) for _ in self.decays]})
        hot = _multi_hot(chosen, self.E)
        if self.learn:
            upto = [self._recent.get(s) for s in range(max(0, pos - self.history), pos)]
            if all(c is not None and len(c) == n for c in upto):
                tokens = np.full(n, -1) if token_ids is None or len(token_ids) != n else np.asarray(token_ids)
                prev = np.concatenate([state["hot"][None], hot[:-1]])  # each token's predecessor at pos
                filler = [chosen] * (pos - len(upto))  # layers the counts do not read
                self._count(pos, np.stack([*filler, *upto, chosen], axis=1), tokens, prev)
        self._recent[pos] = chosen
        for row in hot:  # the sums as the next token sees them: its predecessors', decayed
            state["hot"] = row
            state["emas"] = [(d * s + row, d * w + 1.0) for d, (s, w) in zip(self.decays, state["emas"])]

    def reset(self) -> None:
        """A new request: forget the running state (the counts stay)."""
        self._recent.clear()
        self._state.clear()


def _previous(hot: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[T, E] -> each token's predecessor's row in its sequence (zeros for a sequence's first token)."""
    prev = np.roll(hot, 1, axis=0)
    prev[starts] = 0.0
    return prev


def _logistic(x: np.ndarray, y: np.ndarray, start: np.ndarray, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """Weights [F + 1] (the last: bias) of a logistic regression, by damped Newton steps from `start`,
    with an L2 pull toward `start` (the fit stays sane on a few hundred tokens)."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # [N, F + 1]

    def loss(w):
        z = a @ w
        return float(np.logaddexp(0, z).sum() - y @ z + 0.5 * l2 * ((w - start) ** 2).sum())

    w = start.astype(np.float64).copy()
    current = loss(w)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -50, 50)))
        grad = a.T @ (p - y) + l2 * (w - start)
        hess = (a * (p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-4 and loss(w - size * step) > current:  # backtrack: never a worse fit
            size /= 2
        if size <= 1e-4:
            break
        w -= size * step
        previous, current = current, loss(w)
        if previous - current < 1e-7 * max(1.0, abs(current)):
            break
    return w
