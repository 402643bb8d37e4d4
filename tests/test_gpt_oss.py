"""GPT-OSS against transformers: attention sinks, per-layer sliding windows, YaRN on and off,
the biased top-k router, the clamped SwiGLU experts as transformers saves them (transposed,
interleaved, with biases) and as OpenAI ships them (MXFP4 blocks and scales, read natively);
offloaded runs bit-identical to resident ones; int8/int4 quantization keeping the layout; the
harmony chat template's jinja features; the published shapes."""

import json
from pathlib import Path

import pytest
import torch

import offload
from offload import OffloadError
from offload.formats import ExpertFormat
import conftest
from conftest import build_tokenizer, reference_greedy, transformers
from test_offload import budget, check_matches_resident

# Weights of std 0.2 (transformers' default 0.02 leaves the logits flat), sinks, router and expert biases
# of std 1 (a visible share of each softmax goes to the sink), and a SwiGLU clamp low enough to bite.
# eos_token_id=None: every greedy comparison runs its full length.
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
              max_position_embeddings=128, initializer_range=0.2, swiglu_limit=2.0, bos_token_id=1,
              eos_token_id=None, pad_token_id=0)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=32)
VARIANTS = {
    # YaRN (not truncated, as published), windows of 5 on layers 0 and 2, full attention on layer 1
    "yarn": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=5,
                 rope_parameters=YARN),
    # plain RoPE, full attention first, one KV head for four query heads, no attention biases
    "plain": dict(layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=3,
                  num_key_value_heads=1, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}
PROMPT = [1, 17, 42, 99, 5]
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def reference(path: Path, dtype=torch.float32):
    """conftest's oracle, with what older transformers got wrong here set right (a no-op from 5.23 on):
    before 5.19 GptOssExperts ignores the config's swiglu_limit and swiglu_alpha (hard-coded 7.0 and 1.702,
    the published values; this file's limit is 2.0), and before 5.23 an MXFP4 checkpoint's experts are
    dequantized to bf16 whatever `dtype` asks (exact values, so casting them back loses nothing)."""
    model = conftest.reference(path, dtype)
    if model.config.model_type == "gpt_oss":
        for layer in model.model.layers:
            experts = layer.mlp.experts.to(dtype)
            experts.limit = getattr(model.config, "swiglu_limit", 7.0)
            experts.alpha = getattr(model.config, "swiglu_alpha", 1.702)
    return model


def build(variant: str, **overrides):
    config = transformers.GptOssConfig(**{**COMMON, **VARIANTS[variant], **overrides})
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # transformers starts the biases at zero and the sinks small
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith("_bias") or name.endswith("router.bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def save(path: Path, variant: str, dtype: str = "float32", **overrides) -> Path:
    build(variant, **overrides).to(getattr(torch, dtype)).save_pretrained(path)
    return path


# ---- MXFP4, written here as OpenAI ships it ---------------------------------------------------
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (blocks uint8 [N, K/32, 16], scales uint8 [N, K/32]): per 32 inputs the power of two
    that brings the largest to at most 6, each weight the nearest E2M1 value, two per byte, low first."""
    n, k = w.shape
    groups = w.float().reshape(n, k // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    nearest = (groups[..., None] / torch.exp2(exponent)[..., None, None] - FP4).abs().argmin(-1).to(torch.uint8)
    pairs = nearest.reshape(n, k // 32, 16, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), (exponent + 127).to(torch.uint8)


def save_mxfp4(dense: Path, path: Path) -> Path:
    """`dense` (as transformers saves GPT-OSS) with its experts as released: `*_blocks`, `*_scales`, bf16 biases."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for name, t in load_file(dense / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, K, N]: W^T per expert
            blocks, scales = zip(*(to_mxfp4(t[e].T) for e in range(t.shape[0])))
            tensors[name + "_blocks"], tensors[name + "_scales"] = torch.stack(blocks), torch.stack(scales)
        elif ".experts." in name:
            tensors[name] = t.to(torch.bfloat16)
        else:
            tensors[name] = t
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))
    return path


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    built: dict[str, Path] = {}

    def make(variant: str, mxfp4: bool = False, **kwargs) -> Path:
        key = variant + json.dumps(kwargs, sort_keys=True) + ("-mxfp4" if mxfp4 else "")
        if key not in built:
            if mxfp4:
                built[key] = save_mxfp4(make(variant, **kwargs), tmp_path_factory.mktemp(variant + "-mxfp4"))
            else:
                built[key] = save(tmp_path_factory.mktemp(variant), variant, **kwargs)
        return built[key]

    return make


