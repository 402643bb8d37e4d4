"""The Triton kernels for quantized experts (offload/triton_moe.py), run here on the CPU through
Triton's interpreter: against a reference dequantized in this file from the raw bytes, a group's
bits independent of the other groups and of the slot order, and a quantized model with the kernels
forced: resident and offloaded runs bit-identical and close to transformers on the dequantized
weights. The GPU variant (the dot in bf16/fp16 instead of fp32) is checked by the gpu-marked tests."""

import pytest
import torch
import torch.nn.functional as F
from conftest import reference
from test_quantized import SHAPE, dequantized_reference

import offload
import offload.grouped as grouped
import offload.triton_moe as triton_moe
from offload.formats import ExpertFormat
from offload.grouped import grouped_kernel
from offload.kernels import expert_kernel, kernel_name
from offload.quantize import quantize_model

triton = pytest.importorskip("triton")  # in the test extra; without it quantized experts keep the dequantize path

FORMATS = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
# Rows per group: empty groups (first, middle, last), one row, more rows than one 16-row tile.
SIZES = [0, 1, 21, 0, 3, 16, 0]
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(triton_moe, "INTERPRET", True)


# ---- the reference: dequantized here, from the bytes -----------------------------------------

def weights_of(fmt, pool, slot, matrix):
    """Slot `slot`'s matrix 0 (gate_up [2I, H]) or 1 (down [H, I]) in fp32, from the raw bytes."""
    q, s = fmt.views(pool[slot])[2 * matrix:2 * matrix + 2]
    if fmt.kind == "int8":
        return q.float() * s.float()[:, None]
    n, k = q.shape[0], 2 * q.shape[1]
    b = q.reshape(n // 64, k, 32).int()  # [N/64, K, 32]: byte j holds row j (low) and j + 32 (high)
    nibbles = torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(n, k).float()  # [N, K]
    group = k // s.shape[0]
    scale = s[..., 0].float().T.repeat_interleave(group, dim=1)  # [N, K]
    zero = s[..., 1].float().T.repeat_interleave(group, dim=1)
    return (nibbles - 8) * scale + zero


def random_pool(fmt, slots, seed=0):
    """uint8 [S, nbytes]: random nibbles / int8 values, and sane scales (and zeros)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (slots, fmt.nbytes), dtype=torch.uint8, generator=g)
    for piece in fmt.stacked_views(pool):
        if piece.dtype == torch.int8:
            piece.clamp_(-127, 127)
        elif piece.dtype == torch.bfloat16 and fmt.kind == "int8":
            piece.copy_(torch.rand(piece.shape, generator=g) * 0.01 + 0.001)
        elif piece.dtype == torch.bfloat16:  # [S, K/g, N, 2]: scale, zero
            piece[..., 0].copy_(torch.rand(piece.shape[:-1], generator=g) * 0.01 + 0.001)
            piece[..., 1].copy_(torch.randn(piece.shape[:-1], generator=g) * 0.02)
    return pool


def offsets(sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_weights_dequantized_here_in_fp32(interpret, kind, group, dtype):
    """Every group's rows against its own slot's matrix, dequantized by this file from the bytes.
    fp32 activations: the kernel's dot is fp32 too, so only the summation order differs (1e-5 of
    the largest output); bf16 ones: the output is rounded to bf16 as well, by the interpreter
    towards zero (one bf16 step, 2^-7 of each value; a GPU rounds to nearest)."""
    h, i = 128, 64 if group != 128 else 128
    fmt = ExpertFormat(kind, h, i, dtype, group)
    pool = random_pool(fmt, len(SIZES))
    pieces = fmt.stacked_views(pool)
    x = torch.randn(sum(SIZES), h, generator=torch.Generator().manual_seed(1)).to(dtype)
    offs = offsets(SIZES)
    for matrix, (q, s) in enumerate([pieces[0:2], pieces[2:4]]):
        k = q.shape[2] * (2 if kind == "int4" else 1)
        xs = x[:, :k]
        y = triton_moe.grouped_linear(kind, xs, q, s, offs)
        assert y.dtype == dtype and y.shape == (sum(SIZES), q.shape[1])
        ref = torch.empty(y.shape)
        start = 0
        for slot, end in enumerate(offs.tolist()):
            ref[start:end] = xs[start:end].float() @ weights_of(fmt, pool, slot, matrix).T
            start = end
        err = (y.float() - ref).abs()
        bound = 1e-5 * ref.abs().max() + (2 ** -7 * ref.abs() if dtype == torch.bfloat16 else 0)
        assert (err <= bound).all(), f"matrix {matrix}: {err.max()}"


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_groups_bits_do_not_depend_on_the_other_groups_or_the_slot_order(interpret, kind, group, dtype):
    """The same rows give the same bits: all groups in one call, each group alone (a stack of one, as
    kernels.py and GroupedKernel.group call it), and the experts in another pool, other slots,
    other neighbours (an offloaded layer)."""
    h = i = 128
    fmt = ExpertFormat(kind, h, i, dtype, group)
    pool = random_pool(fmt, len(SIZES), seed=2)
    x = torch.randn(sum(SIZES), h, generator=torch.Generator().manual_seed(3)).to(dtype)
    ends = offsets(SIZES).tolist()
    q, s = fmt.stacked_views(pool)[:2]
    everything = triton_moe.grouped_linear(kind, x, q, s, offsets(SIZES))
    starts = [0] + ends[:-1]
    for slot, (a, b) in enumerate(zip(starts, ends)):
        alone = triton_moe.linear(kind, x[a:b], *fmt.views(pool[slot])[:2])
        assert torch.equal(alone, everything[a:b]), f"group {slot}"
    # Another pool of 9 slots: experts 2, 4 and 5 (21, 3 and 16 rows) in slots 7, 0 and 3, other
    # experts' bytes elsewhere, their rows in slot order.
    other = random_pool(fmt, 9, seed=4)
    place = {7: 2, 0: 4, 3: 5}
    for slot, expert in place.items():
        other[slot] = pool[expert]
    sizes = [SIZES[place[slot]] if slot in place else 0 for slot in range(9)]
    rows = torch.cat([x[starts[place[slot]]:ends[place[slot]]] for slot in sorted(place)])
    q2, s2 = fmt.stacked_views(other)[:2]
    y = triton_moe.grouped_linear(kind, rows, q2, s2, offsets(sizes))
    expected = torch.cat([everything[starts[place[slot]]:ends[place[slot]]] for slot in sorted(place)])
    assert torch.equal(y, expected)


def test_quantized_formats_without_biases_run_fused_only_where_the_kernels_run(interpret, monkeypatch):
    cpu = torch.device("cpu")
    for fmt, fused in [(ExpertFormat("int8", 64, 64, torch.float32), True),
                       (ExpertFormat("int4", 64, 64, torch.bfloat16, 32), True),
                       (ExpertFormat("int4", 64, 64, torch.float32, 32, bias=True), False),
                       (ExpertFormat("mxfp4", 64, 64, torch.float32, bias=True, interleaved=True), False)]:
        kernel = expert_kernel(fmt, cpu, F.silu)
        assert grouped_kernel(fmt, cpu, kernel, F.silu).fused == fused, fmt.name
        assert "Triton" not in kernel_name(fmt, cpu)  # the CPU's per-expert kernels are unchanged
    fmt = ExpertFormat("int4", 64, 64, torch.float32, 32)
    monkeypatch.setattr(grouped, "FUSED", False)
    assert not grouped_kernel(fmt, cpu, expert_kernel(fmt, cpu, F.silu), F.silu).fused
    monkeypatch.setattr(triton_moe, "INTERPRET", False)
    monkeypatch.setattr(grouped, "FUSED", None)
    assert not grouped_kernel(fmt, cpu, expert_kernel(fmt, cpu, F.silu), F.silu).fused
    assert not triton_moe.available(cpu)


# ---- a whole quantized model with the kernels ------------------------------------------------

MODEL_FORMATS = [("int8", 0), ("int4", 32), ("int4", 64)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, model_dir):
    src = model_dir("mixtral", **SHAPE)
    return src, {f"{k}-{g}": quantize_model(src, tmp_path_factory.mktemp("q") / f"{k}-{g}", k, g or None,
                                            progress=False) for k, g in MODEL_FORMATS}


def dequantized_transformers(src, kind, group):
    """transformers' Mixtral with every expert replaced by test_quantized's dequantized reference."""
    ref = reference(src)
    with torch.no_grad():
        for layer in ref.model.layers:
            experts = layer.mlp.experts
            i = experts.gate_up_proj.shape[1] // 2
            for e in range(experts.gate_up_proj.shape[0]):
                gate, up = experts.gate_up_proj[e, :i], experts.gate_up_proj[e, i:]
                wg, wu, wd = dequantized_reference(kind, group, gate, up, experts.down_proj[e])
                experts.gate_up_proj[e] = torch.cat([wg, wu])
                experts.down_proj[e] = wd
    return ref


@pytest.mark.parametrize("name", [f"{k}-{g}" for k, g in MODEL_FORMATS])
def test_a_quantized_model_on_the_kernels_resident_and_offloaded_bit_for_bit(quantized, name, interpret):
    """Resident: one grouped call per matmul over the layer's stack. Offloaded (2 to 6 slots): the
    slot pool in another order, with other neighbours, or experts one by one while others are read.
    The kernels compute "dequantize in fp32, then matmul" up to the summation order, so the logits
    agree with transformers on the dequantized weights as tightly as the fp32 dequantize path does."""
    src, dirs = quantized
    kind, group = name.split("-")
    prompt = [5, 9, 17, 33, 65, 129, 7, 11, 250, 3, 19, 23]
    ids = torch.tensor([prompt])
    resident = offload.load(dirs[name], device="cpu")
    assert resident.experts.grouped.fused
    logits = resident.logits(ids)
    with torch.no_grad():
        expected = dequantized_transformers(src, kind, int(group))(ids).logits
    assert (logits - expected).abs().max() < 2e-5 * expected.abs().max()
    tokens = resident.generate(prompt, max_new_tokens=6).token_ids
    per_expert = resident.placement.expert_bytes
    for slots, policy, predictor in [(2, "lru", "none"), (6, "score", "gate")]:
        llm = offload.load(dirs[name], device="cpu", cpu_memory=slots * per_expert, cache_policy=policy,
                           predictor=predictor)
        assert llm.placement.mode == "offloaded" and llm.experts.grouped.fused
        assert torch.equal(llm.logits(ids), logits)
        assert llm.generate(prompt, max_new_tokens=6).token_ids == tokens
        llm.close()


# ---- on a GPU: the variant with the dot in bf16 / fp16 --------------------------------------

@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("capability, dtype", [(75, torch.float16), (80, torch.bfloat16), (90, torch.float16)])
def test_the_gpu_kernels_compile_without_a_gpu(kind, capability, dtype, tmp_path, monkeypatch):
    """The GPU variant compiled to PTX for a T4 (sm75, fp16) and for sm80/sm90, with Triton's own
    ptxas (no GPU needed): tensor-core mma from sm80 on (Triton 3.9 lowers an fp16 dot on sm75 to
    fp32 FMAs). Skipped where this Triton's ahead-of-time API differs."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time API")
    import triton.language as tl

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton_moe._jitted(False)[kind]
    element = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    pointers = {"x_ptr": f"*{element}", "y_ptr": f"*{element}", "offs_ptr": "*i32", "q_ptr": "*u8" if kind == "int4"
                else "*i8", "sz_ptr": "*bf16", "s_ptr": "*bf16"}
    constants = {"G_POW2": 16, "BLOCK_M": 16, "DOT": triton_moe._dot_dtype(dtype, False), "IEEE": False, "GROUP": 32,
                 "BLOCK_N": 64, "BLOCK_K": 64}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names}
    constexprs = {(i,): constants[name] for i, name in enumerate(kernel.arg_names) if name in constants}
    try:
        source = ASTSource(kernel, signature, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": 4, "enable_fp_fusion": True})
    except (TypeError, KeyError, AttributeError) as e:  # another Triton's internals
        pytest.skip(f"this Triton's ahead-of-time API differs: {e}")
    except RuntimeError as e:
        if "ptxas" not in str(e):
            raise
        pytest.skip(f"no ptxas: {e}")
    assert constants["DOT"] in (tl.bfloat16, tl.float16) and compiled.asm["ptx"]
    if capability >= 80:
        assert "mma" in compiled.asm["ptx"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_gpu)])
