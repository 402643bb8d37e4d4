"""How fast the CPU computes one routed expert, against this machine's roofline.

    python scripts/bench_cpu_experts.py [--hidden 4096 --intermediate 14336] [--threads N]
    python scripts/bench_cpu_experts.py --formats bf16,int8,int4 [--hidden 1024 --intermediate 3584]

At n tokens an expert does 6*H*I*n FLOPs over 3*H*I weights. At batch 1 it
is bound by memory bandwidth (the weights stream through once), at large
batches by the matmul peak. Measured here, medians of 20: the expert as the
runtime computes it (`offload.experts.contribution`, intermediates allocated
per call), the same through a preallocated `Workspace` (below: no per-call
allocation, same kernels and bits; measured slower here, so the runtime does
not use it), its two matmuls alone,
a large bf16 GEMM (the practical compute peak), and a sum over 512 MiB (the
practical memory read bandwidth).

With --formats, per expert format (bf16, int8, int4, int4-g64, ...) and
token count: the runtime's kernel (offload/kernels.py, with its switch at
DEQUANT_TOKENS), and for quantized formats both of its paths timed
interleaved (torch's weight-only kernel; dequantize then GEMM), in GB/s of
the format's own bytes and GFLOP/s, beside the bf16 roofline (what a bf16
expert could reach at best: min of read bandwidth and GEMM peak) and the
format's own. The last lines say from how many tokens per expert the
dequantize path wins: the measurement behind DEQUANT_TOKENS.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import offload.kernels as kernels
from offload.experts import contribution
from offload.formats import ExpertFormat, parse_experts
from offload.kernels import dense_ffn, expert_kernel

linear_out = torch.ops.aten.linear.out  # F.linear's own kernel, with an out= (torch.mm(out=) is slower)


class Workspace:
    """Scratch for one thread's expert calls: the gathered input [n, H], gate/up product [n, 2I],
    activation [n, I] and output [n, H] are views of one buffer kept across calls and grown when a
    call needs more: no per-call allocation, the same kernels as dense_ffn (so the same bits)."""

    def __init__(self):
        self.buffer = torch.empty(0)

    def contribution(self, hidden, ids, weights, expert, gate_up, down):
        """offload.experts.contribution for SiLU, with the intermediates in the workspace."""
        k_slot, token = torch.where(ids.T == expert)  # [n], [n]
        n, h, i = token.numel(), hidden.shape[1], down.shape[1]
        need = n * (2 * h + 3 * i)
        if self.buffer.numel() < need or self.buffer.dtype != hidden.dtype:
            self.buffer = torch.empty(need, dtype=hidden.dtype)
        x, gu, a, y = torch.split(self.buffer[:need], (n * h, n * 2 * i, n * i, n * h))
        x, gu, a, y = x.view(n, h), gu.view(n, 2 * i), a.view(n, i), y.view(n, h)
        torch.index_select(hidden, 0, token, out=x)  # [n, H]
        linear_out(x, gate_up, None, out=gu)  # [n, 2I]
        gate, up = gu.chunk(2, dim=-1)  # [n, I] each, views
        torch.mul(F.silu(gate, inplace=True), up, out=a)  # [n, I]
        linear_out(a, down, None, out=y)  # [n, H]
        return token, y * weights[token, k_slot, None]


def median_seconds(fn, repeats=20):
    return interleaved([fn], repeats)[0]


def interleaved(fns, repeats=20):
    """Median seconds of each of `fns`, called in turn (a, b, a, b, ...) so that other jobs on the
    machine slow them alike. Each timed call follows an untimed one of the same function: the first
    call after a dequantized expert's large temporaries are freed pays ~25% more in page faults (the
    heap was trimmed), which a decode loop, calling the same kernel over and over, does not."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            fn()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def machine_bounds(dtype=torch.bfloat16) -> tuple[float, float]:
    """(memory read bandwidth in bytes/s, GEMM peak in FLOP/s) as measured here."""
    big = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    read_bw = big.numel() * 4 / median_seconds(lambda: big.sum(), 5)  # bytes read per second
    a = torch.randn(2048, 2048).to(dtype)
    peak = 2 * 2048**3 / median_seconds(lambda: a @ a, 5)
    return read_bw, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--formats", default=None,
                        help="comma-separated expert formats to compare (bf16, int8, int4, int4-g64, ...)")
    parser.add_argument("--tokens", default=None, help="comma-separated tokens per expert "
                        "(default 1,4,16,64,256,1024; with --formats 1,2,4,8,16,32,64,128,256,1024)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.formats:
        tokens = [int(t) for t in (args.tokens or "1,2,4,8,16,32,64,128,256,1024").split(",")]
        formats_table(args.hidden, args.intermediate, args.formats.split(","), tokens, args.repeats, args.threads)
        return
    dtype = getattr(torch, args.dtype)
    h, i = args.hidden, args.intermediate
    # Enough experts that they cannot all sit in the CPU caches: each call streams its weights from RAM.
    count = max(2, (1 << 30) // (6 * h * i * torch.empty((), dtype=dtype).element_size()))
    experts = [((torch.randn(2 * i, h) * 0.02).to(dtype), (torch.randn(h, i) * 0.02).to(dtype)) for _ in range(count)]
    weight_bytes = sum(t.numel() * t.element_size() for t in experts[0])
    turn = iter(range(1 << 62))

    def next_expert():
        return experts[next(turn) % count]

    read_bw, peak = machine_bounds(dtype)
    peak /= 1e9

    print(f"threads {args.threads}, {args.dtype}, expert H={h} I={i} ({weight_bytes / 2**20:.0f} MiB, "
          f"{count} of them in rotation); "
          f"memory read bandwidth {read_bw / 1e9:.1f} GB/s, bf16 GEMM peak {peak:.0f} GFLOP/s")
    print(f"{'tokens':>6} {'runtime expert':>15} {'workspace':>13} {'FFN alone':>13} {'GB/s of weights':>16} "
          f"{'% of read bw':>12} {'% of GEMM peak':>14}")
    workspace = Workspace()
    kernel = expert_kernel(ExpertFormat("dense", h, i, dtype), torch.device("cpu"), F.silu)
    tokens = [int(t) for t in (args.tokens or "1,4,16,64,256,1024").split(",")]
    for n in tokens:
        x = torch.randn(n, h).to(dtype)
        ids = torch.zeros(n, 1, dtype=torch.long)
        w = torch.ones(n, 1, dtype=dtype)
        e = next_expert()
        assert all(torch.equal(p, q) for p, q in zip(workspace.contribution(x, ids, w, 0, *e),
                                                      contribution(x, ids, w, 0, e, kernel)))
        full, reused, bare = interleaved([
            lambda: contribution(x, ids, w, 0, next_expert(), kernel),
            lambda: workspace.contribution(x, ids, w, 0, *next_expert()),
            lambda: dense_ffn(x, *next_expert(), F.silu)], args.repeats)
        flops = 6 * h * i * n / full / 1e9
        print(f"{n:6d} {flops:11.1f} GF/s {6 * h * i * n / reused / 1e9:8.1f} GF/s {6 * h * i * n / bare / 1e9:8.1f} GF/s "
              f"{weight_bytes / full / 1e9:16.1f} {100 * weight_bytes / full / read_bw:11.0f}% "
              f"{100 * flops / peak:13.0f}%")
    layouts(h, i, dtype, count)


FORMAT_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def expert_format(name: str, h: int, i: int) -> ExpertFormat:
    """"bf16" / "fp32" / "int8" / "int4" / "int4-g64" -> the format at this shape (quantized: bf16 compute)."""
    if name in FORMAT_NAMES:
        return ExpertFormat("dense", h, i, FORMAT_NAMES[name])
    kind, group = parse_experts(name)
    return ExpertFormat(kind, h, i, torch.bfloat16, group)


def rotation(fmt: ExpertFormat, budget: int = 1 << 30, distinct: int = 4) -> list[tuple]:
    """Enough experts in `fmt` to fill `budget` bytes (none stays in the CPU caches between its
    calls): `distinct` quantized ones, each cloned into fresh memory until the budget is full."""
    gen = torch.Generator().manual_seed(0)
    h, i = fmt.hidden, fmt.width
    made = [fmt.quantize(*(torch.randn(*shape, generator=gen) * 0.02 for shape in ((i, h), (i, h), (h, i))))
            for _ in range(distinct)]
    count = max(distinct, budget // fmt.nbytes)
    return [fmt.views(made[k % distinct].clone()) for k in range(count)]


def crossover(tokens: list[int], weight_only: list[float], dequant: list[float]) -> int | None:
    """The smallest token count from which the dequantize path is faster at every larger count
    measured (None: the weight-only kernel wins throughout)."""
    best = None
    for n, w, d in reversed(list(zip(tokens, weight_only, dequant))):
        if d < w:
            best = n
        else:
            break
    return best


def formats_table(h: int, i: int, names: list[str], tokens: list[int], repeats: int, threads: int) -> dict:
    """Per format and token count: the runtime kernel, and for quantized formats its two paths."""
    cpu = torch.device("cpu")
    read_bw, peak = machine_bounds()
    dense_bytes = 3 * h * i * 2
    print(f"threads {threads}, expert H={h} I={i}; memory read bandwidth {read_bw / 1e9:.1f} GB/s, bf16 GEMM "
          f"peak {peak / 1e9:.0f} GFLOP/s; kernels switch to dequantize+GEMM at DEQUANT_TOKENS="
          f"{kernels.DEQUANT_TOKENS} tokens per expert; medians of {repeats}, paths interleaved")
    print("roofline GF/s: the best a bf16 expert (and one in the format's own bytes) could reach: "
          "6*H*I*n FLOPs / max(bytes / read bandwidth, FLOPs / GEMM peak)")
    found = {}
    for name in names:
        fmt = expert_format(name, h, i)
        experts = rotation(fmt)
        turn = iter(range(1 << 62))

        def nxt():
            return experts[next(turn) % len(experts)]

        runtime = expert_kernel(fmt, cpu, F.silu)
        print(f"\n{fmt.name}: {fmt.nbytes / 2**20:.2f} MiB per expert ({fmt.bits_per_weight:.2f} bits/weight), "
              f"{len(experts)} in rotation")
        head = f"{'tokens':>6} {'runtime ms':>10} {'GB/s':>6} {'GF/s':>7}"
        if fmt.quantized:
            head += f" {'weight-only ms':>14} {'dequant ms':>10} {'faster':>11}"
        print(head + f" {'bf16 roofline':>13} {'own roofline':>12}")
        wo_times, dq_times = [], []
        for n in tokens:
            x = torch.randn(n, h).to(torch.bfloat16)
            flops = 6 * h * i * n
            fns = [lambda: runtime(x, nxt())]
            if fmt.quantized:
                fns += [lambda: _forced(runtime, x, nxt(), 1 << 30), lambda: _forced(runtime, x, nxt(), 0)]
            times = interleaved(fns, repeats)
            t = times[0]
            line = f"{n:6d} {t * 1e3:10.3f} {fmt.nbytes / t / 1e9:6.1f} {flops / t / 1e9:7.1f}"
            if fmt.quantized:
                wo, dq = times[1:]
                wo_times.append(wo)
                dq_times.append(dq)
                line += f" {wo * 1e3:14.3f} {dq * 1e3:10.3f} {'dequant' if dq < wo else 'weight-only':>11}"
            roof = lambda nbytes: flops / max(nbytes / read_bw, flops / peak) / 1e9  # noqa: E731
            print(line + f" {roof(dense_bytes):13.1f} {roof(fmt.nbytes):12.1f}")
        if fmt.quantized:
            found[fmt.name] = crossover(tokens, wo_times, dq_times)
        experts = None  # free this format's rotation before the next one is made
    for name, n in found.items():
        print(f"{name}: dequantize+GEMM beats the weight-only kernel from "
              + (f"{n} tokens per expert on" if n else f"no token count measured (up to {tokens[-1]})"))
    return found


def _forced(kernel, x, packed, threshold: int):
    """The runtime kernel with its switch moved: 1 << 30 forces the weight-only path, 0 the dequantize one."""
    saved, kernels.DEQUANT_TOKENS = kernels.DEQUANT_TOKENS, threshold
    try:
        return kernel(x, packed)
    finally:
        kernels.DEQUANT_TOKENS = saved


def layouts(h: int, i: int, dtype, count: int):
    """At 1 token, the same gate_up matvec over the weight layouts a CPU path could keep."""
    w = [(torch.randn(2 * i, h) * 0.02).to(dtype) for _ in range(count)]
    wt = [m.t().contiguous() for m in w]
    x = torch.randn(1, h).to(dtype)
    out = torch.empty(1, 2 * i, dtype=dtype)
    turn = iter(range(1 << 62))
    pick = lambda: next(turn) % count  # noqa: E731
    ways = {
        "F.linear, W [2I, H] (the runtime's)": lambda: F.linear(x, w[pick()]),
        "same, into a preallocated out=": lambda: torch.mm(x, w[pick()].t(), out=out),
        "x @ W^T, W^T [H, 2I] contiguous": lambda: torch.mm(x, wt[pick()]),
        "torch.mv(W, x)": lambda: torch.mv(w[pick()], x[0]),
    }
    nbytes = w[0].numel() * w[0].element_size()
    print("\ngate_up matvec at 1 token, by weight layout:")
    for name, fn in ways.items():
        print(f"  {name:38} {nbytes / median_seconds(fn, 40) / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
