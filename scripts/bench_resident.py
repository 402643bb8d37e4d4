"""Resident CPU decode speed of whichever `offload` is imported, on a random checkpoint of a shipped
shape (made once), for one or more load options, interleaved round by round; medians.

    python scripts/bench_resident.py                                  # 4-layer Qwen3-30B-A3B: 128 experts, top-8
    python scripts/bench_resident.py --model /tmp/moe-offload-synthetic \\
        --configs "" "experts=int4" "experts=int4,dense=int8"       # the 2.2 GB synthetic Mixtral
    PYTHONPATH=/tmp/old python scripts/bench_resident.py              # another build (a folder holding its offload/)

Prints one line per configuration: median decode tok/s, each round's, and the ratio to the first."""

import argparse
import statistics

import torch

import offload
from offload.synthetic import make_synthetic, shape_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", default="qwen3-30b-a3b")
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--model", default=None, help="an existing checkpoint instead of a shape")
parser.add_argument("--configs", nargs="+", default=[""], help='load options, e.g. "experts=int4,dense=int8"')
parser.add_argument("--tokens", type=int, default=16)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
path = args.model or make_synthetic(f"/tmp/moe-offload-{args.shape}-{args.layers}l",
                                    shape_config(args.shape, num_hidden_layers=args.layers))
configs = [dict(kv.split("=", 1) for kv in c.split(",") if kv) for c in args.configs]
runtimes = [offload.load(path, device="cpu", threads=args.threads, **c) for c in configs]
prompt = torch.randint(3, 30000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
for llm in runtimes:
    llm.generate(prompt, max_new_tokens=4)  # warm-up
speeds = [[] for _ in runtimes]
for _ in range(args.rounds):
    for llm, runs in zip(runtimes, speeds):
        runs.append(llm.generate(prompt, max_new_tokens=args.tokens).stats.tokens_per_second)
base = statistics.median(speeds[0])
print(f"{path}; build {offload.__file__}; {torch.get_num_threads()} threads; {args.tokens} new tokens, "
      f"median of {args.rounds} interleaved rounds")
for config, runs in zip(args.configs, speeds):
    median = statistics.median(runs)
    print(f"{config or 'as stored':28} {median:7.2f} tok/s  x{median / base:.2f}  runs {[round(r, 2) for r in runs]}")
