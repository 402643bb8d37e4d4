"""Routing-only prediction (predictors/routing.py), calibration (predictors/calibrate.py) and
prefetching by expected gain (offload/prefetch.py, the simulator): on synthetic traces with known
structure and on the shipped ones. No torch model; the simulator's tok/s is modeled, not timed."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from offload.config import ModelConfig
from offload.errors import OffloadError
from offload.models import family_for
from offload.predictors.affinity import AffinityPredictor
from offload.predictors.calibrate import Calibration, Probabilities, calibrated_scores
from offload.predictors.evaluate import accuracy, predictor_factory
from offload.predictors.routing import RoutingPredictor, _decayed
from offload.predictors.trace import Trace, load_trace
from offload.prefetch import Costs, Evictions, Prefetcher, gain
from offload.profile import load_profile, shipped_profiles
from offload.simulate import load_shape, predictor_scores, simulate
from offload.stats import ExpertCounters

DATA = Path(__file__).parent / "data"


def trace_of(topk, experts, seq=64):
    n = len(topk)
    probs = np.zeros((n, topk.shape[1], experts), np.float32)
    np.put_along_axis(probs, topk, 1.0 / topk.shape[2], axis=2)
    return Trace(np.full(n, -1), topk, np.full(topk.shape, 1.0 / topk.shape[2], np.float32), probs,
                 np.arange(0, n, seq), None, {"has_token_ids": False})


def set_conditioned_trace(n, noise, experts=8, k=3, layers=3, seed=0):
    """Layer l+1's set is a fixed random function of layer l's whole set (but a `noise` share drawn
    at random): each single expert sits in many sets that lead anywhere, so it says little; the set
    says everything. No token ids, as in a routing log."""
    rng = np.random.default_rng(seed)
    sets = list(itertools.combinations(range(experts), k))
    maps = [{s: sets[rng.integers(len(sets))] for s in sets} for _ in range(layers - 1)]
    topk = np.zeros((n, layers, k), dtype=np.int64)
    for i in range(n):
        current = sets[rng.integers(len(sets))]
        topk[i, 0] = current
        for layer in range(1, layers):
            current = maps[layer - 1][current] if rng.random() >= noise else sets[rng.integers(len(sets))]
            topk[i, layer] = current
    return trace_of(topk, experts)


def mean_recall(predictor, trace):
    return float(np.mean([a.recall_k for a in accuracy(predictor, trace)]))


def test_routing_beats_affinity_where_the_whole_set_carries_the_signal():
    trace = set_conditioned_trace(4000, noise=0.1)
    fit, test = trace.split(0.5)
    routing = mean_recall(RoutingPredictor(3, 8, 3).fit(fit), test)
    affinity = mean_recall(AffinityPredictor(3, 8, 1).fit(fit), test)
    allowed = 0.9 + 0.1 * 3 / 8  # a random set still overlaps the true one by chance
    assert routing == pytest.approx(allowed, abs=0.05)
    assert routing > affinity + 0.2


@pytest.mark.parametrize("path", ["demo_trace", "switch_base_8_trace"])
def test_routing_beats_affinity_on_the_shipped_traces(path):
    trace = load_trace(DATA / path)
    fit, test = trace.split(0.5)
    routing = mean_recall(RoutingPredictor(trace.num_layers, trace.num_experts, trace.top_k).fit(fit), test)
    affinity = mean_recall(AffinityPredictor(trace.num_layers, trace.num_experts, 50_000).fit(fit), test)
    assert routing > affinity


def test_online_scores_are_the_replayed_ones():
    """The engine's path (scores, then observe, layer by layer) gives what replay gives a trace."""
    trace = load_trace(DATA / "demo_trace")
    fit, test = trace.split(0.5)
    predictor = RoutingPredictor(trace.num_layers, trace.num_experts, trace.top_k).fit(fit)
    replayed = predictor.replay(test)
    predictor.learn = False  # replay does not learn from what it scores
    for rows in test.sequences()[:2]:
        predictor.reset()
        for t in range(rows.start, rows.start + 40):
            for pos in range(test.num_layers):
                online = predictor.scores(pos, None, test.token_ids[t:t + 1], test.topk_ids[t:t + 1, pos])
                for target, s in online.items():
                    np.testing.assert_allclose(s[0], replayed[pos][target][t], atol=1e-12)
                predictor.observe(pos, test.token_ids[t:t + 1], test.topk_ids[t:t + 1, pos])