def test_gpu_kernels_match_the_fp32_reference_and_keep_a_groups_bits(device, kind, group, dtype):
    """The real-GPU kernels differ from the interpreted ones only in the dot's input dtype (the
    activations', for tensor cores): x is already in it and q - 8 or q is exact in it, so the error
    is fp32 accumulation plus the output's rounding (2^-8 of each value for bf16, 2^-11 for fp16)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    dev = torch.device(device)
    assert triton_moe.available(dev, dtype)
    h, i = 256, 128
    fmt = ExpertFormat(kind, h, i, dtype, group)
    pool = random_pool(fmt, len(SIZES))
    x = torch.randn(sum(SIZES), h, generator=torch.Generator().manual_seed(1)).to(dtype)
    q, s = fmt.stacked_views(pool.to(dev))[:2]
    y = triton_moe.grouped_linear(kind, x.to(dev), q, s, offsets(SIZES).to(dev))
    ref = torch.empty(y.shape)
    ends = offsets(SIZES).tolist()
    for slot, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
        ref[a:b] = x[a:b].float() @ weights_of(fmt, pool, slot, 0).T
        if b > a:  # a group alone: the same bits
            alone = triton_moe.linear(kind, x[a:b].to(dev), *fmt.views(pool[slot].to(dev))[:2])
            assert torch.equal(alone, y[a:b])
    rounding = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert ((y.float().cpu() - ref).abs() <= 1e-4 * ref.abs().max() + rounding * ref.abs()).all()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_gpu)])
def test_gpu_quantized_model_resident_and_offloaded_bit_for_bit(quantized, device):
    path = quantized[1]["int4-32"]
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(7))
    resident = offload.load(path, device=device)
    assert resident.experts.grouped.fused and "Triton int4 kernel" in resident.describe()
    per_expert = resident.placement.expert_bytes
    llm = offload.load(path, device=device, gpu_memory=resident.placement.resident_bytes + 6 * per_expert,
                       cpu_memory=8 * per_expert)
    assert llm.placement.mode == "offloaded" and llm.experts.grouped.fused
    assert torch.equal(llm.logits(ids), resident.logits(ids))
    prompt = [1, 30, 31, 32, 33, 34]
    assert llm.generate(prompt, max_new_tokens=8).token_ids == resident.generate(prompt, max_new_tokens=8).token_ids