def with_sinks(llm, value: float | None) -> None:
    for name, p in llm.model.named_parameters():
        if name.endswith("sinks"):
            p.data.fill_(value)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_greedy_match_transformers(gpt_oss, variant):
    path = gpt_oss(variant)
    llm, ref = offload.load(path, device="cpu"), reference(path)
    assert llm.expert_format == ExpertFormat("dense", 64, 64, torch.float32, bias=True, interleaved=True,
                                             transposed=True)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    ours = llm.logits(ids)
    assert theirs.abs().max() > 1  # large enough weights for the comparison to mean something
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert llm.generate(PROMPT, max_new_tokens=32).token_ids == reference_greedy(ref, PROMPT, 32)
    with_sinks(llm, -1e4)  # no sinks: the logits move far beyond the tolerance, so they were tested
    assert (llm.logits(ids) - theirs).abs().max().item() > 0.05


def test_sink_attention_in_query_chunks(gpt_oss, monkeypatch):
    """A long prompt's sink attention runs in chunks of queries (bounded memory): same logits."""
    import offload.models.decoder as decoder

    path = gpt_oss("yarn")
    llm, ref = offload.load(path, device="cpu"), reference(path)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    whole = llm.logits(ids)
    monkeypatch.setattr(decoder, "SINK_CHUNK_BYTES", 2 * 4 * 24 * 4 * 5)  # 5 queries per chunk
    chunked = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6) and (chunked - theirs).abs().max() <= 1e-4