def test_online_learning_from_nothing_and_from_prefill_batches():
    trace = set_conditioned_trace(600, noise=0.0, k=2)
    predictor = RoutingPredictor(3, 8, 2)  # no fit: counts only from what it observes
    for start in range(0, 600, 20):
        rows = slice(start, start + 20)  # a prefill step of 20 tokens
        for pos in range(3):
            s = predictor.scores(pos, None, None, trace.topk_ids[rows, pos])
            assert set(s) == ({pos + 1} if pos < 2 else set())
            predictor.observe(pos, None, trace.topk_ids[rows, pos])
    assert mean_recall(predictor, trace) > 0.9  # the fixed set -> set map, learned online


def test_decayed_sums_restart_with_each_sequence():
    x = np.ones(300)
    y = _decayed(x, np.array([0, 200]), 0.5)
    assert y[0] == 0 and y[200] == 0 and y[1] == 1 and y[2] == pytest.approx(1.5)
    assert y[199] == pytest.approx(2.0) and y[201] == 1


def test_calibration_matches_the_held_out_rates():
    trace = load_trace(DATA / "demo_trace")
    fit, test = trace.split(0.5)
    scores = calibrated_scores(predictor_factory("affinity", trace), fit, test)
    assert isinstance(scores, Probabilities)
    p = np.concatenate([s.reshape(-1) for targets in scores.values() for s in targets.values()])
    chosen = np.concatenate([np.eye(8)[test.topk_ids[:, t]].sum(1).reshape(-1) for targets in scores.values()
                             for t in targets])
    assert p.mean() == pytest.approx(chosen.mean(), abs=0.02)  # as many expected as chosen
    for lo, hi in ((0.0, 0.2), (0.2, 0.6), (0.6, 1.01)):  # and where it says likely, likely
        inside = (p >= lo) & (p < hi)
        assert p[inside].mean() == pytest.approx(chosen[inside].mean(), abs=0.06)
    cal = Calibration(np.array([0.0, 1.0, 2.0]), np.array([0.1, 0.5, 0.9]), top_k=2)
    s = np.array([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # shares: 1.5, 0.5, 0, 0 and 0.5 each
    out = cal(s)
    assert out[0, 0] > out[0, 1] > out[0, 2] and np.allclose(out[1], out[1, 0])


def test_the_gain_rule():
    # free where the link has slack: any chance of a hit is worth it
    assert gain(0.1, fetch=1.0, miss=1.0, slack=2.0) > 0
    # beyond the slack, the overflow is paid right or wrong: a near-even trade is not taken
    assert gain(0.9, fetch=1.0, miss=1.0, slack=0.0) < 0
    assert gain(0.9, fetch=1.0, miss=3.0, slack=0.0) > 0
    # the expert it evicts counts against it
    assert gain(0.5, fetch=1.0, miss=1.0, slack=2.0, victim=0.5) < 0


class Fixed:
    needs_hidden = False

    def __init__(self, scores):
        self.values = np.array(scores, dtype=float)

    def scores(self, pos, hidden, token_ids, chosen):
        return {pos + 1: self.values[None]}

    def observe(self, pos, token_ids, chosen):
        pass


def test_prefetcher_by_gain_fetches_what_pays_and_learns_its_calibration_online():
    # p = 0.9, 0.6 for the two experts ranked; each fetch keeps the link 1 s, of which 1.5 s are
    # free this step; a miss costs 2 s
    prefetcher = Prefetcher(Fixed([0.9, 0.6, 0.2, 0.05]), top_k=2, limit=4, calibration=lambda s: s,
                            costs=Costs(fetch=1.0, miss=2.0, slack=1.5))
    assert prefetcher.active(1)
    # expert 0 fits the slack; expert 1: 0.6 x 2 s saved > 1.25 x 0.5 s beyond it
    assert prefetcher.plan(0, None, None, np.array([[0, 1]])) == {1: [0, 1]}
    counters = ExpertCounters()
    for _ in range(40):  # neither comes: the layer's probabilities are scaled down
        prefetcher.candidates(1, [0, 1], {0: 0.9, 1: 0.6})
        prefetcher.settle(1, {3}, set(), counters)
    assert prefetcher.reliability(1) < 0.1
    assert prefetcher.plan(0, None, None, np.array([[0, 1]])) == {1: [0]}  # what is free still goes
    with pytest.raises(ValueError):
        Costs(fetch=-1.0, miss=1.0)


def test_evictions_price_one_more_admission_by_what_early_evictions_cost():
    tier = Evictions(capacity=4, per_layer=False, prior=1.0)
    assert tier.seconds() == pytest.approx(4 * 1.0 / 2)  # nothing settled: cautious
    for i in range(20):  # evicted, then wanted back before the next admission: each costs 0.5 s
        tier.admitted((0, i), evicted=(0, 100 + i))
        tier.requested((0, 100 + i), 0.5)
    for i in range(20):  # evicted, never wanted again
        tier.admitted((1, i), evicted=(1, 100 + i))
    tier.admitted((2, 0))
    assert tier.settled == 40
    assert tier.seconds() == pytest.approx(4 * (20 * 0.5 + 1.0) / 42)


def top1_shape() -> ModelConfig:
    """Mixtral-8x7B's sizes routing top-1 of 8 experts: switch-base-8's routing shape."""
    raw = json.loads((Path(__file__).parents[1] / "offload" / "shapes" / "mixtral-8x7b.json").read_text())
    raw = {**raw, "num_experts_per_tok": 1}
    return ModelConfig.from_dict(raw, family_for(raw))


@pytest.mark.parametrize("path", ["demo_trace", "switch_base_8_trace"])
def test_prefetching_by_gain_is_never_slower_than_none_on_the_shipped_traces(path):
    trace = load_trace(DATA / path)
    cfg = load_shape("mixtral-8x7b") if trace.top_k == 2 else top1_shape()
    fit, test = trace.split(0.5)
    scores = {name: predictor_scores(name, fit, test) for name in ("affinity", "routing")}
    for profile in shipped_profiles():
        hw = load_profile(profile)
        none = simulate(test, hw, cfg, "lru", None, max_tokens=96).tokens_per_second
        for name, s in scores.items():
            ahead = simulate(test, hw, cfg, "lru", s, max_tokens=96)
            assert ahead.tokens_per_second >= none, (profile, name)
    # ... where fetching the predicted top-k every step is slower on some profile
    topk = predictor_scores("routing:topk", fit, test)
    assert any(simulate(test, load_profile(p), cfg, "lru", topk, max_tokens=96).tokens_per_second
               < simulate(test, load_profile(p), cfg, "lru", None, max_tokens=96).tokens_per_second
               for p in shipped_profiles())


def test_predictor_names_for_the_simulator():
    trace = load_trace(DATA / "switch_base_8_trace")
    fit, test = trace.split(0.5)
    assert predictor_scores("none", fit, test) is None
    assert isinstance(predictor_scores("routing", fit, test), Probabilities)
    plain = predictor_scores("affinity:topk", fit, test)
    assert not isinstance(plain, Probabilities) and set(plain) == set(range(trace.num_layers))
    with pytest.raises(OffloadError, match="unknown predictor 'routing:all'"):
        predictor_scores("routing:all", fit, test)
    with pytest.raises(OffloadError, match="needs a trace recorded with --hidden"):
        predictor_scores("learned", fit, test)


@pytest.mark.parametrize("by_gain", [False, True])
def test_engine_runs_the_routing_predictor_online_and_keeps_outputs(model_dir, by_gain):
    """In the engine (as api.Runtime would build it with predictor='routing'): learned online from
    nothing, with the precision switch or by gain with fixed costs; the tokens are the resident run's."""
    import offload

    path = model_dir("mixtral", num_hidden_layers=4, num_local_experts=8)
    resident = offload.load(path, device="cpu")
    prompt = [1, 30, 31, 32, 33]
    expected = resident.generate(prompt, max_new_tokens=30).token_ids
    llm = offload.load(path, device="cpu", cpu_memory=8 * resident.placement.expert_bytes, predictor="affinity")
    options = {"calibration": lambda s: s, "costs": Costs(fetch=1.0, miss=1.0, slack=4.0)} if by_gain else {}
    predictor = RoutingPredictor(4, 8, 2)
    llm.experts.prefetch = Prefetcher(predictor, top_k=2, limit=2, **options)
    assert llm.generate(prompt, max_new_tokens=30).token_ids == expected
    assert predictor.tokens.sum() > 0  # it ran, and learned
    assert llm.stats.prefetch_issued > 0 and llm.stats.prefetch_used > 0


def test_the_runtime_prefetches_with_routing_online_and_stays_exact(model_dir):
    """predictor="routing" in offload.load: learned online from the run's own routing, bit-identical output."""
    import torch

    import offload
    from test_offload import budget, check_matches_resident

    path = model_dir("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    llm = check_matches_resident(path, ids, cpu_memory=budget(path, 6)[0], predictor="routing")
    assert sum(c.prefetch_issued for c in llm.stats.experts.layers.values()) > 0
    assert offload.load(path, device="cpu", predictor="routing").describe()  # resident: nothing to prefetch


def test_the_link_clock_measures_fetch_time_and_slack():
    """Fetch: the median read; slack: the step's time the I/O threads left idle (none where reads take a
    core from the compute: spare_core=False)."""
    from offload.prefetch import LinkClock

    for spare_core, expected in ((True, 0.2 * 0.6), (False, 0.0)):
        clock = LinkClock(io_threads=1, smoothing=0.2, spare_core=spare_core)
        clock.costs(now=10.0)  # the first step begins
        clock.span(10.0, 10.2)
        clock.span(10.3, 10.5)  # 0.4 s busy in a 1 s step: 0.6 s idle
        clock.span(10.35, 10.45)  # beside another read: the link was busy anyway
        costs = clock.costs(now=11.0)
        assert abs(costs.fetch - 0.2) < 1e-9 and costs.miss == costs.fetch  # the median of 0.2, 0.2, 0.1
        assert abs(costs.slack - expected) < 1e-9


def test_with_yielding_reads_the_slack_is_the_time_no_demand_read_runs_and_cpu_time_is_charged():
    """Speculative reads that yield (cache/priority.py) fill the idle time: they neither count as
    busy nor shorten the slack; with no spare core their CPU seconds are a cost instead."""
    from offload.prefetch import LinkClock, gain_of

    for spare_core, cpu in ((True, 0.0), (False, 0.05)):
        clock = LinkClock(io_threads=1, smoothing=0.2, spare_core=spare_core, yielding=True, chunk_fraction=0.25)
        clock.costs(now=10.0)
        clock.span(10.0, 10.2, cpu=0.05)
        clock.span(10.3, 10.5, cpu=0.05)  # demand reads: 0.4 s busy in a 1 s step
        clock.span(10.5, 10.9, cpu=0.2, demand=False)  # a guess in the gap: idle time, not busy time
        costs = clock.costs(now=11.0)
        assert abs(costs.slack - 0.2 * 0.6) < 1e-9 and abs(costs.fetch - 0.2) < 1e-9
        assert costs.yielding and abs(costs.cpu - cpu) < 1e-9 and abs(costs.chunk - 0.05) < 1e-9
        # A sure guess saves the part read ahead (slack / fetch of its miss) and costs no more than that.
        assert abs(gain_of(1.0, costs) - 0.2 * (0.12 / 0.2)) < 1e-9
        # A coin toss pays only where its wasted half (CPU of the part read, one chunk) costs less.
        expected = 0.5 * 0.2 * 0.6 - 1.25 * 0.5 * (cpu * 0.6 + 0.05)
        assert abs(gain_of(0.5, costs) - expected) < 1e-9


def test_no_prediction_is_made_where_not_even_a_sure_guess_pays():
    """The gain rule with no slack: a right guess saves one fetch and costs 1.25: the predictor is not
    even asked (its cost matters: the routing predictor's features and online counts)."""
    import numpy as np

    from offload.prefetch import Costs, Prefetcher

    class Counting:
        needs_hidden = False

        def __init__(self):
            self.scored = self.observed = 0

        def scores(self, pos, hidden, tokens, chosen):
            self.scored += 1
            return {pos + 1: np.full((1, 4), 0.9)}

        def observe(self, pos, tokens, chosen):
            self.observed += 1

    predictor = Counting()
    prefetcher = Prefetcher(predictor, top_k=2, limit=2, calibration=lambda s: s, costs=Costs(fetch=0.01, miss=0.01))
    assert prefetcher.plan(0, None, None, np.array([[0, 1]])) == {}
    assert (predictor.scored, predictor.observed) == (0, 0)
    prefetcher.costs = Costs(fetch=0.01, miss=0.01, slack=0.05)  # idle link: a likely guess pays
    assert prefetcher.plan(0, None, None, np.array([[0, 1]])) == {1: [0, 1]}
    assert predictor.scored == 1


def test_a_predictor_that_costs_more_than_its_guesses_save_runs_only_to_probe(monkeypatch):
    """Timed (a live run): each call's seconds against the gain its kept guesses expect. A slow
    predictor with small gains runs every PROBE_EVERY-th step only; a fast one every step."""
    import numpy as np

    import offload.prefetch as prefetch
    from offload.prefetch import PROBE_EVERY, Costs, Prefetcher

    clock = [0.0]
    monkeypatch.setattr(prefetch.time, "perf_counter", lambda: clock[0])

    class Slow:
        needs_hidden = False

        def __init__(self, seconds):
            self.seconds, self.scored = seconds, 0

        def scores(self, pos, hidden, tokens, chosen):
            self.scored += 1
            clock[0] += self.seconds  # the call's own time, on the fake clock
            return {pos + 1: np.full((1, 4), 0.9)}

        def observe(self, pos, tokens, chosen):
            pass

    costs = Costs(fetch=0.01, miss=0.01, slack=0.05)  # a sure guess saves 10 ms; these ones about 9 ms each
    for seconds, runs in ((0.050, 1 + 64 // PROBE_EVERY), (0.001, 65)):
        predictor = Slow(seconds)
        prefetcher = Prefetcher(predictor, top_k=2, limit=2, calibration=lambda s: s, costs=costs, timed=True)
        for _ in range(65):
            prefetcher.plan(0, None, None, np.array([[0, 1]]))
        assert predictor.scored == runs
    untimed = Slow(0.050)
    prefetcher = Prefetcher(untimed, top_k=2, limit=2, calibration=lambda s: s, costs=costs)
    for _ in range(10):
        prefetcher.plan(0, None, None, np.array([[0, 1]]))
    assert untimed.scored == 10


@pytest.mark.parametrize("on, off, keeps", [(0.9, 1.0, True), (1.0, 0.9, False), (1.0, 1.0, False)])
def test_a_trial_keeps_prefetching_only_while_it_measures_faster(on, off, keeps):
    """Blocks of 8 decode steps alternate until each mode has 24 step times; then the faster one runs
    (prefetching only if 1% faster), with one block of the other every 64 steps; prefill interrupts."""
    from offload.prefetch import Trial

    trial, now, modes = Trial(), 0.0, []
    for i in range(400):
        if i == 100:  # a prefill between two generations: its time is no decode step's
            trial.interrupt()
            now += 50.0
        trial.step(now)
        modes.append(trial.on)
        now += on if trial.on else off
    assert modes[:48] == ([True] * 8 + [False] * 8) * 3  # exploring
    later = modes[100:]
    assert later.count(keeps) > 0.8 * len(later) and later.count(not keeps) > 0  # chosen, still checked
    assert max(trial.times[True]) < 2 and max(trial.times[False]) < 2  # the prefill's 50 s never counted


def test_the_link_clock_keeps_a_bounded_record_where_nothing_asks_for_costs():
    from offload.prefetch import LinkClock

    clock = LinkClock(io_threads=2)
    for i in range(10_000):  # a long run without prefetch by gain: costs() is never called
        clock.span(float(i), i + 0.5)
    assert len(clock.busy) <= 256 and len(clock.reads) <= 32


def test_timing_applies_only_with_the_gain_rule_and_its_costs():
    """Without costs there is no expected gain to weigh: a timed prefetcher predicts every step."""
    import numpy as np

    from offload.prefetch import Prefetcher

    class Counting:
        needs_hidden = False
        scored = 0

        def scores(self, pos, hidden, tokens, chosen):
            self.scored += 1
            return {pos + 1: np.full((1, 4), 0.9)}

        def observe(self, pos, tokens, chosen):
            pass

    predictor = Counting()
    prefetcher = Prefetcher(predictor, top_k=2, limit=2, timed=True)
    for _ in range(40):
        prefetcher.plan(0, None, None, np.array([[0, 1]]))
    assert predictor.scored == 40
