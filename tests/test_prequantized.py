"""GPTQ, AWQ and FP8 checkpoints, converted once into this runtime's layout.

The checkpoints are written here, from tiny transformers models, by this file's own quantizers and
packers (the published layouts: GPTQ packs 8 nibbles per int32 along K, low bits first, and stores
zero - 1 in its v1 format; AutoAWQ's "gemm" packs along N in the order [0, 2, 4, 6, 1, 3, 5, 7];
FP8 keeps float8 weights and one fp32 `weight_scale_inv` per block). The oracle is transformers
running this file's dequantized weights, saved as an ordinary checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import reference, reference_greedy
from safetensors.torch import load_file, save_file

import offload
from offload.cli import main
from offload.errors import OffloadError
from offload.formats import ExpertFormat

SHAPE = {"mixtral": {"hidden_size": 64, "intermediate_size": 64},
         "qwen2_moe": {"hidden_size": 64, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64},
         "qwen3_moe": {"hidden_size": 64, "moe_intermediate_size": 64}}
# What real checkpoints quantize: attention, routed and shared experts; never routers or embeddings.
QUANTIZED = re.compile(r"\.(q|k|v|o)_proj\.weight$|\.experts\.\d+\.\w+\.weight$|shared_expert\.\w+_proj\.weight$")
PROMPT = [5, 9, 17, 33, 65, 129, 7, 11, 250, 3, 19, 23]
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack: nibble i of an int32 holds column order[i]


# ---- this file's quantizers and packers -----------------------------------------------------------

def rtn(w, group, bits, g_idx):
    """Round-to-nearest per group (GPTQ's quantizer without its error feedback): q [N, K], scales fp16
    [G, N], zeros [G, N] with W ~ s * (q - z)."""
    maxq = 2 ** bits - 1
    groups = int(g_idx.max()) + 1
    q = torch.empty(w.shape, dtype=torch.int64)
    scales, zeros = torch.empty(groups, w.shape[0], dtype=torch.float16), torch.empty(groups, w.shape[0])
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(dim=1).values.clamp(max=0), cols.max(dim=1).values.clamp(min=0)
        s = ((hi - lo) / maxq).clamp(min=1e-6).half()
        z = torch.round(-lo / s.float()).clamp(0, maxq)
        q[:, g_idx == g] = (torch.round(cols / s.float()[:, None]) + z[:, None]).clamp(0, maxq).long()
        scales[g], zeros[g] = s, z
    return q, scales, zeros.long()


def int32(x):
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return ((x + 2**31) % 2**32 - 2**31).to(torch.int32)


def pack_k(qt, bits):
    """[K, N] -> int32 [K*bits/32, N]: input rows per*r + j in bits bits*j.. of row r."""
    per = 32 // bits
    out = torch.zeros(qt.shape[0] // per, qt.shape[1], dtype=torch.int64)
    for j in range(per):
        out |= qt[j::per] << (bits * j)
    return int32(out)


def pack_n(x, bits, order=None):
    """[R, N] -> int32 [R, N*bits/32] along N; nibble i holds column order[i] of each pack."""
    per = 32 // bits
    order = order or list(range(per))
    out = torch.zeros(x.shape[0], x.shape[1] // per, dtype=torch.int64)
    for i in range(per):
        out |= x[:, order[i]::per] << (bits * i)
    return int32(out)


def gptq(w, group, bits=4, form="gptq", act_order=False, seed=0):
    k = w.shape[1]
    g_idx = torch.arange(k) // group
    if act_order:  # GPTQ's desc_act: groups follow a permutation of the inputs
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // group
    q, s, z = rtn(w, group, bits, g_idx)
    stored_z = (z - 1) & (2**bits - 1) if form == "gptq" else z
    packed = {"qweight": pack_k(q.T, bits), "qzeros": pack_n(stored_z, bits), "scales": s,
              "g_idx": g_idx.to(torch.int32)}
    return packed, s.float()[g_idx].T * (q - z[g_idx].T), (q, s, z, g_idx)


def awq(w, group):
    g_idx = torch.arange(w.shape[1]) // group
    q, s, z = rtn(w, group, 4, g_idx)
    packed = {"qweight": pack_n(q.T.contiguous(), 4, AWQ_PACK_ORDER), "qzeros": pack_n(z, 4, AWQ_PACK_ORDER),
              "scales": s}
    return packed, (q - z[g_idx].T) * s.float()[g_idx].T, (q, s, z, g_idx)


def fp8(w, block):
    if block is None:  # AutoFP8 style: one `weight_scale` per tensor (and an unused static input_scale)
        scale = w.abs().max() / 448
        q = (w / scale).to(torch.float8_e4m3fn)
        packed = {"weight": q, "weight_scale": scale.reshape(()), "input_scale": torch.tensor(0.01)}
        return packed, q.float() * scale, None
    bn, bk = block
    n, k = w.shape
    rows, cols = -(-n // bn), -(-k // bk)
    inv = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            inv[r, c] = w[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk].abs().max() / 448
    full = inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = (w / full).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": inv}, q.float() * full, None


def int8_reference(w):
    """The runtime's documented int8 (symmetric per output row, bf16 scale), written again."""
    s = (w.abs().max(dim=1).values / 127).to(torch.bfloat16).float()
    return (w / s[:, None]).round().clamp(-127, 127) * s[:, None]


def write_checkpoint(src, out, method, quantization, **kw):
    """Quantize the tiny model at `src` into `out` (the source checkpoint) and `out`-reference (its
    dequantized weights, an ordinary checkpoint). Returns (source, reference dir, {name: parts})."""
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    tensors, ref, parts = {}, {}, {}
    for name, w in state.items():
        if not QUANTIZED.search(name):
            tensors[name] = ref[name] = w
            continue
        base = name[:-len(".weight")]
        if method == "gptq":
            packed, ref[name], parts[name] = gptq(w.float(), kw["group"], kw.get("bits", 4), kw.get("form", "gptq"),
                                                  any(re.search(p, name) for p in kw.get("act_order", ())),
                                                  seed=len(parts))
        elif method == "awq":
            packed, ref[name], parts[name] = awq(w.float(), kw["group"])
        else:
            packed, ref[name], parts[name] = fp8(w.float(), kw["block"])
        tensors.update({f"{base}.{k}": v for k, v in packed.items()})
        if method == "fp8" and kw.get("int8_experts") and ".experts." in name:
            ref[name] = int8_reference(ref[name])  # what our int8 experts hold
    config = json.loads((src / "config.json").read_text())
    for path, weights, extra in ((out, tensors, {"quantization_config": quantization}),
                                 (out.with_name(out.name + "-reference"), ref, {})):
        path.mkdir()
        save_file({n: t.contiguous() for n, t in weights.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({**config, **extra}))
        for f in src.iterdir():
            if f.name not in ("config.json", "model.safetensors", "model.safetensors.index.json"):
                shutil.copy2(f, path / f.name)
    return out, out.with_name(out.name + "-reference"), parts


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
               "checkpoint_format": "gptq"}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": ["gate"]}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_both(source, ref_dir, monkeypatch):
    """(our logits, reference logits, our greedy tokens, reference greedy tokens); our experts
    dequantized to fp32 (the weight-only kernels round activations to bf16, tested elsewhere)."""
    import offload.kernels

    monkeypatch.setattr(offload.kernels, "DEQUANT_TOKENS", 1)
    ref = reference(ref_dir)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = ref(ids).logits
    llm = offload.load(source, device="cpu")
    return llm, llm.logits(ids), expected, llm.generate(PROMPT, max_new_tokens=8).token_ids, \
        reference_greedy(ref, PROMPT, 8)


# ---- GPTQ and AWQ int4: repacked, exact but for bf16 scales and zeros ------------------------------

CASES = [  # (family, method, quantization_config overrides, group)
    ("mixtral", "gptq", {}, 32),
    ("qwen2_moe", "gptq", {"checkpoint_format": "gptq_v2", "group_size": 64}, 64),
    ("mixtral", "gptq", {"group_size": -1, "sym": True}, 64),  # one group per row: our widest that fits
    ("mixtral", "awq", {}, 32),
    ("qwen2_moe", "awq", {"group_size": 64}, 64),
]


@pytest.mark.parametrize("family,method,overrides,group", CASES, ids=[f"{c[0]}-{c[1]}-g{c[3]}" for c in CASES])
def test_int4_checkpoint_matches_transformers_on_its_dequantized_weights(model_dir, tmp_path, cache, monkeypatch,
                                                                         family, method, overrides, group):
    src = model_dir(family, **SHAPE[family])
    qconfig = {**(GPTQ_CONFIG if method == "gptq" else AWQ_CONFIG), **overrides}
    source, ref_dir, parts = write_checkpoint(src, tmp_path / method, method, qconfig, group=group,
                                              form=qconfig.get("checkpoint_format"))
    llm, got, expected, tokens, ref_tokens = run_both(source, ref_dir, monkeypatch)
    # The bf16 rounding of scales and zeros moves a weight by at most 1/16 of its group's step
    # (2^-8 relative each): measured 1.5e-4 to 2.5e-4 of the largest logit here.
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    assert tokens == ref_tokens
    note = json.loads((llm.path / "config.json").read_text())
    assert llm.path.parent == cache / "prequantized" and "quantization_config" not in note
    assert note["moe_offload_source"]["format"] == qconfig.get("checkpoint_format", "awq")
    assert note["moe_offload_source"]["became"] == f"int4-g{group}" == llm.placement.expert_format
    assert note["moe_offload_source"]["requantized"] == 0 and (llm.path / "tokenizer.json").exists()

    # Weight by weight: each nibble kept, scale = s and zero = s * (8 - z) rounded to bf16, nothing else.
    fmt = ExpertFormat("int4", 64, 64, torch.float32, group)
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    worst = 0.0
    for layer in range(2):
        shard = load_file(llm.path / f"model-layer{layer:05d}.safetensors")
        packed = shard[f"model.layers.{layer}.{moe}.experts.packed"]
        for e in range(4):
            gate_up, down = fmt.dequantize(fmt.views(packed[e]), torch.float32)
            for name, mine in zip(names, (gate_up[:64], gate_up[64:], down)):
                q, s, z, g_idx = parts[f"model.layers.{layer}.{moe}.experts.{e}.{name}.weight"]
                s, z = s.float()[g_idx].T, z[g_idx].T.float()
                expect = (q - 8) * s.to(torch.bfloat16).float() + (s * (8 - z)).to(torch.bfloat16).float()
                assert torch.equal(mine, expect)
                exact = s * (q - z)
                assert ((mine - exact).abs() <= s / 16 + 1e-9).all()
                worst = max(worst, float(((mine - exact).abs() / s).max()))
    assert 0 < worst <= 1 / 16  # measured: 0.038 of a step at worst


def test_a_wider_source_group_repeats_its_scales_over_ours():
    from offload.quant import dequantize_int4
    from offload.sources.prequantized import Grouped

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    g_idx = torch.arange(256) // 128
    q, s, z = rtn(w, 128, 4, g_idx)
    nibbles, sz = Grouped(q.to(torch.uint8), s, z.to(torch.int16), g_idx, 128).as_int4(32)
    assert sz.shape == (8, 64, 2) and torch.equal(sz[0], sz[3]) and torch.equal(sz[4], sz[7])
    step = s.float()[g_idx].T
    exact = step * (q - z[g_idx].T)
    assert ((dequantize_int4(nibbles, sz, torch.float32) - exact).abs() <= step / 16).all()


def test_gptq_act_order_down_proj_is_folded_exactly_and_gate_up_requantized(model_dir, tmp_path, cache, monkeypatch):
    src = model_dir("mixtral", **SHAPE["mixtral"])
    qconfig = {**GPTQ_CONFIG, "desc_act": True}
    # down_proj (w2) in act-order only: its groups are made contiguous by reordering the expert's
    # intermediate dimension, so the model stays as exact as without act-order.
    source, ref_dir, _ = write_checkpoint(src, tmp_path / "down", "gptq", qconfig, group=32,
                                          act_order=[r"\.w2\.", r"self_attn"])
    llm, got, expected, tokens, ref_tokens = run_both(source, ref_dir, monkeypatch)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max() and tokens == ref_tokens
    note = json.loads((llm.path / "config.json").read_text())["moe_offload_source"]
    assert note["act_order_folded"] == 8 and note["requantized"] == 0
    # Everything in act-order: gate/up (groups scattered over the hidden state) are rounded again.
    source, ref_dir, _ = write_checkpoint(src, tmp_path / "all", "gptq", qconfig, group=32, act_order=[r"\."])
    llm, got, expected, tokens, ref_tokens = run_both(source, ref_dir, monkeypatch)
    note = json.loads((llm.path / "config.json").read_text())["moe_offload_source"]
    assert note["act_order_folded"] == 8 and note["requantized"] == 16
    assert (got - expected).abs().max() < 2e-2 * expected.abs().max()  # measured 8.6e-3


def test_gptq_8bit_becomes_int8(model_dir, tmp_path, cache, monkeypatch):
    src = model_dir("qwen3_moe", **SHAPE["qwen3_moe"])
    source, ref_dir, _ = write_checkpoint(src, tmp_path / "g8", "gptq", {**GPTQ_CONFIG, "bits": 8}, group=32, bits=8)
    llm, got, expected, tokens, ref_tokens = run_both(source, ref_dir, monkeypatch)
    assert llm.placement.expert_format == "int8"
    assert (got - expected).abs().max() < 3e-3 * expected.abs().max() and tokens == ref_tokens  # measured 8e-4


# ---- FP8: attention dequantized, experts to int8 ----------------------------------------------------

@pytest.mark.parametrize("family,block", [("qwen3_moe", [32, 32]), ("mixtral", [48, 48]), ("mixtral", None)])
def test_fp8_checkpoint_matches_transformers(model_dir, tmp_path, cache, monkeypatch, family, block):
    """[48, 48] blocks do not divide 64: the last row and column of blocks are partial; None: one
    `weight_scale` per tensor."""
    src = model_dir(family, **SHAPE[family])
    qconfig = {**FP8_CONFIG, "weight_block_size": block}
    source, ref_dir, _ = write_checkpoint(src, tmp_path / "fp8", "fp8", qconfig, block=block, int8_experts=True)
    llm, got, expected, tokens, ref_tokens = run_both(source, ref_dir, monkeypatch)
    assert llm.placement.expert_format == "int8"
    # The reference holds this file's int8 of the FP8 experts: what is left is float ties and order.
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max() and tokens == ref_tokens
    note = json.loads((llm.path / "config.json").read_text())["moe_offload_source"]
    assert note["format"] == "fp8" and note["became"] == "int8" and note["weight_block_size"] == block


def test_fp8_experts_in_int8_stay_close_to_the_fp8_model(model_dir, tmp_path, cache, monkeypatch):
    src = model_dir("qwen3_moe", **SHAPE["qwen3_moe"])
    source, ref_dir, _ = write_checkpoint(src, tmp_path / "fp8", "fp8", FP8_CONFIG, block=[32, 32])
    _, got, expected, _, _ = run_both(source, ref_dir, monkeypatch)
    assert (got - expected).abs().max() < 3e-3 * expected.abs().max()  # measured 8e-4: int8 on top of FP8
    # This file's FP8 layout is the one transformers' own FP8 loader reads (dequantizing on the CPU).
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    fp8_model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True,
                                                                              weight_block_size=(32, 32))).eval()
    with torch.no_grad():
        assert torch.allclose(fp8_model(torch.tensor([PROMPT])).logits, expected, atol=1e-6)


