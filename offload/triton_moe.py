"""Grouped matmuls straight from quantized experts' packed bytes (Triton), for GPUs.

    y = grouped_linear(kind, x, q, s, offs)      # x [M, K], q and s [G, ...] -> y [M, N]

computes y[rows of g] = x[rows of g] @ W_g^T for every group g in one launch, where W_g [N, K] is
slot g's int8 or int4 matrix (offload/quant.py) read as the pool holds it: `q` and `s` are the
strided [G, *shape] views of ExpertFormat.stacked_views (no copy), `offs` [G] int32 the end of
each group's rows on the device (grouped_mm's convention), read inside the kernel: no host sync.

  int8   y = s[n] * sum_k x[k] q[n, k]                      one dot per K tile, scaled at the end
  int4   y = sum over groups of g inputs of                 one dot per group of g inputs, q - 8 in
           scale[n] * sum_k x[k] (q[n, k] - 8)               [-8, 7] exact in fp16/bf16, so the weights
           + zero[n] * sum_k x[k]                            are never rounded; scales applied in fp32

Both accumulate in fp32 and write the activation dtype. Tiles: 16 rows (tl.dot's minimum; decode
has a few rows per group), 64 outputs (int4: one nibble block of 64 rows, its low and high nibbles
as two dots of 32), K by 64 (int8) or by the int4 group.

Grid: (row tiles, N / 64). Row tiles start at each group's first row and are numbered group after
group; a program finds its group by a prefix sum over the groups' tile counts, computed from `offs`
in the kernel. The host only bounds their number from M and G (min(M, M / 16 + G)), so decode
(M = top-k rows) launches about as many programs as it has tiles, and the extra ones return.

Exactness: a row's result depends only on its own values and its group's weights. A tile holds
rows of one group only (rows past the group's end are masked to 0), the tiles are aligned to the
group's first row, and nothing depends on M, G or the other groups: no split-K, no atomics, tile
sizes fixed. So a group computed alone (a stack of one, as offload/kernels.py calls it), with the
resident stack or with an offloaded pool in any slot order, gives the same bits.

The dot's input dtype is a constexpr: the activation dtype (bf16 or fp16: tensor cores; fp16 on a
T4, which has no bf16; fp32 activations get an fp32 dot without TF32) on a GPU, fp32 under Triton's
interpreter, whose tl.dot in bf16 returns garbage (fp16 and fp32 are right). Nothing else differs
between the GPU kernels and the ones the CPU tests run; gpu-marked tests check the GPU variant
against an fp32 reference.

Triton is optional: without it (or where the one-time probe fails) quantized experts keep the
dequantize path of offload/kernels.py.
"""

# No `from __future__ import annotations`: the interpreter finds constexpr parameters by their
# annotation object (tl.constexpr), which a postponed annotation would turn into a string.
import contextlib
import functools
import os
import threading
import types
import warnings

import torch

try:  # optional: where it is missing, available() says False
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - a broken install (missing CUDA libraries) is the same as none
    triton = tl = None

# Set by tests to run the kernels on the CPU through Triton's interpreter (slow: for tests only).
INTERPRET: bool = False

BLOCK_M = 16  # rows per tile: tl.dot's minimum, as decode has a few rows per group
BLOCK_N = 64  # outputs per program: int4's nibble block
INT8_BLOCK_K = 64
NUM_WARPS = 4


