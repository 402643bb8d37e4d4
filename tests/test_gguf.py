"""GGUF files as models. Tiny GGUFs are written here from transformers' models (the oracle) with
gguf.GGUFWriter and llama.cpp's published rules (tensor names, the q/k permutation of arch `llama`,
stacked experts), quantized by gguf.quants (numpy, not our code) or, for Q4_K, which gguf cannot
quantize, by its published block layout written out below; then loaded with offload.load and
compared with transformers running the weights gguf.quants dequantizes from those blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CHAT_TEMPLATE, COMMON, FAMILIES, build_tokenizer, transformers

import offload
from offload.cli import main
from offload.errors import OffloadError
from offload.formats import ExpertFormat

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
TEXT = "To be, or not to be: Héllo wörld, naïve café; 東京 and 日本語 🙂🚀 <|user|>hi<|end|> Ωmega 12345 !!"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test converts into its own cache: nothing is shared or left in ~/.cache."""
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- the oracle: a transformers model, and its GGUF written by the published rules -------------

def oracle(family: str, seed: int = 0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).float().eval()


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: each head's rows (half 1, half 2) interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks by the published layout (ggml-common.h block_q4_K): per 256 weights along a row,
    f16 d and dmin, 12 bytes of 6-bit sub-block scales and mins, then 128 bytes of nibbles (bytes
    32c..32c+31 hold sub-block 2c in the low and 2c+1 in the high nibbles); w = d sc q - dmin m.
    A plain min/max fit, not llama.cpp's search: the layout is what is under test."""
    x = w.reshape(-1, 8, 32).astype(np.float32)  # [B, 8, 32]
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)  # [B, 8]; mins are subtracted: lo <= 0
    scale, low = (hi - lo) / 15, -lo
    d, dmin = (scale.max(-1) / 63).astype(np.float16), (low.max(-1) / 63).astype(np.float16)  # [B]

    def six_bits(v, step):
        step = step.astype(np.float32)[:, None]
        return np.round(np.divide(v, step, out=np.zeros_like(v), where=step > 0)).clip(0, 63).astype(np.uint8)

    sc, m = six_bits(scale, d), six_bits(low, dmin)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]  # [B, 8, 1]
    shift = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.round(np.divide(x + shift, step, out=np.zeros_like(x), where=step > 0)).clip(0, 15).astype(np.uint8)
    s = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)  # [B, 12]
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # [B, 4, 32] -> [B, 128]
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), s, qs], axis=1)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def bf16_exact_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks whose f16 scales are rounded to values bf16 holds exactly: still a valid file,
    and one our int4 (bf16 scales) must then hold without any loss."""
    b = blocks.reshape(-1, 18).copy()
    d = torch.from_numpy(b[:, :2].copy().view(np.float16).astype(np.float32))
    b[:, :2] = d.to(torch.bfloat16).float().numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(blocks.shape)


def encode(w: np.ndarray, qtype, exact_scales=False) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes written, what they dequantize to) for `w` as `qtype`."""
    if qtype == T.F32:
        return w.astype(np.float32), w.astype(np.float32)
    blocks = q4_k(w) if qtype == T.Q4_K else gguf.quants.quantize(w, qtype)
    if exact_scales and qtype == T.Q4_0:
        blocks = bf16_exact_q4_0(blocks)
    return blocks, gguf.quants.dequantize(blocks, qtype)


