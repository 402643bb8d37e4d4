"""DeepSeek-V2 and V3 against transformers: multi-head latent attention (q_lora on and off,
absorbed and expanded, YaRN on and off), dense first layers, shared experts, every router
variant; offloaded runs bit-identical to resident ones; the latent KV cache's size."""

import importlib
import json
from pathlib import Path

import pytest
import torch

import offload
from offload import OffloadError
from offload.models.mla import LatentAttention
from conftest import reference, reference_greedy, transformers
from test_offload import budget, check_matches_resident

# Random weights of std 0.2 rather than transformers' 0.02: large enough that routing, RoPE and the
# attention scale decide the logits (a wrong YaRN factor or group rule moves them by > 1, not 1e-4).
# eos_token_id=None: every greedy comparison runs its full length.
COMMON = dict(vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
              initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=0)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32,
            beta_slow=1)
VARIANTS = {
    # q_proj, greedy softmax top-k, one dense layer, two shared experts, plain RoPE
    "v2": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1, n_shared_experts=2)),
    # q_a/q_b, group-limited (2 groups of 4, the best one only), YaRN with equal mscales, scaled weights,
    # norm_topk_prob set (transformers' V2 router ignores it), biases in attention and MLPs
    "v2-groups-yarn": ("DeepseekV2", dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1, first_k_dense_replace=0,
        n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True, attention_bias=True, mlp_bias=True,
        rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    # sigmoid router with score-correction bias, 4 groups of 2 (best 2), top-3, renormalised and scaled;
    # YaRN whose mscale differs from mscale_all_dim (cos and sin scaled too), interleaved RoPE pairs
    "v3": ("DeepseekV3", dict(
        q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1,
        norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5})),
    # q_proj, no renormalisation, rotate-half RoPE, two dense layers then two MoE layers
    "v3-plain": ("DeepseekV3", dict(
        q_lora_rank=None, n_group=2, topk_group=1, num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2,
        norm_topk_prob=False, routed_scaling_factor=1.0, rope_interleave=False)),
}
PROMPT = [1, 17, 42, 99, 5]


def save(path: Path, variant: str, fused: bool = False, dtype: str = "float32", **overrides) -> Path:
    kind, extra = VARIANTS[variant]
    config = getattr(transformers, f"{kind}Config")(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # transformers starts the V3 bias at zero: give it values that change the choice
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, **({"save_original_format": False} if fused else {}))
    return path


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    built: dict[str, Path] = {}

    def make(variant: str, **kwargs) -> Path:
        key = variant + json.dumps(kwargs, sort_keys=True)
        if key not in built:
            built[key] = save(tmp_path_factory.mktemp(variant), variant, **kwargs)
        return built[key]

    return make


def force_attention(llm, absorb: bool | None) -> None:
    """Force the absorbed or the expanded attention path (None: whichever the shapes favour)."""
    for module in llm.model.modules():
        if isinstance(module, LatentAttention):
            module.absorb = absorb


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(deepseek, variant):
    path = deepseek(variant)
    llm, ref = offload.load(path, device="cpu"), reference(path)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert theirs.abs().max() > 1  # the weights are large enough for the comparison to mean something
    for path_taken in (True, False):  # latent-space (absorbed) and expanded attention
        force_attention(llm, path_taken)
        assert (llm.logits(ids) - theirs).abs().max().item() <= 1e-4
    force_attention(llm, None)
    assert llm.generate(PROMPT, max_new_tokens=32).token_ids == reference_greedy(ref, PROMPT, 32)


def test_batch_with_left_padding_matches_each_prompt_alone(deepseek):
    path = deepseek("v3")
    llm, ref = offload.load(path, device="cpu"), reference(path)
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 200, 201]]
    for prompt, result in zip(prompts, llm.generate(prompts, max_new_tokens=12)):
        assert result.token_ids == reference_greedy(ref, prompt, 12)


