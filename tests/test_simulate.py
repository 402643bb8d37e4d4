"""The simulator replays traces through the real caches, predictors and scheduler."""

import numpy as np
import pytest

import offload.simulate as sim
from offload.errors import OffloadError
from offload.predictors.affinity import AffinityPredictor
from offload.predictors.evaluate import all_scores
from offload.profile import load_profile
from offload.simulate import Shape, simulate
from test_predictors import chained_trace

# A Mixtral-like routing shape (8 experts, top-2) at a size where the budgets below matter.
SHAPE = Shape("test", hidden=1024, intermediate=3584, layers=6, experts=8, top_k=2, other_params=100_000_000)
MB = 1 << 20


def test_more_memory_is_faster_and_the_cpu_helps_decode_on_a_fast_cpu():
    trace = chained_trace(300, 0.2)
    hw = load_profile("rtx4090-24g")
    small = simulate(trace, hw, SHAPE, gpu_memory=400 * MB, cpu_memory=8000 * MB, cpu=False)
    large = simulate(trace, hw, SHAPE, gpu_memory=800 * MB, cpu_memory=8000 * MB, cpu=False)
    assert large.hit_rate > small.hit_rate and large.tokens_per_second > small.tokens_per_second
    hybrid = simulate(trace, hw, SHAPE, gpu_memory=400 * MB, cpu_memory=8000 * MB, cpu=True)
    assert hybrid.cpu_share > 0 and hybrid.tokens_per_second > small.tokens_per_second


def test_a_good_predictor_raises_the_hit_rate(monkeypatch):
    fit, test = chained_trace(600, 0.05).split(0.5)
    scores = all_scores(AffinityPredictor(3, 8, 5000).fit(fit), test)
    shape = Shape("t", 1024, 3584, 3, 8, 2, 100_000_000)  # as many layers as the trace: no wrap-around
    hw = load_profile("cpu-only")
    plain = simulate(test, hw, shape, cpu_memory=shape.other_params * 2 + 9 * int(shape.expert_bytes))
    ahead = simulate(test, hw, shape, cpu_memory=shape.other_params * 2 + 9 * int(shape.expert_bytes),
                     scores=scores)
    assert ahead.prefetch_issued > 0 and ahead.prefetch_used > 0.5 * ahead.prefetch_issued
    assert ahead.hit_rate > plain.hit_rate


def test_every_decision_comes_from_the_engine_scheduler(monkeypatch):
    calls = []
    real = sim.schedule

    def spy(work, cost, allow_cpu=True, search="auto"):
        calls.append(len(work))
        return real(work, cost, allow_cpu, search)

    monkeypatch.setattr(sim, "schedule", spy)
    trace = chained_trace(20, 0.0)
    simulate(trace, load_profile("rtx3060-12g"), SHAPE, gpu_memory=500 * MB, cpu_memory=4000 * MB)
    assert len(calls) == 20 * SHAPE.layers and set(calls) == {2}


def test_mismatched_routing_shape_is_a_clear_error():
    trace = chained_trace(10, 0.0)
    with pytest.raises(OffloadError, match="top-2 of 8 experts but qwen3-30b-a3b uses top-8 of 128"):
        simulate(trace, load_profile("colab-t4"), sim.SHAPES["qwen3-30b-a3b"])
    assert np.isfinite(sim.SHAPES["mixtral-8x7b"].expert_bytes)
