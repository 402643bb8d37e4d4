"""The simulator replays traces through the real caches, predictors and scheduler."""

import pytest
import torch

import offload.simulate as sim
from offload.errors import OffloadError
from offload.predictors.affinity import AffinityPredictor
from offload.predictors.evaluate import all_scores
from offload.profile import load_profile
import offload
from offload.config import ModelConfig
from offload.models import family_for
from offload.simulate import load_shape, simulate
from test_predictors import chained_trace


def shape(layers):
    """A Mixtral-like routing shape (8 experts, top-2, bf16) at a size where the budgets below matter."""
    raw = dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=1024, intermediate_size=3584,
               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
               num_experts_per_tok=2, torch_dtype="bfloat16")
    return ModelConfig.from_dict(raw, family_for(raw))


SHAPE = shape(6)
EXPERT = 3 * 1024 * 3584 * 2  # bytes of one bf16 expert
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
    three = shape(3)  # as many layers as the trace: no wrap-around
    hw = load_profile("cpu-only")
    plain = simulate(test, hw, three, cpu_memory=9 * EXPERT)
    ahead = simulate(test, hw, three, cpu_memory=9 * EXPERT, scores=scores)
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
    assert len(calls) == 20 * len(SHAPE.moe_layers) and set(calls) == {2}


def test_mismatched_routing_shape_is_a_clear_error():
    trace = chained_trace(10, 0.0)
    with pytest.raises(OffloadError, match="top-2 of 8 experts but the model uses top-8 of 128"):
        simulate(trace, load_profile("colab-t4"), load_shape("qwen3-30b-a3b"))
    with pytest.raises(OffloadError, match="unknown shape 'mixtral'; choose one of mixtral-8x7b, qwen1.5"):
        load_shape("mixtral")


@pytest.mark.parametrize("name, billions", [("mixtral-8x7b", 46.7), ("qwen1.5-moe-a2.7b", 14.3),
                                            ("qwen3-30b-a3b", 30.5)])
def test_shipped_shapes_have_the_published_parameter_counts(name, billions):
    cfg = load_shape(name)
    result = simulate(chained_trace(4, 0.0), load_profile("cpu-only"), cfg) if cfg.num_experts == 8 else None
    from offload.placement import expert_bytes, resident_bytes

    params = (resident_bytes(cfg, torch.bfloat16) + expert_bytes(cfg, torch.bfloat16) * len(cfg.moe_layers)
              * cfg.num_experts) / 2
    assert params / 1e9 == pytest.approx(billions, abs=0.05)
    if result is not None:
        assert result.tokens_per_second > 0


def test_the_simulator_places_experts_as_the_runtime_does(model_dir):
    """Same budget, same plan: the simulator calls the runtime's own placement."""
    path = model_dir("mixtral", num_hidden_layers=3, num_local_experts=8)
    cfg = load_shape(str(path))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # fp32 checkpoint
    for slots in (5, 9):  # 5: below top_k per layer, so "auto" makes one global pool
        llm = offload.load(path, device="cpu", cpu_memory=slots * per_expert)
        trace = chained_trace(5, 0.0)
        ours = simulate(trace, load_profile("cpu-only"), cfg, cpu_memory=slots * per_expert).placement
        assert ours == llm.placement
        llm.close()


def test_mixtral_in_fp16_on_a_t4_takes_a_global_pool():
    """45 GB of experts beside a 15 GB budget: every layer cannot hold top_k, so the layers share slots."""
    result = simulate(chained_trace(8, 0.0), load_profile("colab-t4"), load_shape("mixtral-8x7b"))
    p = result.placement
    assert p.split == "global" and 2 <= p.device_slots < 2 * 32 and result.tokens_per_second > 0


def test_cli_table_names_the_fastest_configuration_per_profile():
    from pathlib import Path

    from click.testing import CliRunner

    from offload.cli import main
    from offload.profile import shipped_profiles

    trace = Path(__file__).parent / "data" / "demo_trace"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--shape", "mixtral-8x7b", "--table",
                                       "--tokens", "6"])
    assert result.exit_code == 0, result.output
    summary = result.output.split("fastest modeled per profile")[1].splitlines()[1:]
    assert [line.split()[0] for line in summary] == shipped_profiles()
    for line in summary:
        speed, base = float(line.split(" tok/s")[0].split()[-1]), float(line.split("baseline ")[1].split(",")[0])
        assert speed >= base > 0  # the baseline is one of the configurations swept


def test_resident_placement_starts_loaded_and_prompts_are_one_prefill_step():
    trace = chained_trace(128, 0.1)  # two sequences of 64 tokens
    hw = load_profile("cpu-only")
    resident = simulate(trace, hw, SHAPE)  # 23 GiB of RAM holds this shape whole
    assert resident.placement.mode == "resident"
    assert resident.hit_rate == 1.0 and resident.disk_bytes_per_token == 0
    offloaded = simulate(trace, hw, SHAPE, cpu_memory=20 * EXPERT, prompt_tokens=32)
    per_token = simulate(trace, hw, SHAPE, cpu_memory=20 * EXPERT)
    # 32 prompt tokens in one step cost less than 32 decode steps, and warm the cache
    assert 0 < offloaded.prefill_seconds < 32 / per_token.tokens_per_second
    assert offloaded.hit_rate > 0


def test_prefill_fetches_what_decode_computes_on_the_cpu():
    """Same experts, same machine: one token per expert goes to the CPU, a prompt's many are fetched."""
    trace = chained_trace(64, 0.0)
    hw = load_profile("rtx3060-12g")
    decode = simulate(trace, hw, SHAPE, gpu_memory=500 * MB, cpu_memory=4000 * MB)
    assert decode.cpu_share > 0.5
    import offload.simulate as module

    seen = []
    real = module.schedule

    def spy(work, cost, allow_cpu=True, search="auto"):
        plan = real(work, cost, allow_cpu, search)
        seen.extend((w.tokens, plan.assignment[w.expert]) for w in work if w.where != "device")
        return plan

    module.schedule = spy
    try:
        simulate(trace, hw, SHAPE, gpu_memory=500 * MB, cpu_memory=4000 * MB, prompt_tokens=60)
    finally:
        module.schedule = real
    busy = [action for tokens, action in seen if tokens >= 10]  # prompt experts with many tokens
    assert busy and all(action == "fetch" for action in busy)
    assert [action for tokens, action in seen if tokens == 1].count("cpu") > 0