def test_config_reading():
    from offload.config import ModelConfig
    from offload.models import family_for

    raw = json.loads((Path(offload.__file__).parent / "shapes" / "gpt-oss-20b.json").read_text())
    cfg = ModelConfig.from_dict(raw, family_for(raw))
    assert cfg.sliding_windows[:4] == (128, None, 128, None) and all(cfg.sparse_layers)
    assert cfg.qkv_bias and cfg.o_bias and cfg.head_dim == 64 and cfg.rope.kind == "yarn"
    assert not cfg.rope.truncate and cfg.rope.factor == 32 and cfg.rope.original_max_position_embeddings == 4096
    no_types = {k: v for k, v in raw.items() if k != "layer_types"}  # transformers' default: alternating
    assert ModelConfig.from_dict(no_types, family_for(raw)).sliding_windows == cfg.sliding_windows
    with pytest.raises(OffloadError, match="layer_types must list 24 of sliding_attention, full_attention"):
        ModelConfig.from_dict({**raw, "layer_types": ["chunked"] * 24}, family_for(raw))
    with pytest.raises(OffloadError, match="RoPE type 'dynamic' is not supported yet"):
        ModelConfig.from_dict({**raw, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, family_for(raw))


@pytest.mark.parametrize("shape", ["gpt-oss-20b", "gpt-oss-120b"])
def test_published_rope_matches_transformers(shape):
    """YaRN at the published configs (factor 32, not truncated): frequencies and the cos/sin factor."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from offload.models.decoder import rope_tables
    from offload.simulate import SHAPES_DIR, load_shape

    raw = json.loads((SHAPES_DIR / f"{shape}.json").read_text())
    cfg = load_shape(shape)
    hf = transformers.GptOssConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    rotary = GptOssRotaryEmbedding(hf)
    positions = torch.tensor([[0, 1, 7, 4095, 4096, 70000]])
    cos, sin = rope_tables(cfg, positions, torch.float32)  # [B, T, D]: both halves alike
    theirs = rotary(torch.zeros(1, dtype=torch.float32), positions)
    assert torch.equal(cos[..., :32], theirs[0]) and torch.equal(sin[..., :32], theirs[1])
    assert torch.equal(cos[..., 32:], theirs[0])


def test_yarn_serves_every_standard_attention_family(model_dir):
    """The YaRN of GPT-OSS is the decoder's, not the family's: a Qwen3-MoE config with YaRN matches too."""
    path = model_dir("qwen3_moe", initializer_range=0.2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})
    llm, ref = offload.load(path, device="cpu"), reference(path)
    assert llm.config.rope.kind == "yarn" and llm.config.rope.attention_factor > 1
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (llm.logits(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def test_batch_with_left_padding_matches_each_prompt_alone(gpt_oss):
    path = gpt_oss("yarn")
    llm, ref = offload.load(path, device="cpu"), reference(path)
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 200, 201]]
    for prompt, result in zip(prompts, llm.generate(prompts, max_new_tokens=12)):
        assert result.token_ids == reference_greedy(ref, prompt, 12)


@pytest.mark.parametrize("variant, policy, mxfp4", [("yarn", "lru", False), ("plain", "score", False),
                                                     ("yarn", "score", True)])
def test_offloaded_runs_are_bit_identical_to_resident(gpt_oss, variant, policy, mxfp4):
    """top_k slots per MoE layer, the gate predictor prefetching: same logits, same tokens, bit for bit."""
    path = gpt_oss(variant, mxfp4=mxfp4)
    minimum = COMMON["num_experts_per_tok"] * COMMON["num_hidden_layers"]
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    llm = check_matches_resident(path, ids, cpu_memory=budget(path, minimum)[0], cache_policy=policy,
                                 predictor="gate")
    assert sum(c.prefetch_issued for c in llm.stats.experts.layers.values()) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mxfp4", [False, True])
def test_gpu_tiers_match_resident(gpt_oss, mxfp4):
    path = gpt_oss("yarn", mxfp4=mxfp4)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(7))
    resident = offload.load(path, device="cuda")
    with torch.no_grad():
        theirs = reference(path)(ids).logits.float()
    assert (resident.logits(ids) - theirs).abs().max().item() <= 1e-3  # other kernels on a GPU
    per_expert = resident.placement.expert_bytes
    minimum = resident.config.top_k * len(resident.config.moe_layers)
    llm = offload.load(path, device="cuda", gpu_memory=resident.placement.resident_bytes + minimum * per_expert,
                       cpu_memory=(minimum + 2) * per_expert)
    assert llm.placement.mode == "offloaded"
    assert torch.equal(llm.logits(ids), resident.logits(ids))
    assert llm.generate(PROMPT, max_new_tokens=12).token_ids == resident.generate(PROMPT, max_new_tokens=12).token_ids
    assert llm.stats.bytes_to_device > 0


def test_gate_predictor_reproduces_the_routers_choice(gpt_oss):
    """The biased router's top-k, from the model and from the checkpoint (`mlp.router.{weight,bias}`)."""
    from offload.predictors.base import rank
    from offload.predictors.gate import GatePredictor, routers_from_checkpoint

    path = gpt_oss("yarn")
    llm = offload.load(path, device="cpu")
    seen, inner = [], llm.experts

    def spy(layer, hidden, ids, weights, probs=None):
        seen.append((llm.config.moe_layers.index(layer), hidden.clone(), ids.clone(), weights.clone(), probs))
        return inner(layer, hidden, ids, weights, probs)

    llm.model.set_executor(spy)
    llm.logits(torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(3)))
    k = llm.config.top_k
    for pos, hidden, ids, weights, probs in seen:
        # weights: softmax over the k chosen logits; probs: softmax over all of them (the score policy's)
        assert torch.allclose(weights.sum(-1), torch.ones(len(ids))) and torch.allclose(probs.sum(-1),
                                                                                      torch.ones(len(ids)))
        assert torch.allclose(weights, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True))
    for predictor in (GatePredictor.from_model(llm.model), GatePredictor(routers_from_checkpoint(path))):
        for pos, hidden, ids, _, _ in seen:
            scores = predictor.scores(pos - 1, hidden, None, None)[pos]
            for row in range(len(ids)):
                assert set(rank(scores[row], k)) == set(ids[row].tolist())


