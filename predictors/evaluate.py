"""Score predictors on a trace, offline: recall@k and precision per layer, and
the hit rate each cache policy reaches with and without prefetching,
beside Belady's optimum (demand fetching only). No model is needed except
for `gate`, which reads the routers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offload.cache.policy import Belady, make_policy
from offload.cache.state import ExpertCache
from offload.errors import OffloadError

from .base import Predictor, rank

from . import NAMES as PREDICTORS  # noqa: E402,F401  (every predictor by name; predictors/__init__.py)


@dataclass
class Accuracy:
    target: int  # MoE position predicted
    recall_k: float  # share of the true top-k found in the predicted top-k
    recall_2k: float  # ... in the predicted top-2k
    precision_2k: float  # share of the predicted top-2k that was needed


def all_scores(predictor: Predictor, trace) -> dict[int, dict[int, np.ndarray]]:
    """{pos: {target: [T, E]}} for a predictor that does not learn while it runs (`Predictor.replay`)."""
    return predictor.replay(trace)


def accuracy(predictor: Predictor, trace) -> list[Accuracy]:
    k = trace.top_k
    results = []
    for pos, targets in all_scores(predictor, trace).items():
        for target, s in targets.items():
            if target != pos + 1:
                continue
            order = np.argsort(-s, axis=1, kind="stable")  # [T, E]
            truth = trace.topk_ids[:, target]  # [T, K]
            hit_k = (order[:, :k, None] == truth[:, None, :]).any(1).sum(1)  # [T]
            hit_2k = (order[:, : 2 * k, None] == truth[:, None, :]).any(1).sum(1)
            results.append(Accuracy(target, float(hit_k.mean() / k), float(hit_2k.mean() / k),
                                    float(hit_2k.mean() / (2 * k))))
    return results


def simulate(trace, policy: str, slots_per_layer: int, scores: dict | None = None,
             prefetch_per_layer: int | None = None) -> dict:
    """Token-by-token decode of the trace through a per-layer cache; with
    `scores`, after each layer the predicted experts of the next layer are
    fetched ahead (at most `prefetch_per_layer`)."""
    L, K = trace.num_layers, trace.top_k
    keys = [(pos, int(e)) for t in range(trace.num_tokens) for pos in range(L) for e in trace.topk_ids[t, pos]]
    chosen = Belady(keys) if policy == "belady" else make_policy(policy)
    cache = ExpertCache(slots_per_layer * L, chosen, list(range(L)), "layer")
    hits = misses = issued = used = 0
    waiting: dict[int, set[int]] = {}  # target pos -> prefetched, not yet requested
    for t in range(trace.num_tokens):
        for pos in range(L):
            need = [(pos, int(e)) for e in trace.topk_ids[t, pos]]
            early = waiting.pop(pos, set())
            used += len(early & {e for _, e in need})
            # The engine's own access step (cache/state.py: ExpertCache.request), then the admissions.
            probs = trace.router_probs[t, pos].tolist() if policy == "score" else None
            present, missing = cache.request(pos, [e for _, e in need], probs)
            hits, misses = hits + len(present), misses + len(missing)
            for e in missing:
                cache.admit((pos, e), busy=need)
            if scores is None:
                continue
            for target, s in scores[pos].items():
                if target != pos + 1:
                    continue
                for e in rank(s[t], K, prefetch_per_layer or K):
                    key = (target, e)
                    if key not in cache and cache.can_admit(key, need):
                        cache.admit(key, busy=need)
                        waiting.setdefault(target, set()).add(e)
                        issued += 1
    requests = hits + misses
    return dict(hit_rate=hits / requests, hits=hits, misses=misses, prefetch_issued=issued, prefetch_used=used)


def report(trace, predictors: dict[str, Predictor], slots_per_layer: int, echo=print) -> dict:
    """Print per-layer accuracy and the hit-rate table; return the figures."""
    figures = {"accuracy": {}, "hit_rate": {}}
    echo(f"trace: {trace.num_tokens} tokens, {trace.num_layers} MoE layers, {trace.num_experts} experts, "
         f"top-{trace.top_k}; cache {slots_per_layer} slots per layer")
    echo("")
    echo(f"{'predictor':10} {'layer':>5} {'recall@k':>9} {'recall@2k':>10} {'prec@2k':>8}")
    scores = {}
    for name, predictor in predictors.items():
        rows = accuracy(predictor, trace)
        scores[name] = all_scores(predictor, trace)
        for r in rows:
            echo(f"{name:10} {r.target:5d} {r.recall_k:9.3f} {r.recall_2k:10.3f} {r.precision_2k:8.3f}")
        mean = lambda f: float(np.mean([getattr(r, f) for r in rows])) if rows else 0.0  # noqa: E731
        echo(f"{name:10} {'all':>5} {mean('recall_k'):9.3f} {mean('recall_2k'):10.3f} {mean('precision_2k'):8.3f}")
        figures["accuracy"][name] = {"recall_k": mean("recall_k"), "recall_2k": mean("recall_2k"),
                                     "precision_2k": mean("precision_2k")}
    echo("")
    header = f"{'policy':8} {'no prefetch':>12}" + "".join(f" {'+' + n:>12}" for n in predictors)
    echo("hit rate (decode, token by token):")
    echo(header)
    for policy in ("lru", "lfu", "score", "belady"):
        row = {"none": simulate(trace, policy, slots_per_layer)["hit_rate"]}
        if policy != "belady":  # Belady is the demand-fetching optimum; prefetch changes what it must foresee
            for name in predictors:
                row[name] = simulate(trace, policy, slots_per_layer, scores[name])["hit_rate"]
        figures["hit_rate"][policy] = row
        echo(f"{policy:8} {row['none']:12.3f}" + "".join(f" {row[n]:12.3f}" if n in row else f" {'-':>12}"
                                                       for n in predictors))
    return figures


def predictor_factory(name: str, trace, model=None):
    """`make(fit) -> Predictor` for one of PREDICTORS but "none", shaped for `trace`, fitted on `fit`
    where it learns (gate: `model`'s routers, nothing to fit)."""
    from .affinity import AffinityPredictor
    from .learned import LearnedPredictor
    from .routing import RoutingPredictor

    if name == "affinity":
        return lambda fit: AffinityPredictor(trace.num_layers, trace.num_experts,
                                             int(trace.token_ids.max()) + 1).fit(fit)
    if name == "routing":
        return lambda fit: RoutingPredictor(trace.num_layers, trace.num_experts, trace.top_k).fit(fit)
    if name == "learned":
        if trace.hidden is None:
            raise OffloadError("predictor 'learned' needs a trace recorded with --hidden")
        return LearnedPredictor.train
    if model is None or trace.hidden is None:
        raise OffloadError("predictor 'gate' needs --model (its routers) and a trace recorded with --hidden")
    from .gate import GatePredictor, routers_from_checkpoint

    gate = GatePredictor(routers_from_checkpoint(model))  # nothing to fit
    return lambda fit: gate
