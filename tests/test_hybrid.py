"""The tiered engine (host tier between disk and compute slots, as on a GPU) and
experts computed on the CPU from the host tier: exact whatever is decided.
On this CPU-only machine the "device" slots are RAM too, so the arithmetic is
identical and outputs are bit-exact; only the CUDA stream/event ordering is
left to the gpu-marked tests."""

import dataclasses

import pytest
import torch

import offload
from offload.engine import OffloadedExperts

PROMPT = [1, 30, 31, 32, 33, 34]


def tiered(llm, device_slots, host_slots, decide=None):
    placement = dataclasses.replace(llm.placement, mode="offloaded", device_slots=device_slots,
                                    host_slots=host_slots)
    llm.stats.experts.reset()
    engine = OffloadedExperts(llm.checkpoint, placement, llm.device, llm.expert_format, "lru", "layer",
                              llm.stats.experts, decide=decide)
    llm.model.set_executor(engine)
    llm.experts = engine
    return llm


@pytest.fixture
def pair(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    return offload.load(path, device="cpu"), offload.load(path, device="cpu")


def run(llm, ids):
    return llm.logits(ids), llm.generate(PROMPT, max_new_tokens=12).token_ids


@pytest.mark.parametrize("host_slots", [8, 24])  # a third of the experts, or all of them
@pytest.mark.parametrize("decide", ["fetch", "cpu", "mixed"])
def test_every_decision_matches_resident(pair, host_slots, decide):
    resident, llm = pair
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(8))
    expected = run(resident, ids)
    rule = {"fetch": lambda w: "fetch", "cpu": lambda w: "cpu",
            "mixed": lambda w: "cpu" if w.expert % 2 else "fetch"}[decide]
    tiered(llm, device_slots=6, host_slots=host_slots, decide=lambda work: {w.expert: rule(w) for w in work})
    logits, tokens = run(llm, ids)
    assert torch.equal(logits, expected[0]) and tokens == expected[1]
    stats = llm.stats
    assert stats.misses > 0 and stats.bytes_from_disk > 0
    if decide == "fetch":
        assert stats.experts_on_cpu == 0 and stats.bytes_to_device > 0
    elif decide == "cpu" and host_slots == 24:
        assert stats.experts_on_cpu == stats.misses and stats.bytes_to_device == 0
    elif decide == "cpu":  # 8 host slots cannot hold a prefill's experts at once: the rest are fetched
        assert 0 < stats.experts_on_cpu < stats.misses
    else:
        assert 0 < stats.experts_on_cpu < stats.misses and stats.bytes_to_device > 0
    if host_slots == 24:  # the host tier holds everything: each expert is read from disk once at most
        assert stats.bytes_from_disk <= 24 * llm.placement.expert_bytes
    llm.close()


def test_the_decision_sees_token_counts_and_where_weights_are(pair):
    _, llm = pair
    seen = []

    def decide(work):
        seen.extend(work)
        return {w.expert: "fetch" for w in work}

    tiered(llm, device_slots=6, host_slots=24, decide=decide)
    llm.logits(torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(9)))  # prefill
    assert any(w.tokens > 1 for w in seen) and {w.where for w in seen} == {"disk"}
    seen.clear()
    llm.generate(PROMPT, max_new_tokens=8)
    assert any(w.where == "host" for w in seen)  # evicted from the slots, still in host RAM
    llm.close()


def test_wrong_prefetches_still_in_flight_never_block_a_layer(pair, monkeypatch):
    """Every slot of a layer taken by slow, wrong prefetches: the layer waits for them, then evicts them."""
    import time

    import numpy as np

    from offload.predictors.base import Predictor
    from offload.prefetch import Prefetcher

    class Wrong(Predictor):  # predicts the two experts the next layer is least likely to use
        def scores(self, pos, hidden, token_ids, chosen):
            return {pos + 1: -np.asarray(chosen.shape[0] * [np.arange(8.0)])} if pos + 1 < 3 else {}

    resident, llm = pair
    expected = resident.generate(PROMPT, max_new_tokens=16).token_ids
    placement = dataclasses.replace(llm.placement, mode="offloaded", device_slots=6, host_slots=0)
    llm.stats.experts.reset()
    engine = OffloadedExperts(llm.checkpoint, placement, llm.device, llm.expert_format, "lru", "layer", llm.stats.experts,
                              prefetch=Prefetcher(Wrong(), top_k=2, limit=2, threshold=0.0))
    slow_read = engine.reader.read

    def read(*args):
        time.sleep(0.01)  # prefetches are still running when their target layer starts
        return slow_read(*args)

    monkeypatch.setattr(engine.reader, "read", read)
    llm.model.set_executor(engine)
    llm.experts = engine
    assert llm.generate(PROMPT, max_new_tokens=16).token_ids == expected
    assert llm.stats.prefetch_issued > 0 and llm.stats.prefetch_wasted > 0
    llm.close()


def test_scheduler_sends_decode_misses_to_the_cpu_and_prefill_to_the_device(pair):
    from offload.profile import load_profile
    from offload.scheduler import CostModel, decider

    resident, llm = pair
    prompt = list(range(1, 101))  # prefill: about 25 tokens per expert
    expected = resident.generate(prompt, max_new_tokens=12).token_ids
    cfg = llm.config
    # rtx3060 profile, fp32 weights: per expert, CPU time 6HIn / min(240, 30n) GFLOP/s against a copy
    # of 12HI bytes at 25 GB/s: the CPU wins below n = 20 tokens, the copy above.
    cost = CostModel(load_profile("rtx3060-12g"), cfg.hidden_size, cfg.moe_intermediate_size, weight_bytes=4)
    decisions = []

    def decide(work):
        plan = decider(cost)(work)
        decisions.extend((w.tokens, plan[w.expert]) for w in work)
        return plan

    tiered(llm, device_slots=6, host_slots=24, decide=decide)
    assert llm.generate(prompt, max_new_tokens=12).token_ids == expected
    assert any(action == "cpu" for tokens, action in decisions if tokens == 1)  # decode: move activations
    assert any(action == "fetch" for tokens, action in decisions if tokens >= 20)  # prefill: move weights
    assert llm.stats.experts_on_cpu > 0 and llm.stats.bytes_to_device > 0
    llm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_with_cpu_experts_matches_resident(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    resident = offload.load(path, device="cuda")
    per_expert = resident.placement.expert_bytes
    llm = offload.load(path, device="cuda", gpu_memory=resident.placement.resident_bytes + 6 * per_expert,
                       cpu_memory=24 * per_expert, profile="rtx3060-12g")
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(10))
    # CPU and GPU kernels round differently: close, not bit-equal
    assert (llm.logits(ids) - resident.logits(ids)).abs().max().item() <= 1e-4
    assert llm.generate(PROMPT, max_new_tokens=12).token_ids == resident.generate(PROMPT, max_new_tokens=12).token_ids
    assert llm.stats.experts_on_cpu > 0
    assert "computed on the CPU, whichever profile rtx3060-12g's cost model" in llm.describe()


def test_describe_says_when_a_profile_has_nothing_to_decide(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    llm = offload.load(path, device="cpu", profile="colab-t4")
    assert llm.describe().endswith("profile colab-t4 unused: nothing is missed")
    per_expert = llm.placement.expert_bytes
    llm = offload.load(path, device="cpu", cpu_memory=8 * per_expert, profile="colab-t4")
    assert "profile colab-t4 unused: on a CPU every expert is computed on the CPU" in llm.describe()