def test_mxfp4_checkpoint_is_read_natively(gpt_oss):
    """OpenAI's layout (blocks, scales, bf16 biases, quant_method mxfp4) loads as is, without conversion,
    and computes what transformers computes from the same file (it dequantizes on a CPU): within 1e-4
    in float32, where the dequantized weights are exact and only the order of operations differs."""
    from offload.sources import model_directory

    path = gpt_oss("yarn", mxfp4=True)
    assert model_directory(path) == path  # not sent to the GPTQ/AWQ/FP8 converters
    llm, ref = offload.load(path, device="cpu"), reference(path)
    fmt = llm.expert_format
    assert (fmt.kind, fmt.bias, fmt.interleaved, fmt.apart) == ("mxfp4", True, True, True)
    # bytes per expert: nibbles and one E8M0 scale per 32 weights (4.25 bits), then the bf16 biases
    assert llm.placement.expert_bytes == fmt.nbytes == 3 * 64 * 64 * 17 // 32 + 2 * (2 * 64 + 64)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    assert (llm.logits(ids) - theirs).abs().max().item() <= 1e-4
    assert llm.generate(PROMPT, max_new_tokens=32).token_ids == reference_greedy(ref, PROMPT, 32)
    # The quantization really happened: the dense model's logits are elsewhere.
    dense = offload.load(gpt_oss("yarn"), device="cpu")
    assert (dense.logits(ids) - theirs).abs().max().item() > 1e-2


def test_mxfp4_bytes_per_expert_at_the_published_shapes():
    from offload.simulate import load_shape

    for shape, experts in (("gpt-oss-20b", 32), ("gpt-oss-120b", 128)):
        cfg = load_shape(shape)
        fmt = ExpertFormat("mxfp4", cfg.hidden_size, cfg.moe_intermediate_size, torch.bfloat16, bias=True,
                           interleaved=True, apart=True)
        h = i = 2880
        assert cfg.num_experts == experts and (cfg.hidden_size, cfg.moe_intermediate_size) == (h, i)
        assert fmt.nbytes == 3 * h * i * 17 // 32 + 2 * (2 * i + h) == 13_236_480
        assert fmt.bits_per_weight == pytest.approx(4.2556, abs=1e-4)


