"""One grouped expert computation per layer (offload/grouped.py): the rows it groups, a group's
bits independent of the others, the fused kernel (grouped_mm, run here on the CPU) bit-identical
between resident and offloaded runs of every family and within tolerance of transformers, and
the host syncs a layer makes, counted."""

import numpy as np
import pytest
import torch

import offload
import offload.grouped as grouped
from offload.formats import ExpertFormat
from offload.grouped import HostTransfers, combine, grouped_kernel, host_offsets, route
from offload.kernels import expert_kernel
from conftest import FAMILIES, reference
from test_offload import budget

PROMPT = [1, 30, 31, 32, 33, 34]


@pytest.fixture(params=[False, True], ids=["loop", "fused"])
def fused(request, monkeypatch):
    monkeypatch.setattr(grouped, "FUSED", request.param)
    return request.param


def random_routing(n, k, experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])  # [N, K] distinct per row
    return ids, torch.rand(n, k, generator=g)


def test_route_groups_rows_by_expert_and_the_host_offsets_agree():
    ids, weights = random_routing(9, 3, 7)
    r = route(ids, weights, 7)
    ends = r.offs.tolist()
    assert ends == host_offsets(ids.numpy(), 7).tolist() and ends[-1] == 27
    ranked, perm = ids.sort(dim=1)
    assert sorted(r.order.tolist()) == list(range(27))  # every (token, rank) exactly once
    start = 0
    for e, end in enumerate(ends):
        tokens = r.tokens[start:end].tolist()
        assert tokens == sorted(tokens)  # ascending token order inside a group
        assert all(ranked.reshape(-1)[i] == e for i in r.order[start:end].tolist())
        for row in range(start, end):  # each row carries its own router weight
            t, j = divmod(r.order[row].item(), 3)
            assert r.weights[row] == weights[t, perm[t, j]]
        start = end
    # Grouped by slot instead: the same rows per expert, in the slots' order.
    slot_of = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    s = route(ids, weights, 7, slot_of)
    assert s.offs.tolist() == host_offsets(ids.numpy(), 7, slot_of.numpy()).tolist()


def test_combine_adds_each_tokens_experts_with_their_weights():
    ids, weights = random_routing(5, 2, 4, seed=3)
    r = route(ids, weights, 4)
    y = torch.randn(10, 6)  # one row per (token, expert), in group order
    out = combine(r, y, torch.float32)
    expected = torch.zeros(5, 6)
    for row in range(10):
        expected[r.tokens[row]] += y[row] * r.weights[row]
    torch.testing.assert_close(out, expected)


needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                           pytest.param("cuda", torch.bfloat16, marks=needs_gpu)])
def test_a_groups_bits_do_not_depend_on_the_other_groups(device, dtype):
    """The fused call's rows equal each group run alone, bit for bit (and, on the CPU, the per-expert
    loop's): what lets offloaded runs (other slots, other groups per call) match resident ones."""
    dev, h, i = torch.device(device), 256, 128
    fmt = ExpertFormat("dense", h, i, dtype)
    kernel = expert_kernel(fmt, dev, torch.nn.functional.silu)
    fused = grouped.GroupedKernel(fmt, kernel, torch.nn.functional.silu, None, fused=True)
    loop = grouped.GroupedKernel(fmt, kernel, torch.nn.functional.silu, None, fused=False)
    g = torch.Generator().manual_seed(0)
    pool = torch.zeros(5, fmt.nbytes, dtype=torch.uint8)
    for piece in fmt.stacked_views(pool):
        piece.copy_(torch.randn(piece.shape, generator=g) * 0.05)
    pool = pool.to(dev)
    x = torch.randn(40, h, generator=g).to(dtype).to(dev)
    ends = [3, 3, 17, 39, 40]
    offs = torch.tensor(ends, dtype=torch.int32, device=dev)
    views = [fmt.views(pool[s]) for s in range(5)]
    everything = fused.all(x, pool, offs)
    if dev.type == "cpu":
        assert torch.equal(everything, loop.loop(x, ends, views.__getitem__))
    for s, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
        if b > a:
            assert torch.equal(everything[a:b], fused.group(x[a:b], views[s])), f"group {s} differs"
    # Another call: slots 2 and 4 alone, as an offloaded layer whose other experts are elsewhere.
    part = torch.cat([x[3:17], x[39:40]])
    alone = fused.all(part, pool, torch.tensor([0, 0, 14, 14, 15], dtype=torch.int32, device=dev))
    assert torch.equal(alone, torch.cat([everything[3:17], everything[39:40]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_resident_decode_step_never_syncs_on_the_gpu(model_dir):
    """torch's sync debug mode raises at any device -> host wait inside a resident decode step."""
    from offload.kv_cache import KVCache

    path = model_dir("qwen3_moe", num_hidden_layers=3, dtype=torch.bfloat16)
    llm = offload.load(path, device="cuda")
    assert llm.experts.grouped.fused, "grouped_mm does not run here: the loop path syncs once per layer"
    cfg, dev = llm.model.cfg, torch.device("cuda")
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, 16, dev, torch.bfloat16)
    ids = torch.tensor([[1, 5, 7, 9]], device=dev)
    with torch.inference_mode():
        llm.model(ids, torch.arange(4, device=dev)[None], torch.ones_like(ids, dtype=torch.bool), cache)
        step = (torch.tensor([[11]], device=dev), torch.tensor([[4]], device=dev),
                torch.ones(1, 1, dtype=torch.bool, device=dev))
        torch.cuda.set_sync_debug_mode("error")
        try:
            llm.model(*step, cache, last_only=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert llm.stats.hits > 0  # counted on the device, read here


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_kernels_match_transformers_and_offloaded_runs_bit_for_bit(model_dir, family, fused):
    path = model_dir(family, num_hidden_layers=3)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    resident = offload.load(path, device="cpu")
    assert resident.experts.grouped.fused == fused
    with torch.no_grad():
        theirs = reference(path)(ids).logits.float()
    expected = resident.logits(ids)
    assert (expected - theirs).abs().max().item() <= 1e-4
    tokens = resident.generate(PROMPT, max_new_tokens=10).token_ids
    _, total = budget(path, 1)
    for slots in (6, total):  # a tight cache (prefill experts come in turns), and every expert cached
        llm = offload.load(path, device="cpu", cpu_memory=budget(path, slots)[0])
        assert llm.placement.mode == "offloaded"
        assert torch.equal(llm.logits(ids), expected)
        assert llm.generate(PROMPT, max_new_tokens=10).token_ids == tokens
        llm.close()


def test_bf16_and_many_experts_top8_fused_matches_offloaded(model_dir, monkeypatch):
    monkeypatch.setattr(grouped, "FUSED", True)
    path = model_dir("qwen3_moe", num_experts=16, num_experts_per_tok=8, dtype=torch.bfloat16)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(6))
    resident = offload.load(path, device="cpu")
    llm = offload.load(path, device="cpu", cpu_memory=budget(path, 20)[0])
    assert torch.equal(llm.logits(ids), resident.logits(ids))
    with torch.no_grad():
        theirs = reference(path, torch.bfloat16)(ids).logits.float()
    assert (resident.logits(ids) - theirs).abs().max().item() <= 0.1  # bf16: a few ulps of the logits


@pytest.mark.parametrize("policy", ["lru", "score"])
def test_host_syncs_per_layer_are_counted(model_dir, fused, policy):
    """Resident with the fused kernel: no device -> host read in any layer (hits counted on the
    device, read when the stats are); with the loop: one per layer (its offsets); offloaded: one
    per layer whatever the policy (the ids, with the probabilities the score policy observes)."""
    path = model_dir("mixtral", num_hidden_layers=3)
    layers = 3
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    resident = offload.load(path, device="cpu", cache_policy=policy)
    before = HostTransfers.count
    resident.logits(ids)
    assert HostTransfers.count - before == (0 if fused else layers)
    llm = offload.load(path, device="cpu", cpu_memory=budget(path, 8)[0], cache_policy=policy)
    before = HostTransfers.count
    llm.logits(ids)
    assert HostTransfers.count - before == layers
    # The same routing: the resident run's hits (counted on the device) are the offloaded run's requests.
    assert resident.stats.hits == llm.stats.hits + llm.stats.misses > 0
    assert np.all([c.hits > 0 for c in resident.stats.experts.layers.values()])


def test_device_hit_counts_are_added_once_and_never_reset():
    """The stats add what the device counted since the last read; the device tensor keeps growing (a
    CUDA graph adds to it, and a reader on another thread must not wipe hits being added)."""
    from offload.stats import ExpertStats

    stats = ExpertStats([0, 1])
    offs = torch.tensor([1, 1, 3], dtype=torch.int32)  # experts 0 and 2 have rows
    stats.count_hits(0, offs)
    assert stats[0].hits == 2 and stats[1].hits == 0
    stats.count_hits(0, offs)
    stats.count_hits(1, offs)
    assert stats.total().hits == 6 and stats.device_hits.tolist() == [4, 2]
    assert stats[0].hits == 4  # read again: nothing added twice
