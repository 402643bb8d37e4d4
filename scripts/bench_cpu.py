"""CPU benchmark of the offloaded engine on a synthetic Mixtral-shaped model.

    python scripts/bench_cpu.py [--dir /tmp/moe-offload-synthetic] [--layers 12]

Writes a random Mixtral-shaped checkpoint (12 layers x 8 experts of
1024x3584 in bf16, about 2.2 GB) once, then runs `offload bench` on it:
(a) resident, (b) a RAM cache of half the experts with the checkpoint in the
page cache, (c) a RAM cache of a quarter inside a cgroup memory limit so the
rest really comes from disk; (b) and (c) without and with gate prefetching. Needs root for the cgroup (as here); without it
(c) runs unconfined and says so.

    python scripts/bench_cpu.py --experts bf16,int8,int4 [--cases a,c] [--io-threads 1,2,4]
                                [--drop-page-cache auto,off] [--readahead auto,off] [--rounds 3]
                                [--threads 1]

runs every case once per expert format (quantized copies made once, in
offload.load's cache: $MOE_OFFLOAD_CACHE or ~/.cache/moe-offload), formats
interleaved case by case, with ratios to the same format's resident run and
to the first format's run of the same case; case c once per I/O pool size
and page-cache setting given; --rounds repeats the whole sequence and takes
medians over rounds (on a machine other jobs share).
"""

import argparse
import json
from dataclasses import asdict

from offload.bench import (bench, make_synthetic_mixtral, parse_cases, parse_io_threads, parse_list, parse_page_cache,
                           parse_readahead)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/moe-offload-synthetic", help="where the synthetic model lives")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predictors", default="none,gate", help="predictors for the offloaded cases")
    parser.add_argument("--experts", default=None, help="comma-separated expert formats, e.g. bf16,int8,int4")
    parser.add_argument("--cases", default="a,b,c", help="which cases to run")
    parser.add_argument("--io-threads", default="auto", help="I/O pool sizes for case c, e.g. 1,2,4")
    parser.add_argument("--drop-page-cache", default="auto", help="case c page-cache settings: auto, on, fadvise, off")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence; medians over rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads in every case")
    parser.add_argument("--readahead", default="auto", help="case c readahead settings: auto, on, off (experiment)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    path = make_synthetic_mixtral(args.dir, layers=args.layers)
    results = bench(str(path), "cpu", args.prompt_tokens, args.new_tokens, args.repeats,
                    tuple(args.predictors.split(",")), experts=parse_list(args.experts) or (None,),
                    cases=parse_cases(args.cases), io_threads=parse_io_threads(args.io_threads),
                    page_cache=parse_page_cache(args.drop_page_cache), rounds=args.rounds,
                    threads=args.threads, readahead=parse_readahead(args.readahead))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()
