"""Cold-read speed of one expert at a time, three ways, to justify reading the
checkpoint's own safetensors instead of keeping a per-expert packed copy.

    python scripts/bench_reader.py [--dir /tmp/moe-offload-synthetic]

(writes the synthetic model of scripts/bench_cpu.py first if it is missing)
(1) three preads, one per matrix; (2) the runtime's reader: one preadv
scattering the expert's adjacent bytes into its slot; (3) one contiguous
pread of the same bytes, what a packed copy would cost. The page cache is
dropped before each pass; medians of 5 interleaved passes.
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch

from offload.bench import make_synthetic_mixtral
from offload.cache.store import drop_from_page_cache
from offload.cache.store import ExpertReader, SlotPool
from offload.checkpoint import Checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/moe-offload-synthetic")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ckpt = Checkpoint(make_synthetic_mixtral(args.dir))
    cfg, files = ckpt.config, ckpt.shard_files()
    if ckpt.expert_format.quantized:
        raise SystemExit(f"{args.dir} holds {ckpt.expert_format.name} experts, already one extent each: "
                         "nothing to compare; point --dir at an unquantized checkpoint")
    reader = ExpertReader(ckpt.expert_extents, files)
    pool = SlotPool(1, ckpt.expert_format, torch.device("cpu"))
    keys = [(layer, e) for layer in range(0, cfg.num_layers, 2) for e in (1, 5, 6)]
    packed = np.empty(pool.nbytes, dtype=np.uint8)

    def three(layer, e):
        for extent, dst in zip(ckpt.expert_extents(layer, e), pool.targets(0)):  # gate, up, down
            reader._read(extent, dst)

    def contiguous(layer, e):
        extents = ckpt.expert_extents(layer, e)
        os.preadv(reader.fds[extents[0].file], [packed], min(x.offset for x in extents))

    ways = {"three preads": three, "runtime reader (one preadv)": lambda l, e: reader.read(l, e, pool.targets(0)),
            "packed copy (one pread)": contiguous}
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, read in ways.items():
            drop_from_page_cache(files)
            start = time.perf_counter()
            for layer, e in keys:
                read(layer, e)
            times[name].append(time.perf_counter() - start)
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:30} {len(keys) * pool.nbytes / median / 1e9:5.2f} GB/s  (median of {len(runs)}, "
              f"{len(keys)} experts of {pool.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