@pytest.mark.parametrize("kind, group", [("int8", 0), ("int4", 32)])
@pytest.mark.parametrize("mxfp4", [False, True])
def test_quantize_keeps_the_layout_and_biases(gpt_oss, tmp_path, monkeypatch, kind, group, mxfp4):
    """`experts="int8"` / `"int4"` from a transformers-saved GPT-OSS checkpoint, or from the MXFP4 one
    (quantized again: lossy, opt-in, for CPUs where MXFP4 dequantizes per call), keeps gate/up rows
    interleaved and the biases (bf16): against transformers running test_quantized's independent
    dequantization of the source's weights, through the dequantize-then-matmul path in float32 (the
    weight-only kernels round activations to bf16, which flips a routing choice of these random
    weights now and then)."""
    import offload.kernels
    from test_quantized import dequantized_reference

    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(offload.kernels, "DEQUANT_TOKENS", 1)
    path = gpt_oss("yarn", mxfp4=mxfp4)
    llm = offload.load(path, device="cpu", experts=kind if kind == "int8" else f"int4-g{group}")
    fmt = llm.expert_format
    assert (fmt.kind, fmt.bias, fmt.interleaved, fmt.apart, fmt.group_size) == (kind, True, True, False, group)
    assert "quantization_config" not in llm.checkpoint.raw_config  # no longer MXFP4
    ref = reference(path)  # transformers dequantizes an MXFP4 checkpoint itself
    with torch.no_grad():
        for layer in ref.model.layers:
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                rows = experts.gate_up_proj[e].T  # [2I, H], gate and up rows alternating, quantized row by row
                half = rows.shape[0] // 2
                wa, wb, wd = dequantized_reference(kind, group, rows[:half], rows[half:], experts.down_proj[e].T)
                experts.gate_up_proj[e] = torch.cat([wa, wb]).T
                experts.down_proj[e] = wd.T
            for bias in (experts.gate_up_proj_bias, experts.down_proj_bias):
                bias.copy_(bias.to(torch.bfloat16).float())
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (llm.logits(ids) - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_an_mxfp4_checkpoint_keeps_its_experts_unless_asked(gpt_oss):
    with pytest.raises(OffloadError, match="already holds mxfp4 experts, not bf16"):
        offload.load(gpt_oss("yarn", mxfp4=True), device="cpu", experts="bf16")
    assert offload.load(gpt_oss("yarn", mxfp4=True), device="cpu", experts=None).expert_format.kind == "mxfp4"


def test_bf16_checkpoint(gpt_oss):
    """bf16 on disk: exact in float32; bf16 compute stays close (sinks, router and norms as transformers)."""
    path = gpt_oss("yarn", dtype="bfloat16")
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = reference(path, dtype=torch.float32)(ids).logits.float()
        theirs_bf16 = reference(path, dtype=torch.bfloat16)(ids).logits.float()
    assert (offload.load(path, device="cpu", dtype="float32").logits(ids) - theirs).abs().max().item() <= 1e-4
    native = offload.load(path, device="cpu")
    assert native.dtype == torch.bfloat16
    assert (native.logits(ids) - theirs_bf16).abs().max().item() <= 0.02 * theirs.abs().max().item()


# ---- the chat template ----------------------------------------------------------------------
# A small template modeled on the harmony template GPT-OSS ships (chat_template.jinja), using the same
# jinja features: a macro, namespace(), strftime_now, `is not defined`, slicing, raise_exception,
# tojson, loop.last and loop.index. The published one is about 330 lines of tool rendering on top.
HARMONY = """{#- modeled on openai/gpt-oss-20b's chat_template.jinja, reduced -#}
{%- macro build_system_message() -%}
    {%- if model_identity is not defined %}{%- set model_identity = "You are ChatGPT." %}{%- endif %}
    {{- model_identity + "\\nKnowledge cutoff: 2024-06\\n" }}
    {{- "Current date: " + strftime_now("%Y-%m-%d") + "\\n\\n" }}
    {%- if reasoning_effort is not defined %}{%- set reasoning_effort = "medium" %}{%- endif %}
    {{- "Reasoning: " + reasoning_effort + "\\n\\n" }}
    {%- set tools_seen = namespace(browser=false) %}
    {%- for tool in builtin_tools or [] %}
        {%- if tool == "browser" %}{%- set tools_seen.browser = true %}{%- endif %}
    {%- endfor %}
    {%- if tools_seen.browser %}{{- "# Tools\\n\\n" }}{%- endif %}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{%- endmacro -%}
{{- "<|start|>system<|message|>" + build_system_message() + "<|end|>" }}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}{%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message %}
    {{- "<|start|>developer<|message|># Instructions\\n\\n" + developer_message + "\\n\\n<|end|>" }}
{%- endif %}
{%- set last = namespace(name=none) %}
{%- for message in loop_messages -%}
    {%- if message.role == "assistant" -%}
        {%- if "<|channel|>" in message.content %}
            {{- raise_exception("You have passed a message containing <|channel|> tags in the content field.") }}
        {%- endif %}
        {%- if loop.last and not add_generation_prompt %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
        {%- endif %}
    {%- elif message.role == "tool" -%}
        {{- "<|start|>functions." + last.name + " to=assistant<|channel|>commentary<|message|>" }}
        {{- message.content|tojson + "<|end|>" }}
    {%- elif message.role == "user" -%}
        {%- set last.name = "turn" ~ loop.index %}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""
HARMONY_TOKENS = ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>", "<|call|>"]


def test_harmony_chat_template_renders_as_transformers_renders_it(tmp_path):
    from offload.tokenizer import Tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens(HARMONY_TOKENS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|return|>",
                                                pad_token="<pad>")
    fast.chat_template = HARMONY
    fast.save_pretrained(tmp_path)
    ours = Tokenizer(tmp_path)
    assert ours.chat_template == HARMONY  # as chat_template.jinja, or inside tokenizer_config.json
    conversations = [
        [{"role": "user", "content": "Héllo 🙂"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "tool", "content": 'say "hi"'},
         {"role": "user", "content": "And 3+3?"}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            text = ours.render_chat(messages, add_generation_prompt=prompt)
            assert text == fast.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert "Current date: 20" in text and "Reasoning: medium" in text
        assert ours.encode_chat(messages) == fast.apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)
    with pytest.raises(OffloadError, match="containing <.channel.> tags"):
        ours.render_chat([{"role": "user", "content": "x"},
                          {"role": "assistant", "content": "<|channel|>final<|message|>y"}])
