"""Resident CPU decode speed of whichever `offload` is imported, on a random checkpoint of a shipped
shape (made once): for comparing builds, e.g. the per-expert loop against the grouped rows.

    python scripts/bench_resident.py                      # 4-layer Qwen3-30B-A3B shape: 128 experts, top-8
    PYTHONPATH=/tmp/old python scripts/bench_resident.py  # another build (a folder holding its offload/)

Prints one JSON line: the build, the median decode tok/s and each run."""

import argparse
import json
import statistics

import torch

import offload
from offload.synthetic import make_synthetic, shape_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", default="qwen3-30b-a3b")
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--dir", default=None, help="where the checkpoint goes (default /tmp/moe-offload-<shape>-<layers>l)")
parser.add_argument("--tokens", type=int, default=16)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
path = make_synthetic(args.dir or f"/tmp/moe-offload-{args.shape}-{args.layers}l",
                      shape_config(args.shape, num_hidden_layers=args.layers))
llm = offload.load(path, device="cpu")
prompt = torch.randint(3, 30000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
llm.generate(prompt, max_new_tokens=4)  # warm-up
speeds = [llm.generate(prompt, max_new_tokens=args.tokens).stats.tokens_per_second for _ in range(args.repeats)]
print(json.dumps({"build": offload.__file__, "median": round(statistics.median(speeds), 2),
                  "runs": [round(s, 2) for s in speeds], "threads": torch.get_num_threads()}))
