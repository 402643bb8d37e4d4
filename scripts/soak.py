"""Soak: thousands of tokens of offloaded generation, checking that nothing accumulates.

    python scripts/soak.py [MODEL] [--tokens 5000] [--experts int4] [--cpu-memory 2MiB]

Generates in rounds of `--round` tokens (greedy and sampled, prompts varied) with a RAM budget
of a few experts and the gate predictor prefetching (on a GPU machine the same run also has the
pinned host tier and CPU experts). After a warm-up round it samples, per round: RSS, open file
descriptors, threads, and the expert counters. It fails (exit 1) when RSS grows by more than
`--rss-slack` after warm-up, when descriptors or threads grow at all, or when the counters
disagree (hits + misses must equal the requests the router made). Prints one line per round.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import psutil

import offload

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo,", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is",
           "To be, or not to be", "HAMLET:\nAy, there's the rub"]


class Requests:
    """Counts what the router asks for: a wrapper around the executor, so the check is independent
    of the engine's own counters."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __call__(self, layer, hidden, ids, weights, probs=None):
        self.count += len(set(ids.flatten().tolist()))
        return self.inner(layer, hidden, ids, weights, probs)

    def __getattr__(self, name):  # begin_step and the rest
        return getattr(self.inner, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model (default: the demo model)")
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--round", type=int, default=250, help="tokens per round")
    parser.add_argument("--experts", default=None, help="expert format, e.g. int4")
    parser.add_argument("--cpu-memory", default=None, help="expert RAM budget (default: 5 experts' worth)")
    parser.add_argument("--rss-slack", type=float, default=32.0, help="MiB of RSS growth allowed after warm-up")
    args = parser.parse_args(argv)
    if args.tokens < 2 * args.round or args.round < 1:
        parser.error("--tokens must cover at least two rounds (a warm-up and one measured)")

    probe = offload.load(args.model, experts=args.experts)
    budget = args.cpu_memory or 5 * probe.placement.expert_bytes
    probe.close()
    llm = offload.load(args.model, device="cpu", cpu_memory=budget, predictor="gate", experts=args.experts)
    print(f"[{llm.describe()}]")
    counter = Requests(llm.experts)
    llm.model.set_executor(counter)
    me = psutil.Process()
    rounds, made, failures = [], 0, []
    start = time.perf_counter()
    while made < args.tokens:
        r = len(rounds)
        out = llm.generate(PROMPTS[r % len(PROMPTS)], max_new_tokens=args.round, temperature=0.8 * (r % 2),
                           seed=r)
        made += len(out.token_ids) + 1
        total = llm.stats.experts.total()
        rounds.append(dict(rss=me.memory_info().rss / 2**20, fds=me.num_fds(), threads=threading.active_count(),
                           os_threads=me.num_threads(), requests=counter.count, hits=total.hits,
                           misses=total.misses, tok_s=out.stats.tokens_per_second))
        now = rounds[-1]
        print(f"round {r:3d}: {made:6d} tokens, {now['tok_s']:7.1f} tok/s, RSS {now['rss']:7.1f} MiB, "
              f"fds {now['fds']}, threads {now['threads']}/{now['os_threads']}, hit rate "
              f"{now['hits'] / max(1, now['hits'] + now['misses']):.2f}", flush=True)
        if now["hits"] + now["misses"] != now["requests"]:
            failures.append(f"round {r}: hits + misses = {now['hits'] + now['misses']}, "
                            f"but the router made {now['requests']} expert requests")
    warm, last = rounds[0], rounds[-1]
    if last["rss"] - warm["rss"] > args.rss_slack:
        failures.append(f"RSS grew {last['rss'] - warm['rss']:.1f} MiB after warm-up (allowed {args.rss_slack})")
    for key in ("fds", "threads", "os_threads"):
        if last[key] > warm[key]:
            failures.append(f"{key} grew from {warm[key]} to {last[key]}")
    llm.close()
    print(f"{made} tokens in {time.perf_counter() - start:.0f} s; RSS after warm-up {warm['rss']:.1f} -> "
          f"{last['rss']:.1f} MiB (max {max(x['rss'] for x in rounds):.1f})")
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
