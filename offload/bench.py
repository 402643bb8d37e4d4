"""`offload bench`: where the time goes, offloaded against resident, measured in one run.

Each configuration runs in its own child process (so its peak RSS is its
own), optionally inside a cgroup-v1 memory limit so that the page cache
cannot hold the checkpoint and "disk" means disk. Figures are medians over
repeated generations; ratios are to the resident run of the same invocation.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache.store import drop_from_page_cache, read_bandwidth
from .placement import fmt_bytes

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
# Python, torch and the allocator's own footprint (about 300 MiB measured), on top of weights and
# slots, inside a cgroup limit: kept tight so that the page cache cannot hold the experts.
RUNTIME_OVERHEAD = 512 << 20


@dataclass(frozen=True)
class Case:
    name: str
    options: dict  # keyword arguments of offload.load
    memory_limit: int | None = None  # cgroup limit for the child, bytes
    cold: bool = False  # drop the checkpoint from the page cache first


@dataclass
class CaseResult:
    name: str
    placement: str
    load_seconds: float
    tokens_per_second: float
    time_to_first_token: float
    hit_rate: float
    bytes_from_disk_per_token: float
    bytes_to_device_per_token: float
    misses_per_token: float
    stall_seconds_per_token: float
    peak_rss: int
    baseline_rss: int  # after importing torch and offload, before loading: what the interpreter costs
    runs: list = field(default_factory=list)


# ---- the synthetic model ----------------------------------------------------

def make_synthetic_mixtral(path: Path, layers: int = 12, hidden: int = 1024, intermediate: int = 3584,
                           experts: int = 8, top_k: int = 2, vocab: int = 32000, heads: int = 16,
                           kv_heads: int = 4, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random Mixtral-shaped checkpoint, one safetensors shard per layer, written
    layer by layer (so memory stays at one layer) into a temp dir renamed at the end."""
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    std = 0.02

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    weight_map = {}
    shards = [("model-embed.safetensors", {"model.embed_tokens.weight": rand(vocab, hidden),
                                            "model.norm.weight": torch.ones(hidden, dtype=dtype),
                                            "lm_head.weight": rand(vocab, hidden)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            # A larger router scale gives peaked, input-dependent routing, as trained models have.
            p + "block_sparse_moe.gate.weight": (torch.randn(experts, hidden, generator=gen) * 0.5).to(dtype),
        }
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors[q + "w1.weight"] = rand(intermediate, hidden)
            tensors[q + "w3.weight"] = rand(intermediate, hidden)
            tensors[q + "w2.weight"] = rand(hidden, intermediate)
        shards.append((f"model-layer{i:03d}.safetensors", tensors))
    for name, tensors in shards:
        save_file(tensors, tmp / name)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_local_experts": experts, "num_experts_per_tok": top_k,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "hidden_act": "silu",
        "tie_word_embeddings": False, "dtype": str(dtype).replace("torch.", ""), "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(path)
    return path


# ---- one case, in a child process --------------------------------------------

def peak_rss() -> int:
    """This process's peak RSS. VmHWM belongs to the current address space; ru_maxrss
    would also count the parent's RSS at fork time, which survives exec on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(model: str, case: Case, prompt_tokens: int, new_tokens: int, repeats: int,
             prompts: list[str] | None = None) -> CaseResult:
    import offload

    baseline_rss = peak_rss()
    start = time.perf_counter()
    llm = offload.load(model, **case.options)
    load_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    runs = []
    for r in range(repeats):
        if prompts:  # real text routes like real use; random ids (synthetic models) do not
            prompt = llm.tokenizer.encode(prompts[r % len(prompts)])[:prompt_tokens]
        else:
            prompt = rng.integers(3, llm.config.vocab_size, prompt_tokens).tolist()
        before = llm.stats.experts.total()
        result = llm.generate(prompt, max_new_tokens=new_tokens)
        after = llm.stats.experts.total()
        n = max(1, len(result.token_ids))
        runs.append(dict(
            tokens_per_second=result.stats.tokens_per_second,
            time_to_first_token=result.stats.time_to_first_token,
            hits=after.hits - before.hits, misses=after.misses - before.misses,
            bytes_from_disk=after.bytes_from_disk - before.bytes_from_disk,
            bytes_to_device=after.bytes_to_device - before.bytes_to_device,
            stall_seconds=after.stall_seconds - before.stall_seconds, tokens=n,
        ))
    med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    per_token = lambda key: statistics.median(run[key] / run["tokens"] for run in runs)  # noqa: E731
    requests = sum(run["hits"] + run["misses"] for run in runs)
    result = CaseResult(
        name=case.name, placement=llm.placement.describe(), load_seconds=load_seconds,
        tokens_per_second=med("tokens_per_second"), time_to_first_token=med("time_to_first_token"),
        hit_rate=sum(run["hits"] for run in runs) / requests if requests else 0.0,
        bytes_from_disk_per_token=per_token("bytes_from_disk"),
        bytes_to_device_per_token=per_token("bytes_to_device"),
        misses_per_token=per_token("misses"), stall_seconds_per_token=per_token("stall_seconds"),
        peak_rss=peak_rss(), baseline_rss=baseline_rss, runs=runs,
    )
    llm.close()
    return result


def _enter_cgroup(limit: int) -> str:
    group = CGROUP_ROOT / f"moe-offload-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return str(group)


def run_child(model: str, case: Case, prompt_tokens: int, new_tokens: int, repeats: int,
              prompts: list[str] | None = None) -> CaseResult:
    payload = json.dumps(dict(model=model, case=asdict(case), prompt_tokens=prompt_tokens,
                              new_tokens=new_tokens, repeats=repeats, prompts=prompts))
    group = None
    if case.memory_limit:
        group = _enter_cgroup(case.memory_limit)
    preexec = (lambda: Path(group, "cgroup.procs").write_text(str(os.getpid()))) if group else None
    try:
        out = subprocess.run([sys.executable, "-m", "offload.bench", payload], capture_output=True, text=True,
                             preexec_fn=preexec)
    finally:
        if group:
            try:
                os.rmdir(group)
            except OSError:
                pass
    if out.returncode != 0:
        raise RuntimeError(f"case {case.name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return CaseResult(**json.loads(out.stdout.strip().splitlines()[-1]))


# ---- the whole benchmark ------------------------------------------------------

def default_cases(model: str, device: str, predictors=("none", "gate")) -> tuple[list[Case], dict]:
    """(a) resident, (b) experts in RAM with a compute-side cache of half the
    experts, (c) experts on disk with a RAM budget of a quarter of them; (b)
    and (c) once per predictor, to show what prefetching saves."""
    from .checkpoint import Checkpoint, resolve_model_path
    from .config import RuntimeConfig, resolve_device
    from .placement import expert_bytes, resident_bytes

    ckpt = Checkpoint(resolve_model_path(model))
    cfg, files = ckpt.config, ckpt.shard_files()
    ckpt.close()
    dtype = RuntimeConfig(device=device).compute_dtype(cfg.dtype, resolve_device(device))
    eb, resident = expert_bytes(cfg, dtype), resident_bytes(cfg, dtype)
    layers = sum(cfg.sparse_layers)
    total = layers * cfg.num_experts
    half, quarter = total // 2, max(total // 4, layers * cfg.top_k)
    if device == "cpu":
        b_name, b_opts = "b: RAM cache 1/2, page cache", dict(device="cpu", cpu_memory=half * eb)
        c_opts = dict(device="cpu", cpu_memory=quarter * eb)
    else:
        b_name = "b: GPU cache 1/2, experts in RAM"
        b_opts = dict(device=device, gpu_memory=resident + half * eb, cpu_memory=total * eb)
        c_opts = dict(device=device, gpu_memory=resident + half * eb, cpu_memory=quarter * eb)
    limit = resident + quarter * eb + RUNTIME_OVERHEAD if CGROUP_ROOT.exists() else None
    cases = [Case("a: resident", dict(device=device))]
    for predictor in predictors:
        cases.append(Case(f"{b_name}, {predictor}", dict(b_opts, predictor=predictor)))
    for predictor in predictors:
        # cold: the checkpoint is dropped from the page cache, and the cgroup keeps it out
        cases.append(Case(f"c: RAM 1/4, disk (cgroup), {predictor}", dict(c_opts, predictor=predictor),
                          memory_limit=limit, cold=True))
    info = dict(expert_bytes=eb, total_experts=total, resident_bytes=resident, files=files, limit=limit,
                budgets={"b": b_opts.get("cpu_memory"), "c": c_opts["cpu_memory"]})
    return cases, info


def bench(model: str, device: str = "cpu", prompt_tokens: int = 32, new_tokens: int = 32, repeats: int = 3,
          predictors=("none", "gate"), prompts: list[str] | None = None, echo=print) -> list[CaseResult]:
    cases, info = default_cases(model, device, predictors)
    echo(f"model {model}: {info['total_experts']} experts x {fmt_bytes(info['expert_bytes'])}, "
         f"other weights {fmt_bytes(info['resident_bytes'])}; {prompt_tokens}-token prompt, {new_tokens} new "
         f"tokens, median of {repeats}; torch threads {torch.get_num_threads()}; "
         f"prompts: {'text' if prompts else 'random token ids'}")
    if info["limit"] is None:
        echo("(no cgroup-v1 memory controller here: case c runs unconfined, the page cache may hide the disk)")
    cold_bw = None
    results = []
    for case in cases:
        if case.cold:
            drop_from_page_cache(info["files"])
            if cold_bw is None:
                cold_bw = read_bandwidth(info["files"], limit=512 << 20)
                drop_from_page_cache(info["files"])
        echo(f"  running {case.name} ...")
        results.append(run_child(model, case, prompt_tokens, new_tokens, repeats, prompts))
    read_bandwidth(info["files"], limit=512 << 20)  # bring these bytes into the page cache...
    warm_bw = read_bandwidth(info["files"], limit=512 << 20)  # ...then time a RAM-to-RAM copy of them
    base = results[0]
    echo("")
    echo(f"{'case':40} {'tok/s':>7} {'ratio':>6} {'TTFT s':>7} {'hit':>5} {'MB disk/tok':>11} "
         f"{'MB dev/tok':>10} {'stall/tok':>9} {'peak RSS':>10} {'- baseline':>10}")
    for r in results:
        ratio = r.tokens_per_second / base.tokens_per_second if base.tokens_per_second else 0.0
        echo(f"{r.name:40} {r.tokens_per_second:7.2f} {ratio:6.2f} {r.time_to_first_token:7.2f} "
             f"{r.hit_rate:5.0%} {r.bytes_from_disk_per_token / 1e6:11.1f} {r.bytes_to_device_per_token / 1e6:10.1f} "
             f"{r.stall_seconds_per_token:9.3f} {fmt_bytes(r.peak_rss):>10} "
             f"{fmt_bytes(r.peak_rss - r.baseline_rss):>10}")
    budgets = info["budgets"]
    echo(f"(peak RSS - baseline: what loading and running added over the bare interpreter with torch; expert "
         f"budgets: b {fmt_bytes(budgets['b']) if budgets['b'] else '-'}, c {fmt_bytes(budgets['c'])}; "
         f"resident {fmt_bytes(info['resident_bytes'])}"
         + (f"; cgroup limit for c {fmt_bytes(info['limit'])})" if info["limit"] else ")"))
    echo("")
    echo(f"bandwidth: page-cache copy {warm_bw / 1e9:.2f} GB/s; cold disk read {cold_bw / 1e9:.2f} GB/s")
    for r in results[1:]:
        bw, what = (cold_bw, "disk read") if r.name.startswith("c") else (warm_bw, "page-cache copy")
        moved = r.bytes_from_disk_per_token
        floor = moved / bw if bw else 0.0
        echo(f"bound for {r.name}: {moved / 1e6:.1f} MB/token at the {what} bandwidth = {floor * 1000:.1f} ms "
             f"of I/O per token + {1000 / base.tokens_per_second:.1f} ms of compute -> "
             f"{1 / (floor + 1 / base.tokens_per_second):.2f} tok/s without overlap, "
             f"{1 / max(floor, 1 / base.tokens_per_second):.2f} with perfect overlap; measured {r.tokens_per_second:.2f}")
    return results


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    case = Case(**args["case"])
    result = run_case(args["model"], case, args["prompt_tokens"], args["new_tokens"], args["repeats"],
                      args.get("prompts"))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _child_main(sys.argv[1])
