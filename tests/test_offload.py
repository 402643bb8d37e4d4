"""Offloaded experts give exactly the resident model's output, for every
policy, cache size, split and checkpoint layout, and really move bytes."""

import pytest
import torch

import offload
from offload import OffloadError
from conftest import FAMILIES, reference

PROMPT = [1, 30, 31, 32, 33, 34]


def budget(path, slots):
    """cpu_memory that holds exactly `slots` experts."""
    probe = offload.load(path, device="cpu", cpu_memory="1GiB")
    per_expert, total = probe.placement.expert_bytes, probe.placement.total_experts
    probe.close()
    return slots * per_expert, total


def check_matches_resident(path, ids, **options):
    resident = offload.load(path, device="cpu")
    assert resident.placement.mode == "resident"
    llm = offload.load(path, device="cpu", **options)
    assert llm.placement.mode == "offloaded"
    assert torch.equal(llm.logits(ids), resident.logits(ids))  # bit-exact: same arithmetic
    ours = llm.generate(PROMPT, max_new_tokens=12)
    assert ours.token_ids == resident.generate(PROMPT, max_new_tokens=12).token_ids
    assert llm.stats.misses > 0 and llm.stats.bytes_from_disk > 0  # offloading really happened
    assert llm.stats.hits + llm.stats.misses == sum(c.hits + c.misses for c in llm.stats.experts.layers.values())
    llm.close()
    return llm


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", ["lru", "lfu", "score"])
def test_every_policy_and_cache_size_matches_resident(model_dir, family, policy):
    path = model_dir(family, num_hidden_layers=3)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    per_layer_min = 2 * 3  # top_k slots for each of the 3 MoE layers
    _, total = budget(path, 1)
    for slots in sorted({per_layer_min, 9, total}):
        cpu_memory, _ = budget(path, slots)
        check_matches_resident(path, ids, cpu_memory=cpu_memory, cache_policy=policy)


@pytest.mark.parametrize("family, overrides", [("mixtral", dict(fused=True)), ("olmoe", dict(shard="30KB")),
                                                ("qwen2_moe", dict(mlp_only_layers=[0], num_hidden_layers=3)),
                                                ("mixtral", dict(dtype=torch.bfloat16))])
def test_layouts_dense_layers_and_bf16(model_dir, family, overrides):
    path = model_dir(family, **overrides)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    cpu_memory, _ = budget(path, 2 * sum(1 for _ in range(2)))
    check_matches_resident(path, ids, cpu_memory=cpu_memory)


def test_global_split_and_transformers_oracle(model_dir):
    path = model_dir("qwen3_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=2)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(6))
    for slots in (2, 6):  # 2 = top_k: every layer takes turns with one token's worth of slots
        cpu_memory, _ = budget(path, slots)
        llm = check_matches_resident(path, ids, cpu_memory=cpu_memory, cache_split="global")
    with pytest.raises(OffloadError, match=r"too small.*2 expert slots"):
        offload.load(path, device="cpu", cpu_memory=budget(path, 1)[0], cache_split="global")
    with torch.no_grad():
        theirs = reference(path)(ids).logits.float()
    llm = offload.load(path, device="cpu", cpu_memory=cpu_memory, cache_split="global")
    assert (llm.logits(ids) - theirs).abs().max().item() <= 1e-4


def test_smaller_cache_moves_more_bytes(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3)
    moved = []
    for slots in (6, 12):
        cpu_memory, _ = budget(path, slots)
        llm = offload.load(path, device="cpu", cpu_memory=cpu_memory)
        llm.generate(PROMPT, max_new_tokens=24)
        moved.append((llm.stats.bytes_from_disk, llm.stats.hit_rate))
        llm.close()
    (small_bytes, small_hits), (big_bytes, big_hits) = moved
    assert small_bytes > big_bytes and small_hits < big_hits


def test_budget_too_small_says_the_minimum(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3)
    cpu_memory, _ = budget(path, 5)  # 3 layers x top-2 = 6 slots needed
    need, _ = budget(path, 6)
    with pytest.raises(OffloadError, match=r"too small.*6 expert slots.*raise cpu_memory") as err:
        offload.load(path, device="cpu", cpu_memory=cpu_memory, cache_split="layer")
    assert f"{need / 1024:.2f} KiB" in str(err.value) and "or use cache_split='global'" in str(err.value)
    # "auto" (the default) falls back to one global pool, which needs only top_k = 2 slots
    llm = offload.load(path, device="cpu", cpu_memory=cpu_memory)
    assert (llm.placement.split, llm.placement.device_slots) == ("global", 5)
    assert "one pool shared by all layers" in llm.placement.describe()
    llm.close()
    with pytest.raises(OffloadError, match=r"too small.*2 expert slots"):
        offload.load(path, device="cpu", cpu_memory=budget(path, 1)[0])


def test_stats_are_exposed_per_layer_and_as_json(model_dir):
    import json

    path = model_dir("mixtral", num_hidden_layers=3)
    cpu_memory, _ = budget(path, 6)
    llm = offload.load(path, device="cpu", cpu_memory=cpu_memory)
    llm.generate(PROMPT, max_new_tokens=8)
    data = json.loads(llm.stats.to_json())
    for name in ("hits", "misses", "bytes_from_disk", "bytes_to_device", "stall_seconds", "tokens_per_second"):
        assert name in data
    assert set(data["layers"]) == {"0", "1", "2"}
    assert data["misses"] == sum(layer["misses"] for layer in data["layers"].values()) > 0
    assert data["bytes_to_device"] == 0  # the device is the CPU: nothing crosses a bus


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tiers_match_resident(model_dir):
    path = model_dir("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(7))
    resident = offload.load(path, device="cuda")
    per_expert = resident.placement.expert_bytes
    llm = offload.load(path, device="cuda", gpu_memory=resident.placement.resident_bytes + 6 * per_expert,
                       cpu_memory=8 * per_expert)
    # The host tier gets what cpu_memory holds, in whole per-layer shares (6 of the 8 here).
    assert llm.placement.device_slots == 6 and 0 < llm.placement.host_slots <= 8
    assert torch.equal(llm.logits(ids), resident.logits(ids))
    assert llm.generate(PROMPT, max_new_tokens=12).token_ids == resident.generate(PROMPT, max_new_tokens=12).token_ids
    assert llm.stats.bytes_to_device > 0 and llm.stats.bytes_from_disk > 0


def test_auto_split_needs_per_layer_shares_in_both_tiers():
    """plan()'s GPU branch, run on the CPU with given free memory: per-layer shares only when the GPU
    and the host tier each hold top_k experts per layer, else one global pool (int8 Mixtral on a T4)."""
    from offload.config import RuntimeConfig
    from offload.placement import expert_format, plan
    from offload.simulate import load_shape

    cfg = load_shape("mixtral-8x7b")
    fmt = expert_format(cfg, torch.float16, "int8")
    per, layers = fmt.nbytes, len(cfg.moe_layers)
    gpu = torch.device("cuda")  # only planned, never allocated
    roomy = plan(cfg, RuntimeConfig(), gpu, torch.float16, 0, host_free=(4 * layers * per) + (3 << 30),
                 device_free=(2 * layers * per) + (2 << 30), fmt=fmt)
    assert roomy.split == "layer"
    tight = plan(cfg, RuntimeConfig(), gpu, torch.float16, 0, host_free=(layers * per) + (3 << 30),
                 device_free=(2 * layers * per) + (2 << 30), fmt=fmt)
    assert tight.split == "global" and tight.host_slots >= cfg.top_k and tight.device_slots >= 2 * layers
