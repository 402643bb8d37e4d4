"""CPU benchmark of the offloaded engine on a synthetic Mixtral-shaped model.

    python scripts/bench_cpu.py [--dir /tmp/moe-offload-synthetic] [--layers 12]

Writes a random Mixtral-shaped checkpoint (12 layers x 8 experts of
1024x3584 in bf16, about 2.2 GB) once, then runs `offload bench` on it:
(a) resident, (b) a RAM cache of half the experts with the checkpoint in the
page cache, (c) a RAM cache of a quarter inside a cgroup memory limit so the
rest really comes from disk; (b) and (c) without and with gate prefetching. Needs root for the cgroup (as here); without it
(c) runs unconfined and says so.
"""

import argparse
import json
from dataclasses import asdict

from offload.bench import bench, make_synthetic_mixtral


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/moe-offload-synthetic", help="where the synthetic model lives")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predictors", default="none,gate", help="predictors for the offloaded cases")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    path = make_synthetic_mixtral(args.dir, layers=args.layers)
    results = bench(str(path), "cpu", args.prompt_tokens, args.new_tokens, args.repeats,
                    tuple(args.predictors.split(",")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()
