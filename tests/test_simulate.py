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
from offload.scheduler import ExpertWork
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
    with pytest.raises(OffloadError, match="unknown shape 'mixtral'; choose one of deepseek-v2-lite, deepseek-v3, gpt-oss-120b, "
                       "gpt-oss-20b, mixtral-8x7b, qwen1.5"):
        load_shape("mixtral")


@pytest.mark.parametrize("name, billions", [("mixtral-8x7b", 46.7), ("qwen1.5-moe-a2.7b", 14.3),
                                            ("qwen3-30b-a3b", 30.5), ("deepseek-v2-lite", 15.7),
                                            ("deepseek-v3", 671.0), ("gpt-oss-20b", 20.91),
                                            ("gpt-oss-120b", 116.83)])
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


# ---- quantized experts -------------------------------------------------------------------------

def test_int4_holds_more_experts_in_the_same_memory_and_is_faster():
    from offload.placement import expert_format

    trace = chained_trace(200, 0.2)
    hw = load_profile("rtx3060-12g")
    dense = simulate(trace, hw, SHAPE, gpu_memory=500 * MB, cpu_memory=4000 * MB)
    int4 = simulate(trace, hw, SHAPE, gpu_memory=500 * MB, cpu_memory=4000 * MB, experts="int4")
    size = expert_format(SHAPE, torch.bfloat16, "int4").nbytes  # 0.625 bytes per weight with its scales
    assert (dense.placement.expert_format, int4.placement.expert_format) == ("bf16", "int4-g32")
    assert (dense.placement.expert_bytes, int4.placement.expert_bytes) == (EXPERT, size)
    assert int4.placement.device_slots >= 3 * dense.placement.device_slots > 0
    assert int4.hit_rate > dense.hit_rate and int4.tokens_per_second > dense.tokens_per_second


@pytest.mark.parametrize("profile", ["cpu-only", "rtx3060-12g"])
def test_the_same_slots_in_int4_move_the_formats_bytes(profile):
    """Slot for slot the routing replays alike; every byte read or copied shrinks by the format's ratio."""
    from offload.placement import expert_format, resident_bytes

    trace = chained_trace(100, 0.2)
    hw = load_profile(profile)
    runs = {}
    for experts in ("bf16", "int8", "int4-g128"):
        size = expert_format(SHAPE, torch.bfloat16, experts).nbytes
        gpu = None if hw.device == "cpu" else resident_bytes(SHAPE, torch.bfloat16) + 6 * size  # 6 GPU slots
        runs[experts] = (size, simulate(trace, hw, SHAPE, gpu_memory=gpu, cpu_memory=24 * size, cpu=False,
                                        experts=experts))
    base_size, base = runs["bf16"]
    for experts, (size, r) in runs.items():
        p = r.placement
        assert (p.device_slots, p.host_slots) == (base.placement.device_slots, base.placement.host_slots)
        assert r.hit_rate == base.hit_rate and r.disk_bytes_per_token > 0
        assert r.disk_bytes_per_token == pytest.approx(base.disk_bytes_per_token * size / base_size)
        assert r.link_bytes_per_token == pytest.approx(base.link_bytes_per_token * size / base_size)
    assert runs["int4-g128"][1].tokens_per_second > runs["int8"][1].tokens_per_second > base.tokens_per_second


def test_cpu_batch_1_speed_scales_with_bytes_once():
    """A bf16 profile's CPU figure speeds up by the bytes a format saves; a profile measured on the
    format itself (cpu_weight_bytes) is taken as it is; the batch roof caps both."""
    import dataclasses

    from offload.scheduler import CostModel

    hw = load_profile("rtx3060-12g")
    bf16, int4 = (CostModel(hw, 1024, 3584, weight_bytes=w) for w in (2.0, 0.5))
    assert int4.cpu_compute(1) == pytest.approx(bf16.cpu_compute(1) / 4)
    assert int4.cpu_compute(256) == pytest.approx(bf16.cpu_compute(256))  # both at cpu_gflops_batch
    assert int4.device_compute(1) == bf16.device_compute(1)  # the GPU dequantizes: no faster than dense
    assert int4.transfer(ExpertWork(0, 1, "host")) == pytest.approx(bf16.transfer(ExpertWork(0, 1, "host")) / 4)
    measured_int4 = dataclasses.replace(hw, cpu_weight_bytes=0.5)
    assert CostModel(measured_int4, 1024, 3584, weight_bytes=0.5).cpu_compute(1) == pytest.approx(
        bf16.cpu_compute(1))