def test_fused_checkpoint_layout(deepseek):
    """save_original_format=False: experts as mlp.experts.gate_up_proj / down_proj, read row by row."""
    path = deepseek("v3", fused=True)
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in set(f.keys())
    llm, ref = offload.load(path, device="cpu"), reference(path)
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (llm.logits(ids) - ref(ids).logits.float()).abs().max().item() <= 1e-4
    check_matches_resident(path, ids, cpu_memory=budget(path, 6)[0])


def test_bf16_checkpoint(deepseek):
    """bf16 on disk: exact in float32; bf16 compute stays close (the router always runs in float32)."""
    path = deepseek("v3", dtype="bfloat16")
    ref = reference(path, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert (offload.load(path, device="cpu", dtype="float32").logits(ids) - theirs).abs().max().item() <= 1e-4
    native = offload.load(path, device="cpu")
    assert native.dtype == torch.bfloat16
    assert (native.logits(ids) - theirs).abs().max().item() <= 0.05 * theirs.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tiers_match_resident(deepseek):
    path = deepseek("v3")
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(7))
    resident = offload.load(path, device="cuda")
    with torch.no_grad():
        theirs = reference(path)(ids).logits.float()
    for path_taken in (True, False):
        force_attention(resident, path_taken)
        assert (resident.logits(ids) - theirs).abs().max().item() <= 1e-3  # fused kernels on a GPU
    force_attention(resident, None)
    per_expert, minimum = resident.placement.expert_bytes, 3 * len(resident.config.moe_layers)
    llm = offload.load(path, device="cuda", gpu_memory=resident.placement.resident_bytes + minimum * per_expert,
                       cpu_memory=(minimum + 2) * per_expert)
    assert llm.placement.mode == "offloaded"
    assert torch.equal(llm.logits(ids), resident.logits(ids))
    assert llm.generate(PROMPT, max_new_tokens=12).token_ids == resident.generate(PROMPT, max_new_tokens=12).token_ids
    assert llm.stats.bytes_to_device > 0


@pytest.mark.parametrize("variant, policy", [("v3", "lru"), ("v3", "score"), ("v2-groups-yarn", "lru"),
                                             ("v3-plain", "score")])
def test_offloaded_runs_are_bit_identical_to_resident(deepseek, variant, policy):
    """A few experts' worth of RAM (top_k per MoE layer), the gate predictor prefetching."""
    path = deepseek(variant)
    probe = offload.load(path, device="cpu")
    cfg = probe.config
    minimum = cfg.top_k * len(cfg.moe_layers)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    llm = check_matches_resident(path, ids, cpu_memory=budget(path, minimum)[0], cache_policy=policy,
                                 predictor="gate")
    assert llm.placement.total_experts == len(cfg.moe_layers) * cfg.num_experts  # shared experts are not routed
    assert sum(c.prefetch_issued for c in llm.stats.experts.layers.values()) > 0


@pytest.mark.parametrize("variant", ["v2-groups-yarn", "v3"])
def test_gate_predictor_reproduces_each_routers_choice(deepseek, variant):
    """Applied to a layer's own router input, the predictor ranks first exactly the experts that router
    picked: groups, V3's bias and its top-2 group scores included (from the model and from the checkpoint)."""
    from offload.predictors.base import rank
    from offload.predictors.gate import GatePredictor, routers_from_checkpoint

    path = deepseek(variant)
    llm = offload.load(path, device="cpu")
    seen = []
    inner = llm.experts

    def spy(layer, hidden, ids, weights, probs=None):
        seen.append((llm.config.moe_layers.index(layer), hidden.clone(), ids.clone()))
        return inner(layer, hidden, ids, weights, probs)

    llm.model.set_executor(spy)
    llm.logits(torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3)))
    k = llm.config.top_k
    for predictor in (GatePredictor.from_model(llm.model), GatePredictor(routers_from_checkpoint(path))):
        for pos, hidden, ids in seen:
            scores = predictor.scores(pos - 1, hidden, None, None)[pos]  # this layer's router on its own input
            for row in range(len(ids)):
                assert set(rank(scores[row], k)) == set(ids[row].tolist())