# ---- the cache, the CLI, and what is refused ---------------------------------------------------------

def test_converted_once_then_reused(model_dir, tmp_path, cache, monkeypatch, capfd):
    src = model_dir("mixtral", **SHAPE["mixtral"])
    source, _, _ = write_checkpoint(src, tmp_path / "gptq", "gptq", GPTQ_CONFIG, group=32)
    first = offload.load(source, device="cpu")
    assert "converting the GPTQ checkpoint" in capfd.readouterr().err
    import offload.sources.prequantized as pq

    monkeypatch.setattr(pq, "convert", lambda *a, **k: pytest.fail("converted twice"))
    again = offload.load(source, device="cpu")
    assert again.path == first.path and "converting" not in capfd.readouterr().err
    assert torch.equal(again.logits([PROMPT]), first.logits([PROMPT]))
    result = CliRunner().invoke(main, ["generate", str(source), "-p", "To be", "-n", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (cache / "prequantized").iterdir()) == [first.path.name]


def refused(path, config, match):
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OffloadError, match=match):
        offload.load(path, device="cpu")
    result = CliRunner().invoke(main, ["generate", str(path), "-p", "x", "-n", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output and result.output.count("error:") == 1


def test_unsupported_methods_bits_and_layouts_are_refused_clearly(model_dir, tmp_path, cache):
    src = model_dir("mixtral", **SHAPE["mixtral"])
    source, _, _ = write_checkpoint(src, tmp_path / "gptq", "gptq", GPTQ_CONFIG, group=32)
    config = json.loads((source / "config.json").read_text())
    for quantization, match in [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True},
         "'bitsandbytes', which moe-offload cannot read; it converts gptq .* awq .* fp8"),
        ({"quant_method": "compressed-tensors"}, "'compressed-tensors'"),
        ({**GPTQ_CONFIG, "bits": 3}, "3-bit weights; moe-offload converts 4-bit GPTQ"),
        ({**AWQ_CONFIG, "bits": 8}, "8-bit weights; moe-offload converts 4-bit AWQ only"),
        ({**AWQ_CONFIG, "version": "gemv"}, "packed for the 'gemv' kernels"),
        ({**GPTQ_CONFIG, "checkpoint_format": "marlin"}, "'marlin' format"),
        ({**GPTQ_CONFIG, "group_size": 16}, "groups of 16 inputs do not map onto moe-offload's int4"),
    ]:
        refused(source, {**config, "quantization_config": quantization}, match)
    # Layouts it does not read, and damage: one clear error each.
    tensors = load_file(source / "model.safetensors")
    for name, value, match in [
        ("model.layers.0.block_sparse_moe.experts.gate_up_proj.qweight", torch.zeros(8, 128, dtype=torch.int32),
         "stores routed experts as model.layers.0.block_sparse_moe.experts.gate_up_proj.qweight"),
        ("model.layers.1.block_sparse_moe.experts.2.w2.scales", torch.ones(3, 64, dtype=torch.float16),
         r"experts.2.w2: qweight gives a \[64, 64\] matrix, but scales \(3, 64\)"),
    ]:
        save_file({**tensors, name: value}, source / "model.safetensors")
        refused(source, config, match)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_an_interrupted_conversion_leaves_nothing_in_the_cache(model_dir, tmp_path, cache, monkeypatch):
    src = model_dir("mixtral", **SHAPE["mixtral"])
    source, _, _ = write_checkpoint(src, tmp_path / "awq", "awq", AWQ_CONFIG, group=32)
    import offload.sources.prequantized as pq

    real, calls = pq._expert, []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 6:  # in the second layer, after the first was written
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pq, "_expert", interrupt)
    with pytest.raises(KeyboardInterrupt):
        offload.load(source, device="cpu")
    assert not any(p.is_file() for p in cache.rglob("*")) and not any(
        p.name.startswith(".") for p in cache.rglob("*"))
    monkeypatch.setattr(pq, "_expert", real)
    assert offload.load(source, device="cpu").placement.expert_format == "int4-g32"  # and then it works