def tokenizer_fields(tok, vocab_size: int) -> dict:
    """A `tokenizers` byte-level BPE as llama.cpp's converter writes it: tokens by id (padded with
    [PADn] to the model's vocabulary), token types, merges, special ids."""
    data = json.loads(tok.to_str())
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [gguf.TokenType.UNUSED] * vocab_size
    for text, i in data["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return dict(tokens=tokens, types=types, merges=merges)


def write_gguf(path: Path, model, family: str, experts=T.F32, others=T.F32, down=None, arch=None,
               exact_scales=False, split=0, tokenizer=None, expert_raw=None) -> dict[str, torch.Tensor]:
    """Write `model` as a GGUF; experts (gate/up) in `experts`, down in `down` (default: `experts`),
    other matrices in `others` where their rows fit its blocks (else F32, as llama.cpp falls back);
    norms, biases and routers stay F32, as llama.cpp keeps them. Returns the state dict the file
    dequantizes to (what transformers should run to be the reference)."""
    cfg, arch = model.config, arch or ARCH[family]
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    w.add_expert_count(num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_feed_forward_length(cfg.intermediate_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if family in ("qwen2_moe", "qwen3_moe"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if family == "qwen3_moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if tokenizer is not False:  # a `tokenizers` byte-level BPE; the test one by default
        fields = tokenizer_fields(tokenizer or build_tokenizer(), cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    reference = {}

    def add(name: str, key: str | None, value: np.ndarray, qtype=T.F32, rows=None):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if value.ndim < 2 or value.shape[-1] % block:
            qtype = T.F32
        data, deq = encode(value, qtype, exact_scales)
        if rows is not None:  # llama.cpp permutes q/k rows; quantization is per row, so it commutes
            data = llama_permute(data, rows)
        if expert_raw is not None and "_exps" in name:
            data, qtype = expert_raw(data), expert_raw.qtype
        w.add_tensor(name, data, raw_dtype=None if qtype in (T.F32,) else qtype)
        if key is not None:
            reference[key] = torch.from_numpy(np.array(deq, dtype=np.float32)).reshape(sd[key].shape)

    moe = "mlp"
    add("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"], others)
    add("output_norm.weight", "model.norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", "lm_head.weight", sd["lm_head.weight"], others)
    else:  # no `output` tensor: the embedding is the head
        reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", sd[p + "post_attention_layernorm.weight"])
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            rows = (heads if ours == "attn_q" else kv) if arch == "llama" and ours in ("attn_q", "attn_k") else None
            add(f"blk.{i}.{ours}.weight", f"{p}self_attn.{theirs}.weight", sd[f"{p}self_attn.{theirs}.weight"], others,
                rows)
            if f"{p}self_attn.{theirs}.bias" in sd:
                add(f"blk.{i}.{ours}.bias", f"{p}self_attn.{theirs}.bias", sd[f"{p}self_attn.{theirs}.bias"])
        for norm in ("q_norm", "k_norm"):
            if f"{p}self_attn.{norm}.weight" in sd:
                add(f"blk.{i}.attn_{norm}.weight", f"{p}self_attn.{norm}.weight", sd[f"{p}self_attn.{norm}.weight"])
        add(f"blk.{i}.ffn_gate_inp.weight", f"{p}{moe}.gate.weight", sd[f"{p}{moe}.gate.weight"])
        gate_up, down_w = sd[f"{p}{moe}.experts.gate_up_proj"], sd[f"{p}{moe}.experts.down_proj"]  # [E, 2I, H], [E, H, I]
        width = gate_up.shape[1] // 2
        gate, up = encode(gate_up[:, :width], experts, exact_scales), encode(gate_up[:, width:], experts, exact_scales)
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", gate[0], raw_dtype=None if experts == T.F32 else experts)
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", up[0], raw_dtype=None if experts == T.F32 else experts)
        reference[f"{p}{moe}.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([gate[1], up[1]], axis=1))
        add(f"blk.{i}.ffn_down_exps.weight", f"{p}{moe}.experts.down_proj", down_w, down or experts)
        if family == "qwen2_moe":
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                key = f"{p}{moe}.shared_expert.{theirs}.weight"
                add(f"blk.{i}.ffn_{ours}_shexp.weight", key, sd[key], others)
            key = f"{p}{moe}.shared_expert_gate.weight"
            add(f"blk.{i}.ffn_gate_inp_shexp.weight", None, sd[key].reshape(-1))  # llama.cpp stores it as [H]
            reference[key] = torch.from_numpy(sd[key])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def reference_of(model, weights: dict[str, torch.Tensor]):
    ref = type(model)(model.config).float().eval()
    missing = set(ref.state_dict()) - set(weights)
    assert not missing, missing
    ref.load_state_dict(weights)
    return ref


def logits_of(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def greedy(ref, ids, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


PROMPT = [1, 17, 45, 99, 3, 250, 7, 61, 12, 200, 33, 150, 8]
MIXTRAL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_local_experts=4)
QWEN2 = dict(hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_experts=4)
QWEN3_K = dict(hidden_size=256, moe_intermediate_size=256, num_hidden_layers=2, num_experts=4)


def load(path, **kw):
    return offload.load(str(path), device="cpu", **kw)


# ---- exact paths: float files ----------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_gguf_runs_exactly_like_transformers(tmp_path, family):
    """Every family, all F32: names, shapes, the q/k permutation (llama) and the config all right."""
    model = oracle(family, num_hidden_layers=3)
    weights = write_gguf(tmp_path / "m.gguf", model, family)
    ref = reference_of(model, weights)
    with load(tmp_path / "m.gguf") as llm:
        assert llm.expert_format.name == "fp32" and llm.config.family.model_type == model.config.model_type
        torch.testing.assert_close(llm.logits([PROMPT])[0], logits_of(ref, PROMPT), atol=2e-5, rtol=1e-5)
        ids = llm.generate(PROMPT, max_new_tokens=8).token_ids  # may stop early at an end token
        assert ids and ids == greedy(ref, PROMPT, 8)[:len(ids)]


def test_f16_gguf_keeps_float16_and_computes_exactly(tmp_path):
    model = oracle("mixtral", **MIXTRAL)
    weights = write_gguf(tmp_path / "m.gguf", model, "mixtral", experts=T.F16, others=T.F16)
    ref = reference_of(model, weights)
    with load(tmp_path / "m.gguf") as llm:
        assert llm.checkpoint.config.dtype == "float16" and llm.expert_format.kind == "dense"
        torch.testing.assert_close(llm.logits([PROMPT])[0], logits_of(ref, PROMPT), atol=2e-5, rtol=1e-5)


# ---- quantized experts ---------------------------------------------------------------------

def packed_experts(directory: Path, layer: int, prefix: str = "block_sparse_moe"):
    from safetensors import safe_open

    with safe_open(directory / f"model-layer{layer:05d}.safetensors", "pt") as f:
        return f.get_tensor(f"model.layers.{layer}.{prefix}.experts.packed")


def converted_dir(cache: Path) -> Path:
    (found,) = [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]
    return found


def test_q4_0_experts_become_int4_g32_without_loss(tmp_path, private_cache):
    """Q4_0 blocks are repacked, not re-quantized: with scales bf16 can hold, our int4 experts equal
    gguf's dequantization bit for bit; the model then matches transformers on those weights."""
    model = oracle("mixtral", **MIXTRAL)
    weights = write_gguf(tmp_path / "m.gguf", model, "mixtral", experts=T.Q4_0, exact_scales=True)
    with load(tmp_path / "m.gguf") as llm:
        fmt = llm.expert_format
        assert (fmt.kind, fmt.group_size) == ("int4", 32)
        assert "Q4_0" in llm.describe() and "int4-g32" in llm.describe()
        ours = llm.logits([PROMPT])[0]
    stored = ExpertFormat("int4", 64, 64, torch.float32, 32)
    for layer in range(3):
        packed = packed_experts(converted_dir(private_cache), layer)
        for e in range(4):
            gate_up, down = stored.dequantize(stored.views(packed[e]), torch.float32)
            torch.testing.assert_close(gate_up, weights[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e],
                                       atol=0, rtol=0)
            torch.testing.assert_close(down, weights[f"model.layers.{layer}.mlp.experts.down_proj"][e], atol=0, rtol=0)
    # The only arithmetic difference left: the CPU int4 kernel takes bf16 activations.
    torch.testing.assert_close(ours, logits_of(reference_of(model, weights), PROMPT), atol=3e-3, rtol=0)


def test_q4_0_experts_with_f16_scales_lose_only_the_bf16_rounding(tmp_path, private_cache):
    model = oracle("qwen2_moe", **QWEN2)
    weights = write_gguf(tmp_path / "m.gguf", model, "qwen2_moe", experts=T.Q4_0, others=T.Q8_0)
    packed = None
    with load(tmp_path / "m.gguf", dtype="float32") as llm:
        assert llm.checkpoint.config.dtype == "bfloat16"  # a quantized file: resident weights in bf16
        ours = llm.logits([PROMPT])[0]
        packed = packed_experts(converted_dir(private_cache), 1, "mlp")
    stored = ExpertFormat("int4", 64, 32, torch.float32, 32)
    gate_up, _ = stored.dequantize(stored.views(packed[2]), torch.float32)
    want = weights["model.layers.1.mlp.experts.gate_up_proj"][2]
    # |w' - w| = |q - 8| |bf16(d) - d| <= 8 * 2^-8 |d| (bf16 keeps 8 significant bits), |d| = max|w| / 8.
    assert (gate_up - want).abs().max() <= 2 ** -8 * want.abs().max() * 1.01
    ref = reference_of(model, weights)
    err = (ours - logits_of(ref, PROMPT)).abs().max()
    assert err < 0.02, err  # bf16 resident weights and bf16 scales on logits of about +-1


def test_q4_k_experts_repacked_and_q8_0_down_requantized(tmp_path, private_cache):
    """Q4_K experts are repacked (only scales and zeros rounded); in a Q4_K_M-like mix the
    higher-precision down matrices are re-quantized to int4-g32 too (one format per model)."""
    model = oracle("qwen3_moe", **QWEN3_K)
    x = model.state_dict()["model.layers.0.mlp.experts.down_proj"].numpy()
    deq = gguf.quants.dequantize(q4_k(x), T.Q4_K)
    assert np.abs(deq - x).max() < np.abs(x).max() / 15  # the test's Q4_K blocks decode as gguf reads them
    weights_k = write_gguf(tmp_path / "k.gguf", model, "qwen3_moe", experts=T.Q4_K)
    reference_k = logits_of(reference_of(model, weights_k), PROMPT)
    four_bit = (logits_of(model, PROMPT) - reference_k).abs().max()  # what 4-bit experts cost the original

    weights = write_gguf(tmp_path / "m.gguf", model, "qwen3_moe", experts=T.Q4_K, down=T.Q8_0)
    with load(tmp_path / "m.gguf") as llm:
        assert llm.expert_format.name == "int4-g32"
        note = llm.checkpoint.raw_config["moe_offload_source"]
        assert note["expert_types"] == {"Q4_K": 2 * 2 * 4 * 256 * 256, "Q8_0": 2 * 4 * 256 * 256}
        assert "Q4_K kept" in llm.describe() and "Q8_0 re-quantized" in llm.describe()
        mixed = llm.logits([PROMPT])[0]
    stored = ExpertFormat("int4", 256, 256, torch.float32, 32)
    gate_up, down = stored.dequantize(stored.views(packed_experts(converted_dir(private_cache), 0, "mlp")[1]),
                                      torch.float32)
    want = weights["model.layers.0.mlp.experts.gate_up_proj"][1]
    # Q4_K: only scale and zero are rounded to bf16 (8 significant bits): |dw| <= 2^-8 (8 scale + |zero|),
    # where scale <= 2 max|w| / 15 and |zero| <= max|w|: about 2^-7 max|w|, a twentieth of a 4-bit step.
    assert (gate_up - want).abs().max() < 2 ** -7 * want.abs().max()
    down_want = weights["model.layers.0.mlp.experts.down_proj"][1]
    assert (down - down_want).abs().max() < 0.6 * (down_want.abs().max() * 2 / 15)  # re-quantized: half a step
    # Against transformers on the file's own weights: the repacked Q4_K alone is within bf16 rounding
    # (4-bit quantization itself moved these logits by `four_bit`, about 0.05); the re-quantized down
    # matrices cost about what 4-bit quantization costs.
    with load(tmp_path / "k.gguf") as llm:
        exact = (llm.logits([PROMPT])[0] - reference_k).abs().max()
    assert exact < 0.01, exact
    err = (mixed - logits_of(reference_of(model, weights), PROMPT)).abs().max()
    assert err < four_bit, (err, four_bit)


def test_q8_0_experts_become_int8(tmp_path):
    model = oracle("mixtral", **MIXTRAL)
    weights = write_gguf(tmp_path / "m.gguf", model, "mixtral", experts=T.Q8_0, others=T.F32)
    with load(tmp_path / "m.gguf") as llm:
        assert llm.expert_format.name == "int8"
        assert "Q8_0 re-quantized" in llm.describe()
        ours = llm.logits([PROMPT])[0]
        ids = llm.generate(PROMPT, max_new_tokens=6).token_ids
    ref = reference_of(model, weights)
    err = (ours - logits_of(ref, PROMPT)).abs().max()
    assert err < 0.01, err
    assert ids == greedy(ref, PROMPT, 6)[:len(ids)]


# ---- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_rebuilt_from_metadata_encodes_like_the_original(tmp_path, private_cache):
    original = build_tokenizer()
    model = oracle("mixtral", **MIXTRAL)
    write_gguf(tmp_path / "m.gguf", model, "mixtral")
    with load(tmp_path / "m.gguf") as llm:
        tok = llm.tokenizer
        for text in (TEXT, " leading space", "line\n\nbreaks\ttabs  double", "<s></s><|assistant|>", ""):
            assert tok.encode(text) == original.encode(text).ids, text
            assert tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False).ids
            assert tok.decode(tok.encode(text)) == original.decode(original.encode(text).ids)
        assert tok.chat_template == CHAT_TEMPLATE and tok.special["eos_token"] == "</s>"
        assert 2 in llm.eos_ids and 6 in llm.eos_ids  # eos, and <|end|>: llama.cpp also ends a turn on it
        reply = llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=3)
        assert reply.token_ids


def test_sentencepiece_vocabulary_from_scores_encodes_like_the_original(tmp_path):
    """tokenizer.ggml.model "llama": tokens, scores, types, no merges (Mixtral's files). The original
    here is a SentencePiece-style BPE with byte fallback (as Llama's tokenizer.json), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from offload.sources.gguf import GGUFSource, tokenizer_files

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    verse = "To be or not to be, that is the question. Whether tis nobler in the mind to suffer."
    corpus = [TEXT.replace("<|user|>", "").replace("<|end|>", "")] + [verse] * 5
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=[]))
    trained = json.loads(trainer_tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)  # alphabet, then merged pieces in merge order
    tokens = specials + byte_tokens + pieces
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    original = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    original.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    original.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)])
    original.add_special_tokens(specials)
    original.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    # SentencePiece's BPE scores: later pieces (later merges) score lower.
    w.add_token_scores([0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))])
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    text, config = tokenizer_files(GGUFSource([tmp_path / "t.gguf"]))
    ours = Tokenizer.from_str(text)
    assert config["add_bos_token"] and config["bos_token"] == "<s>" and config["unk_token"] == "<unk>"
    for sample in (TEXT, "To be or not", "  two spaces", "Ω unknown → bytes", "the question</s>"):
        assert ours.encode(sample).ids == original.encode(sample).ids, sample
        assert ours.decode(ours.encode(sample).ids) == original.decode(original.encode(sample).ids)


# ---- where the files come from, and the cache ---------------------------------------------------

def test_second_load_converts_nothing(tmp_path, private_cache, monkeypatch):
    import offload.sources.gguf as gguf_source

    model = oracle("mixtral", **MIXTRAL)
    write_gguf(tmp_path / "m.gguf", model, "mixtral", experts=T.Q4_0)
    with load(tmp_path / "m.gguf") as llm:
        first = llm.logits([PROMPT])
    monkeypatch.setattr(gguf_source, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    with load(tmp_path / "m.gguf") as llm:
        assert torch.equal(llm.logits([PROMPT]), first)
    assert len(list((private_cache / "gguf").iterdir())) == 1


def test_split_files_and_the_hub(tmp_path, monkeypatch):
    model = oracle("qwen2_moe", **QWEN2)
    write_gguf(tmp_path / "m.gguf", model, "qwen2_moe", experts=T.Q4_0, split=20)
    parts = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert len(parts) > 2 and parts[0] == f"m-00001-of-{len(parts):05d}.gguf"
    with load(tmp_path / parts[0]) as llm:
        local = llm.logits([PROMPT])
        assert "m-00001-of" in llm.describe()

    asked = []

    def hf_hub_download(repo_id, filename):
        asked.append((repo_id, filename))
        return str(tmp_path / Path(filename).name)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with load(f"org/repo/sub/{parts[0]}") as llm:
        assert torch.equal(llm.logits([PROMPT]), local)
    assert asked == [("org/repo", f"sub/{p}") for p in parts]

    (tmp_path / parts[-1]).unlink()
    with pytest.raises(OffloadError, match=f"parts {parts[-1]} are missing"):
        load(tmp_path / parts[0])


def test_cli_generates_from_a_gguf(tmp_path):
    write_gguf(tmp_path / "m.gguf", oracle("mixtral", **MIXTRAL), "mixtral", experts=T.Q4_0)
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "m.gguf"), "-p", "To be", "-n", "4",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "converted from GGUF m.gguf" in result.output


# ---- errors ------------------------------------------------------------------------------------

def test_unsupported_architecture_is_one_clear_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(OffloadError, match=r"'gpt2' model.*supported: llama \(MixtralForCausalLM, with experts\), "
                                           r"qwen2moe.*qwen3moe.*olmoe"):
        load(tmp_path / "g.gguf")


def test_unsupported_expert_type_is_one_clear_error(tmp_path, private_cache):
    class Q2K:  # the down experts as raw Q2_K blocks (84 bytes per 256 weights): any bytes are valid
        qtype = T.Q2_K

        def __call__(self, data):
            return np.zeros((*data.shape[:-1], data.shape[-1] // 256 * 84), dtype=np.uint8)

    model = oracle("qwen3_moe", **QWEN3_K)
    write_gguf(tmp_path / "m.gguf", model, "qwen3_moe", experts=T.F32, expert_raw=Q2K())
    with pytest.raises(OffloadError, match=r"stores experts as Q2_K.*supported expert types: Q4_0, Q4_1, Q4_K"):
        load(tmp_path / "m.gguf")
    assert not any(p for p in (private_cache / "gguf").iterdir())


def test_truncated_file_is_a_clear_error_and_leaves_no_cache(tmp_path, private_cache):
    model = oracle("mixtral", **MIXTRAL)
    write_gguf(tmp_path / "m.gguf", model, "mixtral", experts=T.Q4_0)
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) - 1000, 40):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(OffloadError, match="damaged or truncated"):
            load(tmp_path / "t.gguf")
        assert not any((private_cache / "gguf").iterdir())
    with pytest.raises(OffloadError, match="does not exist"):
        load(tmp_path / "absent.gguf")


def test_a_failure_midway_leaves_no_half_written_directory(tmp_path, private_cache, monkeypatch):
    import offload.sources.gguf as gguf_source

    write_gguf(tmp_path / "m.gguf", oracle("mixtral", **MIXTRAL), "mixtral", experts=T.Q4_0)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args)

    real = gguf_source.repack_q4
    monkeypatch.setattr(gguf_source, "repack_q4", failing)
    with pytest.raises(KeyboardInterrupt):
        load(tmp_path / "m.gguf")
    assert list((private_cache / "gguf").iterdir()) == []
    monkeypatch.setattr(gguf_source, "repack_q4", real)
    with load(tmp_path / "m.gguf") as llm:
        assert llm.expert_format.name == "int4-g32"


# ---- opt-in: against llama.cpp itself ------------------------------------------------------------

@pytest.mark.gguf
@pytest.mark.parametrize("experts,tolerance", [(T.F32, 1e-3), (T.Q4_0, 5e-3)])
def test_logits_and_tokens_match_llama_cpp(tmp_path, experts, tolerance):
    """Against llama.cpp itself (opt-in: -m gguf, needs llama-cpp-python): the same file, our
    logits and token ids against llama.cpp's, F32 KV cache so only the arithmetic differs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = oracle("mixtral", **MIXTRAL)
    write_gguf(tmp_path / "m.gguf", model, "mixtral", experts=experts, exact_scales=True)
    theirs = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), logits_all=True, n_threads=1, type_k=0, type_v=0,
                             n_ctx=64, verbose=False, use_extra_bufts=False)
    with load(tmp_path / "m.gguf", dtype="float32") as llm:
        for text in (TEXT, "To be, or not to be", " leading space"):
            assert llm.tokenizer.encode(text) == theirs.tokenize(text.encode(), add_bos=True, special=True), text
        theirs.reset()
        theirs.eval(PROMPT)
        want = torch.tensor(np.array(theirs.scores[:len(PROMPT)]), dtype=torch.float32)
        got = llm.logits([PROMPT])[0]
    # Q4_0 with bf16-exact scales is the same weights; the CPU int4 kernel takes bf16 activations.
    assert (got - want).abs().max() < tolerance
