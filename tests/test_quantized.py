"""Quantized experts: the arithmetic against references computed here, the kernels against
fp32 "dequantize then matmul", transformers running the dequantized weights, offloaded runs
bit-identical to the resident run of the same quantized model, and the conversion's errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import reference

import offload
from offload.cli import main
from offload.errors import OffloadError
from offload.formats import ExpertFormat
from offload.kernels import cpu_int4_kernel_agrees, expert_kernel
from offload.quantize import quantize_model

# H and 2I multiples of 64 (int4's nibble blocks) and of every group size up to 64.
SHAPE = dict(hidden_size=64, intermediate_size=64, num_local_experts=8)
FORMATS = [("int8", 0), ("int4", 32), ("int4", 64)]


# ---- independent references: the formulas of offload/quant.py, written again ---------------

def ref_int8(w):
    """Symmetric per output row, bf16 scale: returns the dequantized matrix and the scales."""
    s = (w.abs().max(dim=1).values / 127).to(torch.bfloat16).float()
    q = (w / s[:, None]).round().clamp(-127, 127)
    return q * s[:, None], s


def ref_int4(w, g):
    """Asymmetric per group of g inputs: q in 0..15, w = (q - 8) * scale + zero, bf16 scale/zero."""
    n, k = w.shape
    blocks = w.reshape(n, k // g, g)
    lo, hi = blocks.min(dim=2).values, blocks.max(dim=2).values
    scale = ((hi - lo) / 15).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = ((blocks - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k), scale


def dequantized_reference(kind, g, gate, up, down):
    if kind == "int8":
        return [ref_int8(w)[0] for w in (gate, up, down)]
    return [ref_int4(w, g)[0] for w in (gate, up, down)]


def random_expert(h=128, i=192, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * 0.05 for shape in ((i, h), (i, h), (h, i))]


@pytest.mark.parametrize("kind,group", FORMATS + [("int4", 128)])
def test_round_trip_matches_an_independent_reference(kind, group):
    h, i = 128, 192 if group != 128 else 256
    gate, up, down = random_expert(h, i)
    fmt = ExpertFormat(kind, h, i, torch.float32, group)
    packed = fmt.views(fmt.quantize(gate, up, down))
    gate_up, down_q = fmt.dequantize(packed, torch.float32)
    got = [gate_up[:i], gate_up[i:], down_q]
    for w, mine, ref in zip((gate, up, down), got, dequantized_reference(kind, group, gate, up, down)):
        # Same formula, written twice: equal but for float ties (a rounding .5 may fall either way).
        step = (ref_int8(w)[1][:, None] if kind == "int8" else
                ref_int4(w, group)[1].repeat_interleave(group, dim=1))
        assert ((mine - ref).abs() <= 1e-6 + 1.01 * step).all()
        assert ((mine - ref).abs() > 1e-6).float().mean() < 1e-3
        assert ((mine - w).abs() <= 0.51 * step + 1e-6).all()  # within half a step of the original
    # 4 bits plus a bf16 scale and zero per group, or 8 bits plus a bf16 scale per row (and alignment).
    assert fmt.bits_per_weight == pytest.approx(4 + 32 / group if kind == "int4" else 8, abs=0.15)


@pytest.mark.skipif(not cpu_int4_kernel_agrees(), reason="this torch lacks the CPU int4 kernel")
def test_int4_nibbles_are_in_the_layout_torchs_cpu_kernel_packs():
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    from offload.quant import pack_int4, unpack_int4

    assert torch.equal(pack_int4(q.to(torch.uint8)), torch._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(unpack_int4(pack_int4(q.to(torch.uint8))), q.to(torch.uint8))


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantize_in_fp32_then_matmul(kind, group, tokens, dtype):
    h, i = 128, 192
    gate, up, down = random_expert(h, i, seed=tokens)
    fmt = ExpertFormat(kind, h, i, dtype, group)
    packed = fmt.views(fmt.quantize(gate, up, down))
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(2))
    y = expert_kernel(fmt, torch.device("cpu"), F.silu)(x.to(dtype), packed)
    wg, wu, wd = dequantized_reference(kind, group, gate, up, down)
    ref = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    assert y.dtype == dtype and y.shape == ref.shape
    # bf16 activations inside the weight-only kernels: about 3 significant digits.
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("h, i", [(32, 24), (64, 40), (96, 48)])
def test_int8_widths_the_cpu_kernel_cannot_take_are_dequantized(h, i):
    """torch's int8 kernel with bf16 activations gave NaN or garbage (or crashed) unless the reduced
    width is a multiple of 32: such experts take the dequantize path, and stay right."""
    from offload.kernels import int8_kernel_fits

    gate, up, down = random_expert(h, i, seed=3)
    fmt = ExpertFormat("int8", h, i, torch.float32)
    packed = fmt.views(fmt.quantize(gate, up, down))
    x = torch.randn(3, h, generator=torch.Generator().manual_seed(2))
    y = expert_kernel(fmt, torch.device("cpu"), F.silu)(x, packed)
    wg, wu, wd = dequantized_reference("int8", 0, gate, up, down)
    ref = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    assert int8_kernel_fits(fmt) == (h % 32 == 0 and i % 32 == 0)
    assert torch.isfinite(y).all() and (y - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, model_dir):
    """(source, {format name: quantized directory}) for a tiny Mixtral."""
    src = model_dir("mixtral", **SHAPE)
    out = {}
    for kind, group in FORMATS:
        path = tmp_path_factory.mktemp("q") / f"{kind}-{group}"
        out[f"{kind}-{group}"] = quantize_model(src, path, kind, group or None, progress=False)
    return src, out


@pytest.mark.parametrize("name", [f"{k}-{g}" for k, g in FORMATS])
@pytest.mark.parametrize("path", ["dequantize", "weight-only"])
def test_quantized_model_matches_transformers_running_the_dequantized_weights(quantized, name, path, monkeypatch):
    """Against transformers with the expert weights replaced by this file's dequantized reference.
    The dequantize path computes in fp32 and must agree tightly (far closer than the unquantized
    model does: int8 moves these logits by ~5e-4, int4 by ~8e-3); the weight-only kernels round
    activations to bf16, which costs about as much as int8 itself, so their bound is looser."""
    import offload.kernels

    if path == "dequantize":
        monkeypatch.setattr(offload.kernels, "DEQUANT_TOKENS", 1)
    src, dirs = quantized
    kind, group = name.split("-")
    ref = reference(src)
    with torch.no_grad():
        for layer in ref.model.layers:
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                i = experts.gate_up_proj.shape[1] // 2
                gate, up = experts.gate_up_proj[e, :i], experts.gate_up_proj[e, i:]
                wg, wu, wd = dequantized_reference(kind, int(group), gate, up, experts.down_proj[e])
                experts.gate_up_proj[e] = torch.cat([wg, wu])
                experts.down_proj[e] = wd
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    llm = offload.load(dirs[name], device="cpu")
    got = llm.logits(ids)
    assert (got - expected).abs().max() < (2e-5 if path == "dequantize" else 2e-3) * expected.abs().max()
    assert "lossy" in llm.describe() and llm.placement.expert_format == ExpertFormat(
        kind, 64, 64, torch.float32, int(group)).name


@pytest.mark.parametrize("name", [f"{k}-{g}" for k, g in FORMATS])
def test_every_offloaded_configuration_is_bit_identical_to_the_resident_quantized_run(quantized, name):
    path = quantized[1][name]
    prompt = [5, 9, 17, 33, 65, 129, 7, 11, 250, 3, 19, 23]
    resident = offload.load(path, device="cpu")
    per_expert = resident.placement.expert_bytes
    assert per_expert == ExpertFormat(name[:4], 64, 64, torch.float32, int(name.split("-")[1])).nbytes
    ids = torch.tensor([prompt])
    logits = resident.logits(ids)
    tokens = resident.generate(prompt, max_new_tokens=8).token_ids
    for budget, policy, predictor, split in [(4, "lru", "none", "layer"), (6, "score", "gate", "layer"),
                                             (2, "lfu", "affinity", "global"), (3, "lru", "gate", "global")]:
        llm = offload.load(path, device="cpu", cpu_memory=budget * per_expert, cache_policy=policy,
                           predictor=predictor, cache_split=split)
        assert llm.placement.mode == "offloaded" and llm.placement.device_slots == budget
        assert torch.equal(llm.logits(ids), logits)
        assert llm.generate(prompt, max_new_tokens=8).token_ids == tokens
        total = llm.stats.experts.total()
        # Every read moves one packed expert: demand misses and prefetches, in the format's bytes.
        assert total.bytes_from_disk == (total.misses + total.prefetch_issued) * per_expert > 0
        stats = llm.stats.as_dict()
        assert stats["quantized"] and stats["expert_format"] == llm.placement.expert_format
        assert stats["bytes_per_expert"] == per_expert
        llm.close()


def test_cpu_experts_beside_the_tiered_store_are_bit_identical(quantized):
    """The hybrid path (host tier, missed experts computed on the CPU worker) with int4 experts."""
    from dataclasses import replace

    from offload.engine import OffloadedExperts

    path = quantized[1]["int4-32"]
    prompt = [4, 8, 15, 16, 23, 42, 108]
    resident = offload.load(path, device="cpu")
    expected = resident.logits([prompt])
    llm = offload.load(path, device="cpu", cpu_memory=4 * resident.placement.expert_bytes)
    placement = replace(llm.placement, host_slots=6)
    calls = []

    def decide(work):
        calls.append(len(work))
        return {w.expert: ("cpu" if i % 2 else "fetch") for i, w in enumerate(work)}

    engine = OffloadedExperts(llm.checkpoint, placement, llm.device, llm.expert_format, "lru", "layer",
                              llm.stats.experts, decide=decide)
    llm.model.set_executor(engine)
    llm.experts = engine
    assert torch.equal(llm.logits([prompt]), expected)
    assert calls and llm.stats.experts.total().experts_on_cpu > 0
    engine.close()


def test_load_with_experts_quantizes_once_into_the_cache(model_dir, tmp_path, monkeypatch, capfd):
    src = model_dir("mixtral", **SHAPE)
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    first = offload.load(src, device="cpu", experts="int4")
    assert "quantizing the experts" in capfd.readouterr().err
    assert first.path.parent == tmp_path / "cache" / "quantized" and first.placement.expert_format == "int4-g32"
    import offload.quantize as q

    monkeypatch.setattr(q, "quantize_model", lambda *a, **k: pytest.fail("quantized twice"))
    again = offload.load(src, device="cpu", experts="int4")
    assert again.path == first.path and "quantizing" not in capfd.readouterr().err
    assert torch.equal(again.logits([[1, 2, 3]]), first.logits([[1, 2, 3]]))
    assert offload.load(first.path, device="cpu", experts="int4-g32").path == first.path  # already so


def test_cli_quantize_then_generate(model_dir, tmp_path):
    src = model_dir("mixtral", **SHAPE)
    out = tmp_path / "q8"
    runner = CliRunner()
    result = runner.invoke(main, ["quantize", str(src), "--bits", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["experts"] == "int8" and (out / "tokenizer.json").exists()
    result = runner.invoke(main, ["generate", str(out), "-p", "To be", "-n", "4"])
    assert result.exit_code == 0, result.output
    assert "int8 experts (quantized, lossy)" in result.output


# ---- bad input: one clear error each, nothing half-written ---------------------------------

def cli_error(args) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    return result.output


def test_quantize_refuses_bad_requests(quantized, model_dir, tmp_path):
    src, dirs = quantized
    assert "already holds int8 experts" in cli_error(["quantize", str(dirs["int8-0"]), "--bits", "4",
                                                      "--out", str(tmp_path / "a")])
    assert "--bits 3 is not built" in cli_error(["quantize", str(src), "--bits", "3", "--out", str(tmp_path / "b")])
    odd = model_dir("mixtral", hidden_size=64, intermediate_size=96)
    assert "does not divide moe_intermediate_size=96" in cli_error(
        ["quantize", str(odd), "--bits", "4", "--group-size", "64", "--out", str(tmp_path / "c")])
    assert "group size 48 is not supported" in cli_error(
        ["quantize", str(src), "--bits", "4", "--group-size", "48", "--out", str(tmp_path / "d")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    assert "already exists" in cli_error(["quantize", str(src), "--bits", "4", "--out", str(tmp_path / "full")])
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing else was written
    with pytest.raises(OffloadError, match="already holds int8 experts, not int4"):
        offload.load(dirs["int8-0"], device="cpu", experts="int4")
    with pytest.raises(OffloadError, match="is not a format"):
        offload.load(src, device="cpu", experts="int3")


def test_an_interrupted_conversion_leaves_nothing(model_dir, tmp_path, monkeypatch):
    src = model_dir("mixtral", **SHAPE)
    calls = []

    def interrupt(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args)

    real = ExpertFormat.quantize
    monkeypatch.setattr(ExpertFormat, "quantize", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, tmp_path / "out", "int4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_quantized_expert_is_refused_at_load(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quantized[1]["int4-32"], bad)
    shard = bad / "model-layer00001.safetensors"
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("experts.packed"))
    tensors[name] = tensors[name][:, :-64].contiguous()  # each expert 64 bytes short
    save_file(tensors, shard)
    with pytest.raises(OffloadError, match="expert 0 of layer 1 .* damaged or does not match"):
        offload.load(bad, device="cpu")
    with pytest.raises(OffloadError, match="damaged"):
        offload.load(bad, device="cpu", cpu_memory="1MiB")
    (bad / "config.json").write_text(json.dumps({**json.loads((bad / "config.json").read_text()),
                                                 "quantization": {"method": "gptq"}}))
    with pytest.raises(OffloadError, match="not written by `offload quantize`"):
        offload.load(bad, device="cpu")
    assert os.path.exists(bad / "config.json")


def test_mxfp4_dequantizes_as_transformers_does():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    from offload.quant import dequantize_mxfp4

    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 64, 4, 16), generator=gen, dtype=torch.uint8)  # [E, N, K/32, 16]
    scales = torch.randint(118, 134, (2, 64, 4), generator=gen, dtype=torch.uint8)  # [E, N, K/32]
    expected = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    for e in range(2):
        mine = dequantize_mxfp4(blocks[e].reshape(64, 64), scales[e], torch.float32)  # [N, K]
        assert torch.equal(mine, expected[e].T)


@pytest.mark.parametrize("kind,group", FORMATS + [("mxfp4", 0)])
def test_biases_and_a_custom_gating_reach_every_kernel(kind, group):
    """GPT-OSS-style experts: biases on both matrices and gate/up combined by a clamped GLU."""
    h, i = 128, 192
    gate, up, down = random_expert(h, i, seed=4)
    b1, b2 = torch.randn(2 * i) * 0.1, torch.randn(h) * 0.1
    fmt = ExpertFormat(kind, h, i, torch.float32, group, bias=True)
    if kind == "mxfp4":
        buf = torch.randint(0, 256, (fmt.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
        views = fmt.views(buf)
        views[1].fill_(120), views[3].fill_(121)  # E8M0 exponents: weights of a sensible size
        views[4].copy_(b1), views[5].copy_(b2)
        wg_wu, wd = fmt.dequantize(views, torch.float32)
        wg, wu = wg_wu[:i], wg_wu[i:]
    else:
        buf = fmt.quantize(gate, up, down, biases=(b1, b2))
        wg, wu, wd = dequantized_reference(kind, group, gate, up, down)
    b1, b2 = b1.to(torch.bfloat16).float(), b2.to(torch.bfloat16).float()  # stored in bf16

    def glu(g, u):
        g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
        return (u + 1) * g * torch.sigmoid(1.702 * g)

    for tokens in (1, 20):
        x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(tokens))
        y = expert_kernel(fmt, torch.device("cpu"), F.silu, glu)(x, fmt.views(buf))
        ref = F.linear(glu(F.linear(x, wg, b1[:i]), F.linear(x, wu, b1[i:])), wd, b2)
        assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_gpt_oss_expert_layout_runs_as_transformers_computes_it():
    """GPT-OSS keeps gate_up as [H, 2I] with gate and up in alternating columns, plus biases:
    read as is (transposed, interleaved) and computed like transformers' GptOssExperts."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=3,
                                       num_experts_per_tok=1, swiglu_limit=7.0)
    torch.manual_seed(0)
    experts = GptOssExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fmt = ExpertFormat("dense", 64, 32, torch.float32, bias=True, interleaved=True, transposed=True)
    buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    targets = fmt.read_targets(buf)
    e = 1
    for target, source in zip(targets, (experts.gate_up_proj[e], experts.down_proj[e],
                                        experts.gate_up_proj_bias[e], experts.down_proj_bias[e])):
        target.copy_(source.detach())  # each piece is its own extent on disk, as saved
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        kernel = expert_kernel(fmt, torch.device("cpu"), F.silu,
                               glu=lambda g, u: (u.clamp(-7.0, 7.0) + 1) * g.clamp(max=7.0)
                               * torch.sigmoid(1.702 * g.clamp(max=7.0)))
        got = kernel(x, fmt.views(buf))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
