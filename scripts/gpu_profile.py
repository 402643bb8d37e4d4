"""Where a GPU decode step's time goes (torch.profiler): the top CUDA kernels of a resident decode
step (CUDA graphs off, so each kernel is seen), and, offloaded, how much of the wall time the
host -> device copies kept the link busy. Random checkpoints drawn on the GPU, as check-gpu's.

    python scripts/gpu_profile.py --dir /tmp/gc            # after `offload check-gpu --dir /tmp/gc`, reuses them
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import offload
from offload.gpucheck import SHAPES, prompt_ids
from offload.synthetic import make_synthetic, shape_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dir", default="/tmp/moe-offload-gpu-check")
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()


def checkpoint(name):
    base, overrides = SHAPES[name]
    return make_synthetic(Path(args.dir) / name, shape_config(base, **overrides), device="cuda")


def profiled(llm, steps):
    prompt = prompt_ids(llm.model.cfg.vocab_size)
    llm.generate(prompt, max_new_tokens=4)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(prompt, max_new_tokens=steps + 1)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return prof, wall


for name in ("128x8", "mixtral"):
    llm = offload.load(checkpoint(name), device="cuda")
    llm.cuda_graphs = False
    prof, wall = profiled(llm, args.steps)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"\n{name} resident, graphs off: {args.steps + 1} tokens (prompt included) in {wall * 1e3:.1f} ms wall, "
          f"{gpu:.1f} ms of kernels; top kernels by GPU time:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms  {e.count:6d}x  {e.key[:100]}")
    budget = llm.placement.resident_bytes + llm.placement.total_experts // 4 * llm.placement.expert_bytes + (256 << 20)
    llm.close()
    del llm
    torch.cuda.empty_cache()
    if name != "mixtral":
        continue
    llm = offload.load(checkpoint(name), device="cuda", gpu_memory=budget, predictor="none")
    prof, wall = profiled(llm, 4)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    copies = [e for e in events if "Memcpy HtoD" in e.name]
    busy = sum(e.device_time for e in copies) / 1e3
    other = sum(e.device_time for e in events if e not in copies) / 1e3
    print(f"\nmixtral, a quarter of the experts on the GPU, no predictor: 5 tokens in {wall * 1e3:.1f} ms wall; "
          f"host -> device copies {busy:.1f} ms ({len(copies)} copies, {busy / (wall * 1e3):.0%} of the wall), "
          f"other kernels {other:.1f} ms")
    llm.close()
