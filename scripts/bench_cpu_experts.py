"""How fast the CPU computes one routed expert, against this machine's roofline.

    python scripts/bench_cpu_experts.py [--hidden 4096 --intermediate 14336] [--threads N]

At n tokens an expert does 6*H*I*n FLOPs over 3*H*I weights. At batch 1 it
is bound by memory bandwidth (the weights stream through once), at large
batches by the matmul peak. Measured here, medians of 20: the expert as the
runtime computes it (`offload.experts.contribution`, intermediates allocated
per call), the same through a preallocated `Workspace` (below: no per-call
allocation, same kernels and bits; measured slower here, so the runtime does
not use it), its two matmuls alone,
a large bf16 GEMM (the practical compute peak), and a sum over 512 MiB (the
practical memory read bandwidth).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from offload.experts import contribution, expert_ffn

linear_out = torch.ops.aten.linear.out  # F.linear's own kernel, with an out= (torch.mm(out=) is slower)


class Workspace:
    """Scratch for one thread's expert calls: the gathered input [n, H], gate/up product [n, 2I],
    activation [n, I] and output [n, H] are views of one buffer kept across calls and grown when a
    call needs more: no per-call allocation, the same kernels as expert_ffn (so the same bits)."""

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
    print(f"{'tokens':>6} {'runtime expert':>15} {'workspace':>13} {'FFN alone':>13} {'GB/s of weights':>16} "
          f"{'% of read bw':>12} {'% of GEMM peak':>14}")
    workspace = Workspace()
    for n in (1, 4, 16, 64, 256, 1024):
        x = torch.randn(n, h).to(dtype)
        ids = torch.zeros(n, 1, dtype=torch.long)
        w = torch.ones(n, 1, dtype=dtype)
        full = median_seconds(lambda: contribution(x, ids, w, 0, *next_expert(), F.silu))
        e = next_expert()
        assert all(torch.equal(p, q) for p, q in zip(workspace.contribution(x, ids, w, 0, *e),
                                                      contribution(x, ids, w, 0, *e, F.silu)))
        reused = median_seconds(lambda: workspace.contribution(x, ids, w, 0, *next_expert()))
        bare = median_seconds(lambda: expert_ffn(x, *next_expert(), F.silu))
        flops = 6 * h * i * n / full / 1e9
        print(f"{n:6d} {flops:11.1f} GF/s {6 * h * i * n / reused / 1e9:8.1f} GF/s {6 * h * i * n / bare / 1e9:8.1f} GF/s "
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