if tl is not None:
    # The kernels' Python sources. They are turned into Triton functions lazily by _jitted(), once
    # for the GPU and once for the interpreter: triton.jit decides between the two when it wraps a
    # function (from TRITON_INTERPRET), so a module-level decorator would fix the choice at import.
    # They call no @triton.jit function of Triton's standard library (tl.sum, tl.cumsum, tl.zeros):
    # those were wrapped when triton.language was imported, for the GPU, and the interpreter cannot
    # call them.
    # Sums go through the builtins tl.reduce and tl.associative_scan with the library's own add,
    # which the interpreter recognises and runs in numpy (or, if it is ever renamed, calls as
    # Python, slower) and which compiles as tl.sum does.
    _sum_combine = getattr(tl.standard, "_sum_combine", None)
    if _sum_combine is None:
        @triton.jit
        def _sum_combine(a, b):
            return a + b


    def _tile_rows(offs_ptr, G, t, G_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
        # Row tile t, counted over all groups -> its group g (G: past the last tile, as the grid is an
        # upper bound), its rows [BM] and which of them are the group's: a prefix sum of the groups'
        # tile counts, from offs [G] (each group's end).
        gi = tl.arange(0, G_POW2)
        ends = tl.load(offs_ptr + gi, mask=gi < G, other=0)  # [G_POW2]
        starts = tl.load(offs_ptr + gi - 1, mask=(gi > 0) & (gi < G), other=0)
        tiles = tl.where(gi < G, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        last = tl.associative_scan(tiles, 0, _sum_combine)  # one past each group's last tile
        g = tl.reduce((last <= t).to(tl.int32), 0, _sum_combine)
        here = gi == g
        tile0 = tl.reduce(tl.where(here, last - tiles, 0), 0, _sum_combine)  # the group's first tile
        start = tl.reduce(tl.where(here, starts, 0), 0, _sum_combine)
        end = tl.reduce(tl.where(here, ends, 0), 0, _sum_combine)
        rows = start + (t - tile0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        return g, rows, rows < end

    def _int4_kernel(x_ptr, q_ptr, sz_ptr, offs_ptr, y_ptr, G, N, K, stride_xm, stride_ym, stride_qg,
                     stride_sg, GROUP: tl.constexpr, G_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                     DOT: tl.constexpr, IEEE: tl.constexpr):
        # x [M, K]; q [G, N/64, K, 32] bytes (row j of a block low, j + 32 high); sz [G, K/GROUP, N, 2]
        block = tl.program_id(1)  # 64 output rows
        g, rows, live = _tile_rows(offs_ptr, G, tl.program_id(0), G_POW2, BLOCK_M)  # rows [BM]
        if g >= G:
            return  # past the last tile

        j = tl.arange(0, 32)
        n_lo = block * 64 + j  # [32]: the rows in the low nibbles; + 32 the high ones
        kk = tl.arange(0, GROUP)
        q_base = q_ptr + g.to(tl.int64) * stride_qg + block * K * 32
        sz_base = sz_ptr + g.to(tl.int64) * stride_sg
        acc_lo = tl.full((BLOCK_M, 32), 0.0, tl.float32)
        acc_hi = tl.full((BLOCK_M, 32), 0.0, tl.float32)
        for k0 in range(0, K, GROUP):  # one group of scales per step
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + kk)[None, :],
                         mask=live[:, None], other=0.0)  # [BM, GROUP]
            xsum = tl.reduce(xt.to(tl.float32), 1, _sum_combine)  # [BM]: multiplies the zeros
            xd = xt.to(DOT)
            b = tl.load(q_base + (k0 + kk)[:, None] * 32 + j[None, :])  # [GROUP, 32] bytes
            lo = ((b & 0xF).to(tl.int32) - 8).to(DOT)  # [GROUP, 32]: W^T of the low rows, q - 8
            hi = ((b >> 4).to(tl.int32) - 8).to(DOT)
            sz_row = sz_base + (k0 // GROUP) * N * 2
            s_lo = tl.load(sz_row + n_lo * 2).to(tl.float32)  # [32]
            z_lo = tl.load(sz_row + n_lo * 2 + 1).to(tl.float32)
            s_hi = tl.load(sz_row + (n_lo + 32) * 2).to(tl.float32)
            z_hi = tl.load(sz_row + (n_lo + 32) * 2 + 1).to(tl.float32)
            if IEEE:
                p_lo = tl.dot(xd, lo, input_precision="ieee")
                p_hi = tl.dot(xd, hi, input_precision="ieee")
            else:
                p_lo = tl.dot(xd, lo)  # [BM, 32] fp32
                p_hi = tl.dot(xd, hi)
            acc_lo += p_lo * s_lo[None, :] + xsum[:, None] * z_lo[None, :]
            acc_hi += p_hi * s_hi[None, :] + xsum[:, None] * z_hi[None, :]
        out = y_ptr + rows[:, None].to(tl.int64) * stride_ym
        tl.store(out + n_lo[None, :], acc_lo.to(y_ptr.dtype.element_ty), mask=live[:, None])
        tl.store(out + (n_lo + 32)[None, :], acc_hi.to(y_ptr.dtype.element_ty), mask=live[:, None])

    def _int8_kernel(x_ptr, q_ptr, s_ptr, offs_ptr, y_ptr, G, N, K, stride_xm, stride_ym, stride_qg,
                     stride_sg, G_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
        # x [M, K]; q [G, N, K] int8; s [G, N] bf16
        block = tl.program_id(1)
        g, rows, live = _tile_rows(offs_ptr, G, tl.program_id(0), G_POW2, BLOCK_M)  # rows [BM]
        if g >= G:
            return

        n = block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = n < N
        kk = tl.arange(0, BLOCK_K)
        q_base = q_ptr + g.to(tl.int64) * stride_qg
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + k[None, :],
                         mask=live[:, None] & k_ok[None, :], other=0.0).to(DOT)  # [BM, BK]
            w = tl.load(q_base + n[None, :] * K + k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0).to(DOT)  # [BK, BN]: W^T, q exact in fp16/bf16
            if IEEE:
                acc = tl.dot(xt, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w, acc)
        s = tl.load(s_ptr + g.to(tl.int64) * stride_sg + n, mask=n_ok, other=0).to(tl.float32)  # [BN]
        out = y_ptr + rows[:, None].to(tl.int64) * stride_ym + n[None, :]
        tl.store(out, (acc * s[None, :]).to(y_ptr.dtype.element_ty), mask=live[:, None] & n_ok[None, :])


@contextlib.contextmanager
def _interpret_env(on: bool):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_build_lock = threading.Lock()  # _jitted() sets the process's environment for a moment
# The interpreter patches triton.language while a kernel runs: one interpreted launch at a time.
_interpret_lock = threading.Lock()


@functools.cache
def _jitted(interpret: bool) -> dict:
    """{"int4": kernel, "int8": kernel}, compiled for the GPU or wrapped for the interpreter.

    triton.jit reads TRITON_INTERPRET when it wraps a function, so the variable is set for exactly
    that moment, either way: the process's environment decides neither (a test session can then
    run the interpreter on the CPU and the real kernels on a GPU), and no import order matters.
    Their shared helper is wrapped the same way, and each kernel is built over globals naming that
    mode's helper (an interpreted kernel cannot call a GPU-wrapped function, nor the reverse)."""
    with _build_lock, _interpret_env(interpret):
        names = dict(globals(), _tile_rows=triton.jit(_tile_rows))
        # G and the slot strides are not specialized (Triton would for values 1 or multiples of 16):
        # a group of one compiles to the grouped call's code, not only to its arithmetic.
        fixed = {"do_not_specialize": ["G", "stride_qg", "stride_sg"]}
        kernels = {kind: triton.jit(types.FunctionType(fn.__code__, names, fn.__name__), **fixed)
                   for kind, fn in (("int4", _int4_kernel), ("int8", _int8_kernel))}
    if interpret != (type(kernels["int4"]).__name__ == "InterpretedFunction"):
        raise RuntimeError("triton.jit did not follow TRITON_INTERPRET")
    return kernels


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    if interpret or dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def grouped_linear(kind: str, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows sorted by group) and group g's matrix (q[g], s[g]) -> y [M, N] in x's dtype.

    int8: q [G, N, K] int8, s [G, N]. int4: q [G, N, K/2] blocked nibbles, s = scales_and_zeros
    [G, K/g, N, 2]. offs [G] int32 on x's device: the end of each group's rows. On the CPU the
    kernels run in Triton's interpreter (tests)."""
    m, k = x.shape
    groups, n = q.shape[0], q.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if q.stride()[1:] != (q.shape[2], 1) or s.stride(-1) != 1 or (kind == "int4" and s.stride()[1:3] != (2 * n, 2)):
        raise ValueError("each slot's pieces must be contiguous (ExpertFormat.stacked_views gives them so)")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0:
        return y
    interpret = x.device.type == "cpu"
    dot = _dot_dtype(x.dtype, interpret)
    args = (x, q, s, offs, y, groups, n, k, x.stride(0), y.stride(0), q.stride(0), s.stride(0))
    options = {"G_POW2": max(16, triton.next_power_of_2(groups)), "BLOCK_M": BLOCK_M, "DOT": dot,
               "IEEE": dot == tl.float32, "num_warps": NUM_WARPS,
               "enable_fp_fusion": True}  # Triton's default until 3.10 changes it: the bits stay put
    if kind == "int4":
        group = k // s.shape[1]
        if n % BLOCK_N or k % group:
            raise ValueError(f"int4 needs N ({n}) a multiple of {BLOCK_N} and K ({k}) of the group ({group})")
        options["GROUP"] = group
    elif kind == "int8":
        options.update(BLOCK_N=BLOCK_N, BLOCK_K=INT8_BLOCK_K)
    else:
        raise ValueError(f"no Triton kernel for {kind} experts")
    # Tiles start at each group's first row: at most one per row, and at most M / 16 plus one per group.
    grid = (min(m, triton.cdiv(m, BLOCK_M) + groups), triton.cdiv(n, BLOCK_N))
    with _interpret_lock if interpret else contextlib.nullcontext():
        _jitted(interpret)[kind][grid](*args, **options)
    return y


# ---- one group: the per-expert form ----------------------------------------------------------

_ends: dict[torch.device, torch.Tensor] = {}


def one_group(n: int, device: torch.device) -> torch.Tensor:
    """offs [1] int32 = [n] on `device`, sliced from a cached arange: no host -> device copy (which
    would wait for the GPU) per expert."""
    ends = _ends.get(device)
    if ends is None or ends.numel() <= n:
        with torch.inference_mode(False):  # kept across calls, inside and outside inference mode
            ends = _ends[device] = torch.arange(max(2 * n, 1024), dtype=torch.int32, device=device)
    return ends[n:n + 1]


def linear(kind: str, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One expert's matrix (q, s as ExpertFormat.views gives them) applied to x [n, K] -> [n, N]:
    grouped_linear over a stack of one, so its bits are the grouped call's."""
    return grouped_linear(kind, x, q[None], s[None], one_group(x.shape[0], x.device))


# ---- may it run here? -----------------------------------------------------------------------

def available(device, dtype: torch.dtype = torch.float16) -> bool:
    """Whether the kernels run on `device` with `dtype` activations: Triton imports and a one-time
    probe (int4 and int8, an empty group among others) agrees with torch. On the CPU only when
    INTERPRET is set (tests)."""
    device = torch.device(device)
    if triton is None or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if device.type == "cpu":
        return INTERPRET and _probe(device, dtype)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe(device, dtype)


@functools.cache
def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Both kernels on three groups (the middle one empty) against torch's fp32 arithmetic."""
    from .quant import dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 128, 64, generator=gen) * 0.05  # [G, N, K]
    x = torch.randn(20, 64, generator=gen).to(dtype)  # [M, K]
    offs = torch.tensor([7, 7, 20], dtype=torch.int32)
    int8 = [quantize_int8(m) for m in w]
    int4 = [quantize_int4(m, 32) for m in w]
    cases = {"int8": (torch.stack([q for q, _ in int8]), torch.stack([s for _, s in int8]),
                      [dequantize_int8(q, s, torch.float32) for q, s in int8]),
             "int4": (torch.stack([pack_int4(q) for q, _ in int4]), torch.stack([sz for _, sz in int4]),
                      [dequantize_int4(q, sz, torch.float32) for q, sz in int4])}
    try:
        for kind, (q, s, dense) in cases.items():
            y = grouped_linear(kind, x.to(device), q.to(device), s.to(device), offs.to(device)).float().cpu()
            ref = torch.cat([x[:7].float() @ dense[0].T, x[7:].float() @ dense[2].T])
            if not (y - ref).abs().max() <= 2e-2 * ref.abs().max():
                raise RuntimeError(f"{kind} kernel off by {(y - ref).abs().max():.3g}")
        return True
    except Exception as e:  # noqa: BLE001 - whatever fails to compile or run: keep the fallback, and say so
        if device.type == "cuda":
            warnings.warn(f"Triton kernels for quantized experts do not run on {device} with {dtype} activations "
                          f"({type(e).__name__}: {e}); int8/int4 experts are dequantized per call instead",
                          stacklevel=2)
        return False
