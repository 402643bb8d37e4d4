"""llama.cpp's side of `offload bench --against llama.cpp`: one case, timed in its own process.

Run by path (offload/bench.py starts it with runpy), never imported through the package: the
package imports torch, whose few hundred MiB would count against the case's memory limit and are
no part of llama.cpp. Only the standard library, numpy, llama-cpp-python and offload/procstats.py.

Greedy decoding as this runtime's bench does it: the given prompt ids in one prefill, then one
token at a time, the argmax of the last logits; no stop at end tokens. tokens/s counts the tokens
after the first over the time they took, and the time to the first token is the prefill, as in
offload/stats.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

try:
    from .procstats import Probe, peak_rss
except ImportError:  # run by path: the folder comes after the standard library (no module here shadows it)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from procstats import Probe, peak_rss


def open_llama(path: str, threads: int, n_ctx: int, mmap: bool = True, extra_bufts: bool = False,
               logits_all: bool = False, n_batch: int = 512, **kwargs):
    """llama_cpp.Llama on the CPU. `extra_bufts`: llama.cpp's repacked weight layouts (copied out of the
    mmap into RAM at load; a build with GGML_NATIVE crashed in them on some CPUs): the Llama class has no
    such argument, so it is set on the model parameters it starts from."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                               n_threads_batch=threads, use_mmap=mmap, n_gpu_layers=0, logits_all=logits_all,
                               verbose=False, **kwargs)
    finally:
        low.llama_model_default_params = defaults


def greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(token ids, seconds to the first, seconds for the rest) of a greedy generation from `prompt`."""
    import numpy as np

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))  # [V], the last row
        return int(logits.argmax())

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    ids = [next_token()]
    first = time.perf_counter()
    while len(ids) < new_tokens:
        llm.eval(ids[-1:])
        ids.append(next_token())
    return ids, first - start, time.perf_counter() - first


def run(args: dict) -> dict:
    baseline = peak_rss()
    if args.get("baseline_only"):
        import llama_cpp  # noqa: F401  (what the interpreter costs with the library loaded)

        return dict(baseline_rss=peak_rss())
    prompts, new_tokens = args["prompts"], args["new_tokens"]
    start = time.perf_counter()
    llm = open_llama(args["gguf"], args["threads"], n_ctx=max(len(p) for p in prompts) + new_tokens + 1,
                     mmap=args["mmap"], extra_bufts=args["extra_bufts"],
                     n_batch=max(32, max(len(p) for p in prompts)))
    load_seconds = time.perf_counter() - start
    runs = []
    for prompt in prompts:
        probe = Probe()
        ids, ttft, rest = greedy(llm, prompt, new_tokens)
        seen = probe.stop()
        runs.append(dict(tokens_per_second=(len(ids) - 1) / rest if rest > 0 else 0.0, time_to_first_token=ttft,
                         tokens=len(ids), token_ids=ids, **seen))
    llm.close()
    return dict(load_seconds=load_seconds, runs=runs, peak_rss=peak_rss(), baseline_rss=baseline)


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[-1]))))