def test_the_simulator_places_quantized_experts_as_the_runtime_does(model_dir, tmp_path):
    from offload.placement import expert_format
    from offload.quantize import quantize_model

    src = model_dir("mixtral", hidden_size=64, intermediate_size=64, num_local_experts=8)  # as test_quantized
    path = str(quantize_model(src, tmp_path / "int4", "int4", progress=False))
    cfg = load_shape(path)
    stored = sim.shape_format(path)  # what the shape's config.json says, as `load` reads it
    assert stored.name == "int4-g32" and not sim.shape_format(str(src)).quantized
    assert sim.shape_format(str(src), "int4") == stored and sim.shape_format(path, "int8").name == "int8"
    per_expert = expert_format(cfg, torch.float32, "int4-g32").nbytes
    assert per_expert < 3 * 64 * 64 * 4 / 4  # scales included, still under a quarter of fp32
    for slots in (3, 9):  # 3: below top_k per layer, so "auto" makes one global pool
        llm = offload.load(path, device="cpu", cpu_memory=slots * per_expert)
        ours = simulate(chained_trace(5, 0.0), load_profile("cpu-only"), cfg, cpu_memory=slots * per_expert,
                        experts=stored).placement
        assert ours == llm.placement and ours.expert_format == "int4-g32"
        llm.close()


def test_cli_experts_flag():
    from pathlib import Path

    from click.testing import CliRunner

    from offload.cli import main

    trace = Path(__file__).parent / "data" / "demo_trace"
    args = ["simulate", "--trace", str(trace), "--shape", "mixtral-8x7b", "--profile", "rtx3060-12g", "--tokens", "6"]
    slots = {}
    for experts, name in (("bf16", "unquantized"), ("int4", "int4-g32")):
        result = CliRunner().invoke(main, args + ["--experts", experts])
        assert result.exit_code == 0, result.output
        assert f"{name} experts" in result.output.splitlines()[0]
        slots[experts] = int(result.output.splitlines()[-1].split()[-2].split("/")[0])
    assert slots["int4"] > 2 * slots["bf16"]  # 24 bf16 slots in one pool; int4 fills 2 per layer
    result = CliRunner().invoke(main, args + ["--experts", "int3", "--table"])
    assert result.exit_code != 0 and "is not a format; use int8, int4" in result.output


def test_gpt_oss_is_simulated_in_mxfp4_as_shipped_and_never_on_the_cpu():
    """The shape's own format by default (MXFP4, read as released); like the runtime, no CPU experts
    for a format the CPU would dequantize on every call, while int4 (a weight-only kernel) may use them."""
    import numpy as np

    from offload.predictors.trace import Trace

    rng = np.random.default_rng(0)
    topk = np.stack([np.stack([rng.choice(32, 4, replace=False) for _ in range(4)]) for _ in range(16)])  # [T, L, K]
    probs = np.zeros((16, 4, 32), dtype=np.float32)
    np.put_along_axis(probs, topk, 0.25, axis=2)
    trace = Trace(np.arange(16), topk, np.full(topk.shape, 0.25, np.float32), probs, np.array([0]), None, {})
    cfg, hw = load_shape("gpt-oss-20b"), load_profile("rtx3060-12g")
    budget = dict(gpu_memory=4 << 30, cpu_memory=4 << 30)  # 3.35 GiB of resident weights
    mxfp4 = simulate(trace, hw, cfg, experts=sim.shape_format("gpt-oss-20b"), **budget)
    int4 = simulate(trace, hw, cfg, experts=sim.shape_format("gpt-oss-20b", "int4"), **budget)
    assert mxfp4.placement.expert_format == "mxfp4" and int4.placement.expert_format == "int4-g32"
    assert mxfp4.placement.expert_bytes == sim.shape_format("gpt-oss-20b").nbytes  # 4.25 bits per weight
    assert mxfp4.cpu_share == 0 and int4.cpu_share > 0
