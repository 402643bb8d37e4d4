"""How fast the CPU computes one routed expert, against this machine's roofline.

    python scripts/bench_cpu_experts.py [--hidden 4096 --intermediate 14336] [--threads N]

At n tokens an expert does 6*H*I*n FLOPs over 3*H*I weights. At batch 1 it
is bound by memory bandwidth (the weights stream through once), at large
batches by the matmul peak. Measured here, medians of 20: the expert as the
runtime computes it on a CPU (`offload.experts.contribution` with a
`Workspace`: no per-call allocation of the intermediates), the same without
the workspace (every intermediate allocated per call), its two matmuls alone,
a large bf16 GEMM (the practical compute peak), and a sum over 512 MiB (the
practical memory read bandwidth).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from offload.experts import Workspace, contribution, expert_ffn


def median_seconds(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    h, i = args.hidden, args.intermediate
    # Enough experts that they cannot all sit in the CPU caches: each call streams its weights from RAM.
    count = max(2, (1 << 30) // (6 * h * i * torch.empty((), dtype=dtype).element_size()))
    experts = [((torch.randn(2 * i, h) * 0.02).to(dtype), (torch.randn(h, i) * 0.02).to(dtype)) for _ in range(count)]
    weight_bytes = sum(t.numel() * t.element_size() for t in experts[0])
    turn = iter(range(1 << 62))

    def next_expert():
        return experts[next(turn) % count]

    big = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    read_bw = big.numel() * 4 / median_seconds(lambda: big.sum(), 5)  # bytes read per second
    a = torch.randn(2048, 2048).to(dtype)
    peak = 2 * 2048**3 / median_seconds(lambda: a @ a, 5) / 1e9

    print(f"threads {args.threads}, {args.dtype}, expert H={h} I={i} ({weight_bytes / 2**20:.0f} MiB, "
          f"{count} of them in rotation); "
          f"memory read bandwidth {read_bw / 1e9:.1f} GB/s, bf16 GEMM peak {peak:.0f} GFLOP/s")
    print(f"{'tokens':>6} {'runtime expert':>15} {'no workspace':>13} {'FFN alone':>13} {'GB/s of weights':>16} "
          f"{'% of read bw':>12} {'% of GEMM peak':>14}")
    workspace = Workspace("silu")
    for n in (1, 4, 16, 64, 256, 1024):
        x = torch.randn(n, h).to(dtype)
        ids = torch.zeros(n, 1, dtype=torch.long)
        w = torch.ones(n, 1, dtype=dtype)
        full = median_seconds(lambda: contribution(x, ids, w, 0, *next_expert(), F.silu, workspace))
        plain = median_seconds(lambda: contribution(x, ids, w, 0, *next_expert(), F.silu))
        bare = median_seconds(lambda: expert_ffn(x, *next_expert(), F.silu))
        flops = 6 * h * i * n / full / 1e9
        print(f"{n:6d} {flops:11.1f} GF/s {6 * h * i * n / plain / 1e9:8.1f} GF/s {6 * h * i * n / bare / 1e9:8.1f} GF/s "
              f"{weight_bytes / full / 1e9:16.1f} {100 * weight_bytes / full / read_bw:11.0f}% "
              f"{100 * flops / peak:13.0f}%")
    layouts(h, i, dtype, count)


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