def test_kv_cache_holds_the_latent_and_rotated_key_per_token(deepseek):
    from offload.kv_cache import KVCache

    path = deepseek("v3")
    llm = offload.load(path, device="cpu")
    cfg = llm.config
    per_token = cfg.num_layers * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * 4  # fp32
    assert cfg.kv_cache_bytes_per_token() == per_token == 3 * (16 + 8) * 4
    assert f"KV cache {per_token} bytes per token" in llm.describe()
    # What is really allocated once the model has run: the latent rows, no values.
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, 10, llm.device, llm.dtype)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        llm.model(ids, torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool), cache)
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v if t is not None)
    assert held == 10 * per_token
    # transformers' full keys and values would be A x (qk_head_dim + v_head_dim) per layer
    assert per_token < cfg.num_layers * cfg.num_heads * (16 + 12) * 4
    # the published shapes (bf16): 27 x 576 x 2 and 61 x 576 x 2
    from offload.simulate import load_shape

    assert load_shape("deepseek-v2-lite").kv_cache_bytes_per_token(torch.bfloat16) == 31104
    assert load_shape("deepseek-v3").kv_cache_bytes_per_token(torch.bfloat16) == 70272


@pytest.mark.parametrize("shape", ["deepseek-v2-lite", "deepseek-v3"])
def test_published_rope_and_scale_match_transformers(shape):
    """YaRN at the published configs (factor 40, mscale / mscale_all_dim): frequencies, the cos/sin
    factor and the softmax scale as transformers computes them, the model built on meta."""
    from offload.models.mla import inv_freq
    from offload.simulate import SHAPES_DIR, load_shape

    raw = json.loads((SHAPES_DIR / f"{shape}.json").read_text())
    cfg = load_shape(shape)
    kind = "DeepseekV2" if "v2" in shape else "DeepseekV3"
    hf = getattr(transformers, f"{kind}Config")(**{k: v for k, v in raw.items() if not k.startswith("_")})
    module = kind.lower().replace("deepseekv", "deepseek_v")
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    rotary = getattr(modeling, f"{kind}RotaryEmbedding")(hf)
    torch.testing.assert_close(inv_freq(cfg.mla.rope, cfg.mla.qk_rope_head_dim), rotary.inv_freq, rtol=0, atol=0)
    assert cfg.mla.rope.attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)
    with torch.device("meta"):
        attention = getattr(modeling, f"{kind}Attention")(hf, layer_idx=0)
    assert cfg.mla.softmax_scale == pytest.approx(attention.scaling, rel=1e-12)
    assert cfg.sparse_layers == tuple(i >= hf.first_k_dense_replace for i in range(hf.num_hidden_layers))


def test_config_rules_and_errors():
    from offload.config import ModelConfig
    from offload.models import family_for

    raw = json.loads((Path(offload.__file__).parent / "shapes" / "deepseek-v2-lite.json").read_text())

    def parse(**changes):
        changed = {**raw, **changes}
        return ModelConfig.from_dict(changed, family_for(changed))

    # moe_layer_freq as DeepSeek's code reads it (transformers ignores it; every published config says 1)
    assert parse(moe_layer_freq=2, first_k_dense_replace=1).sparse_layers[:6] == (False, False, True, False, True,
                                                                                 False)
    with pytest.raises(OffloadError, match="topk_method 'noaux_tc' is not supported for deepseek_v2"):
        parse(topk_method="noaux_tc")
    with pytest.raises(OffloadError, match="n_group=3 must divide n_routed_experts=64"):
        parse(topk_method="group_limited_greedy", n_group=3, topk_group=1)
    with pytest.raises(OffloadError, match="RoPE type 'dynamic' is not supported for multi-head latent attention"):
        parse(rope_scaling={"type": "dynamic", "factor": 2.0})
