"""Does `offload simulate` predict what the engine really does? Measured against modeled, same machine.

    python scripts/validate_simulator.py [--dir /tmp/moe-offload-synthetic] [--layers 12] [--repeats 3]

1. Writes (once) the synthetic Mixtral-shaped bf16 model of scripts/bench_cpu.py.
2. Measures this machine into a hardware profile at that model's shapes (`offload.profile.measure`,
   the code behind `offload profile`), plus the warm (page-cache) read speed of its files.
3. Runs `offload bench`'s cases without prefetch, each in its own process: (a) resident, (b) a RAM
   cache of half the experts with the rest in the page cache, (c) a quarter in RAM and the rest
   from disk inside a cgroup memory limit.
4. Records the routing of the same prompts and generated tokens with the resident model, and
   replays it through `offload.simulate.simulate` with the measured profile and each case's budget,
   each prompt as one prefill step and the generated tokens as decode steps, as `generate` runs them.
   (b) reads its misses from the page cache, so its profile's disk bandwidth is the warm read speed.
5. Prints measured and modeled decode tok/s (and their ratio), time to first token, hit rate and MB
   read per token. The measured hit rate and MB/token count the prefill too; the modeled ones are
   the decode steps'.
"""

import argparse
import dataclasses
import statistics

import numpy as np

from offload.bench import bench, default_cases, make_synthetic_mixtral


def warm_read_bandwidth(files, repeats: int = 3) -> float:
    from offload.cache.store import read_bandwidth

    read_bandwidth(files, limit=1 << 30)  # bring the first GiB into the page cache
    return statistics.median(read_bandwidth(files, limit=1 << 30) for _ in range(repeats))


def routing_trace(path: str, prompt_tokens: int, new_tokens: int, repeats: int):
    """The routing of the bench's own sequences: its random prompts (same seed) and the tokens generated."""
    import offload

    llm = offload.load(path, device="cpu")
    rng = np.random.default_rng(0)  # as offload.bench.run_case draws its prompts
    sequences = []
    for _ in range(repeats):
        prompt = rng.integers(3, llm.config.vocab_size, prompt_tokens).tolist()
        sequences.append(prompt + llm.generate(prompt, max_new_tokens=new_tokens).token_ids)
    trace = llm.trace(sequences)
    llm.close()
    return trace


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/moe-offload-synthetic", help="where the synthetic model lives")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from offload.profile import measure
    from offload.simulate import load_shape, simulate

    path = str(make_synthetic_mixtral(args.dir, layers=args.layers))
    _, info = default_cases(path, "cpu", ("none",))
    profile = measure(path)  # before anything maps the files: the disk figure is the drive's
    warm = warm_read_bandwidth(info["files"])
    print(f"profile: {profile.cpu_threads} threads, CPU expert {profile.cpu_gflops_1:.1f} GFLOP/s at 1 token, "
          f"{profile.cpu_gflops_batch:.1f} at a batch; disk {profile.disk_bandwidth / 1e9:.2f} GB/s cold, "
          f"{warm / 1e9:.2f} GB/s from the page cache")
    measured = bench(path, "cpu", args.prompt_tokens, args.new_tokens, args.repeats, ("none",))
    trace = routing_trace(path, args.prompt_tokens, args.new_tokens, args.repeats)
    cfg = load_shape(path)
    budgets = {"a": None, "b": info["budgets"]["b"], "c": info["budgets"]["c"]}
    hosts = {"a": profile, "b": dataclasses.replace(profile, disk_bandwidth=int(warm)), "c": profile}
    print(f"\n{'case':44} {'tok/s real':>10} {'modeled':>8} {'real/model':>10} {'TTFT real':>9} {'modeled':>8} "
          f"{'hit real':>8} {'modeled':>8} {'MB/tok real':>11} {'modeled':>8}")
    for result in measured:
        case = result.name[0]
        model = simulate(trace, hosts[case], cfg, cpu_memory=budgets[case], max_tokens=trace.num_tokens,
                         prompt_tokens=args.prompt_tokens)
        real_hit = result.hit_rate if case != "a" else 1.0
        print(f"{result.name:44} {result.tokens_per_second:10.2f} {model.tokens_per_second:8.2f} "
              f"{result.tokens_per_second / model.tokens_per_second:10.2f} "
              f"{result.time_to_first_token:9.2f} {model.prefill_seconds:8.2f} {real_hit:8.0%} {model.hit_rate:8.0%} "
              f"{result.bytes_from_disk_per_token / 1e6:11.0f} {model.disk_bytes_per_token / 1e6:8.0f}")


if __name__ == "__main__":
    main()
