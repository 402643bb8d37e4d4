"""Decode with the static KV cache (what a CUDA graph replays): the same tokens as the dynamic
cache and logits within float tolerance, for every family that has it (sliding windows, sinks
and left padding included); on a GPU, graphed runs bit-identical to eager ones and offloaded
runs giving the graphed resident run's tokens."""

import pytest
import torch

import offload
import offload.api
from offload.kv_cache import KVCache
from conftest import FAMILIES
from test_gpt_oss import gpt_oss  # noqa: F401  (fixture)
from test_offload import budget

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 200, 201]]  # different lengths: left padding


def step_logits(llm, static: bool, steps: int = 6) -> list[torch.Tensor]:
    """Greedy decode by hand from the first prompt; each step's logits."""
    cfg = llm.model.cfg
    ids = torch.tensor([PROMPTS[0]])
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, len(PROMPTS[0]) + steps, llm.device,
                    llm.dtype)
    out = []
    with torch.inference_mode():
        logits = llm.model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool), cache,
                           last_only=True)[:, -1]
        if static:
            cache.make_static()
        for step in range(steps - 1):
            out.append(logits)
            token = logits.argmax(-1)
            pos = torch.tensor([[ids.shape[1] + step]])
            logits = llm.model(token[:, None], pos, torch.ones(1, 1, dtype=torch.bool), cache, last_only=True)[:, -1]
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES) + ["mixtral-window"])
def test_static_cache_decodes_like_the_dynamic_one(model_dir, family, monkeypatch):
    path = model_dir("mixtral", sliding_window=5) if family == "mixtral-window" else model_dir(family)
    llm = offload.load(path, device="cpu")
    for ours, theirs in zip(step_logits(llm, True), step_logits(llm, False)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    expected = [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=12)]
    monkeypatch.setattr(offload.api, "static_decode", lambda model, device: True)
    assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=12)] == expected


def test_static_cache_with_sinks_and_windows(gpt_oss):  # noqa: F811
    llm = offload.load(gpt_oss("yarn"), device="cpu")
    for ours, theirs in zip(step_logits(llm, True), step_logits(llm, False)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_latent_attention_keeps_the_dynamic_cache():
    from offload.graphs import static_decode

    class Fam:
        attention = "mla"

    class Cfg:
        family = Fam()

    class Model:
        cfg = Cfg()

    assert not static_decode(Model(), torch.device("cuda")) and not static_decode(Model(), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_graphed_decode_is_bit_identical_to_eager_and_to_offloaded(model_dir, family):
    path = model_dir(family, num_hidden_layers=3, dtype=torch.bfloat16)
    llm = offload.load(path, device="cuda")
    assert "decode as a CUDA graph" in llm.describe()
    loop = llm._loop(PROMPTS, offload.api.SamplingParams.build(16, 0.0, 0, 1.0, None, None))
    graphed = [step for step in loop]
    assert loop.graph is not None and loop.graph.failed is None and loop.graph.graph is not None
    llm.cuda_graphs = False
    eager = [step for step in llm._loop(PROMPTS, offload.api.SamplingParams.build(16, 0.0, 0, 1.0, None, None))]
    assert graphed == eager
    hits = llm.stats.hits
    assert hits > 0  # the graph's replays counted their hits on the device too
    offloaded = offload.load(path, device="cuda", gpu_memory=llm.placement.resident_bytes + 8 * llm.placement.expert_bytes)
    assert offloaded.placement.mode == "offloaded"
    llm.cuda_graphs = True
    assert ([r.token_ids for r in offloaded.generate(PROMPTS, max_new_tokens=16)]
            == [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=16)])
