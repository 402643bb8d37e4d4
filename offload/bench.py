"""`offload bench`: where the time goes, offloaded against resident, measured in one run.

Each configuration runs in its own child process (so its peak RSS is its
own), optionally inside a cgroup-v1 memory limit so that the page cache
cannot hold the checkpoint and "disk" means disk. Figures are medians over
repeated generations; ratios are to the resident run of the same invocation.

With several expert formats (`experts=("bf16", "int8", "int4")`), every case
runs once per format, formats interleaved case by case; each format's
budgets count its own expert bytes, quantized copies are made once up front
(offload.api's cache), and each row carries two ratios: to the same format's
resident run and to the first (reference, normally bf16) format's run of the
same case.

Besides tokens/s, each child reports what the kernel saw during the timed
generations: the bytes the process really read from storage (/proc/self/io
`read_bytes`, readahead included) beside the expert bytes the engine counted
(`bytes_from_disk`), and how long its threads waited on a run queue for a
core (/proc/self/task/*/schedstat, field 2) as a share of wall time.

`against="llama.cpp"` (`offload bench --against llama.cpp`) runs every case with llama.cpp too, on
the same model written as GGUF in the matching type (offload/llamacpp.py), each right after ours of
the same case, on the same prompt ids and threads; b runs cold in a cgroup for both engines then,
and each llama.cpp limit holds as many experts as ours holds (`llama_cases` says how).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .cache.store import drop_from_page_cache, read_bandwidth
from .errors import OffloadError
from .placement import fmt_bytes
# What the kernel saw (storage reads, run-queue waits, faults, peak RSS): in offload/procstats.py, torch-free
# so that llama.cpp's bench child uses it too; imported under the names the bench always had.
from .procstats import (Probe, major_faults, parse_proc_io, parse_schedstat, peak_rss,  # noqa: F401
                        process_read_bytes, schedstat_delta, thread_schedstats)

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
    model: str | None = None  # the directory to load (a quantized copy), None: the benchmark's model
    format: str = ""  # the experts' format, as the table names it
    # Offloaded-engine settings the API does not expose, forced in the child only (None: the API's choice):
    io_threads: int | None = None  # OffloadedExperts' I/O pool
    # Expert reads keep out of the page cache (True: with O_DIRECT where the file system allows it;
    # "fadvise": buffered, their pages dropped after each read) or not (False)
    drop_page_cache: bool | str | None = None
    readahead: bool | None = None  # False: fadvise(RANDOM) on the expert reader's files (no readahead)
    # `--against llama.cpp`: the case run by llama.cpp on `model`, a GGUF file (offload/llamacpp_child.py)
    engine: str = "offload"  # or "llama.cpp"
    mmap: bool = True  # llama.cpp: map the file (False: read it all into RAM at load)
    extra_bufts: bool = False  # llama.cpp: its repacked weight layouts (in RAM, not the mapped file)
    threads: int | None = None  # llama.cpp's threads (ours go through options["threads"])


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
    format: str = ""
    process_read_bytes_per_token: float = 0.0  # /proc/self/io read_bytes: what storage really delivered
    runqueue_wait_share: float = 0.0  # summed run-queue wait of all threads / wall time
    on_cpu_share: float = 0.0  # summed CPU time of all threads / wall time (2.0 = two cores busy)
    io_threads: int = 0  # the offloaded engine's I/O pool as it ran (0: resident)
    drop_page_cache: bool = False  # whether expert reads dropped their pages, as it ran
    direct_io: bool = False  # ... by reading around the page cache (O_DIRECT)
    cpu_seconds_per_token: float = 0.0  # on-CPU time of all threads per new token (prefill included)
    major_faults_per_token: float = 0.0  # page faults that read a file (code paged back in), per new token
    engine: str = "offload"  # who ran it: this runtime, or llama.cpp (`--against llama.cpp`)


# ---- the synthetic model ----------------------------------------------------

def make_synthetic_mixtral(path: Path, layers: int = 12, hidden: int = 1024, intermediate: int = 3584,
                           experts: int = 8, top_k: int = 2, vocab: int = 32000, heads: int = 16,
                           kv_heads: int = 4, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """The CPU benchmarks' random Mixtral-shaped checkpoint (offload/synthetic.py), 2.2 GB by default."""
    from .synthetic import make_synthetic

    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_local_experts": experts, "num_experts_per_tok": top_k,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "hidden_act": "silu",
    }
    return make_synthetic(path, config, dtype=dtype, seed=seed)


# ---- one case, in a child process --------------------------------------------

def _force_engine(io_threads: int | None, drop_page_cache: bool | str | None) -> None:
    """In the bench child only: build the offloaded engine with these settings instead of the API's."""
    if io_threads is None and drop_page_cache is None:
        return
    from . import api
    from .engine import OffloadedExperts

    class Forced(OffloadedExperts):
        def __init__(self, *args, **kwargs):
            if io_threads is not None:
                kwargs["io_threads"] = io_threads
            if drop_page_cache is not None:
                kwargs["drop_page_cache"] = bool(drop_page_cache)
                kwargs["direct_io"] = drop_page_cache is True
            super().__init__(*args, **kwargs)

    api.OffloadedExperts = Forced


def prompt_ids(vocab_size: int, prompt_tokens: int, repeats: int, prompts: list[str] | None = None,
               encode=None) -> list[list[int]]:
    """The prompt of each timed run: the lines of `prompts` encoded (real text routes like real use),
    else random ids from a fixed seed (synthetic models); the same for every case and engine."""
    if prompts:
        return [encode(prompts[r % len(prompts)])[:prompt_tokens] for r in range(repeats)]
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, prompt_tokens).tolist() for _ in range(repeats)]


def run_case(model: str, case: Case, prompt_tokens: int, new_tokens: int, repeats: int,
             prompts: list[str] | None = None) -> CaseResult:
    import offload

    from .engine import OffloadedExperts

    baseline_rss = peak_rss()
    _force_engine(case.io_threads, case.drop_page_cache)
    start = time.perf_counter()
    llm = offload.load(case.model or model, **case.options)
    load_seconds = time.perf_counter() - start
    engine = llm.experts if isinstance(llm.experts, OffloadedExperts) else None
    if engine is not None and case.readahead is False:
        for fd in engine.reader.fds.values():  # an experiment: reads fetch what was asked, nothing after it
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    runs = []
    for prompt in prompt_ids(llm.config.vocab_size, prompt_tokens, repeats, prompts,
                             llm.tokenizer.encode if prompts else None):
        before = llm.stats.experts.total()
        probe = Probe()
        result = llm.generate(prompt, max_new_tokens=new_tokens)
        seen = probe.stop()
        after = llm.stats.experts.total()
        n = max(1, len(result.token_ids))
        runs.append(dict(
            tokens_per_second=result.stats.tokens_per_second,
            time_to_first_token=result.stats.time_to_first_token,
            hits=after.hits - before.hits, misses=after.misses - before.misses,
            bytes_from_disk=after.bytes_from_disk - before.bytes_from_disk,
            bytes_to_device=after.bytes_to_device - before.bytes_to_device,
            stall_seconds=after.stall_seconds - before.stall_seconds, tokens=n, **seen,
        ))
    med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    per_token = lambda key: statistics.median(run[key] / run["tokens"] for run in runs)  # noqa: E731
    share = lambda key: statistics.median(run[key] / run["wall_seconds"] for run in runs)  # noqa: E731
    requests = sum(run["hits"] + run["misses"] for run in runs)
    result = CaseResult(
        name=case.name, placement=llm.placement.describe(), load_seconds=load_seconds,
        tokens_per_second=med("tokens_per_second"), time_to_first_token=med("time_to_first_token"),
        hit_rate=sum(run["hits"] for run in runs) / requests if requests else 0.0,
        bytes_from_disk_per_token=per_token("bytes_from_disk"),
        bytes_to_device_per_token=per_token("bytes_to_device"),
        misses_per_token=per_token("misses"), stall_seconds_per_token=per_token("stall_seconds"),
        peak_rss=peak_rss(), baseline_rss=baseline_rss, runs=runs, format=case.format,
        process_read_bytes_per_token=per_token("process_read_bytes"),
        runqueue_wait_share=share("runqueue_wait_seconds"), on_cpu_share=share("on_cpu_seconds"),
        cpu_seconds_per_token=per_token("on_cpu_seconds"), major_faults_per_token=per_token("major_faults"),
        io_threads=engine.io._max_workers if engine else 0,
        drop_page_cache=bool(engine and engine.reader.drop_cache),
        direct_io=bool(engine and set(engine.reader.direct) - engine.reader.refused),
    )
    llm.close()
    return result


def _enter_cgroup(limit: int) -> str:
    group = CGROUP_ROOT / f"moe-offload-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return str(group)


def _spawn(argv: list[str], memory_limit: int | None) -> subprocess.CompletedProcess:
    """Run `argv` to its end, inside a fresh cgroup with `memory_limit` (bytes) when one is given."""
    group = _enter_cgroup(memory_limit) if memory_limit else None
    preexec = (lambda: Path(group, "cgroup.procs").write_text(str(os.getpid()))) if group else None
    try:
        return subprocess.run(argv, capture_output=True, text=True, preexec_fn=preexec)
    finally:
        if group:
            try:
                os.rmdir(group)
            except OSError:
                pass


def run_child(model: str, case: Case, prompt_tokens: int, new_tokens: int, repeats: int,
              prompts: list[str] | None = None, ids: list[list[int]] | None = None) -> CaseResult:
    """One case in its own process; llama.cpp's cases run `ids` (the prompts our cases run)."""
    if case.engine == "llama.cpp":
        return run_llama_child(case, ids, new_tokens)
    payload = json.dumps(dict(model=model, case=asdict(case), prompt_tokens=prompt_tokens,
                              new_tokens=new_tokens, repeats=repeats, prompts=prompts))
    out = _spawn([sys.executable, "-m", "offload.bench", payload], case.memory_limit)
    if out.returncode != 0:
        raise RuntimeError(f"case {case.name} [{case.format}] failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return CaseResult(**json.loads(out.stdout.strip().splitlines()[-1]))


LLAMA_CHILD = Path(__file__).with_name("llamacpp_child.py")
# The child runs by path, not through the package (which imports torch): see offload/llamacpp_child.py.
_BY_PATH = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def llama_child_argv(payload: dict) -> list[str]:
    return [sys.executable, "-c", _BY_PATH, str(LLAMA_CHILD), json.dumps(payload)]


def run_llama_child(case: Case, ids: list[list[int]], new_tokens: int) -> CaseResult:
    """llama.cpp's run of `case` on its GGUF (case.model), greedy from each of `ids`. Where llama.cpp's
    repacked layouts crash the process (seen with GGML_NATIVE builds), it runs again without them."""
    payload = dict(gguf=case.model, threads=case.threads or os.cpu_count(), mmap=case.mmap,
                   extra_bufts=case.extra_bufts, prompts=ids, new_tokens=new_tokens)
    out = _spawn(llama_child_argv(payload), case.memory_limit)
    name = case.name
    if out.returncode < 0 and case.extra_bufts:  # killed by a signal: a crash in a repacked kernel
        payload["extra_bufts"] = False
        out = _spawn(llama_child_argv(payload), case.memory_limit)
        name += f" (repacked layouts crashed, signal {-out.returncode if out.returncode < 0 else ''}: without)"
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp's case {case.name} [{case.format}] failed (exit {out.returncode}"
                           f"{', killed: the memory limit?' if out.returncode == -9 else ''}):\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    runs = got["runs"]
    med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    per_token = lambda key: statistics.median(run[key] / run["tokens"] for run in runs)  # noqa: E731
    share = lambda key: statistics.median(run[key] / run["wall_seconds"] for run in runs)  # noqa: E731
    how = ("file mapped (mmap)" if case.mmap else "file read into RAM") + (
        ", repacking allowed" if payload["extra_bufts"] else "")
    return CaseResult(
        name=name, placement=f"llama.cpp, {how}", load_seconds=got["load_seconds"],
        tokens_per_second=med("tokens_per_second"), time_to_first_token=med("time_to_first_token"), hit_rate=0.0,
        bytes_from_disk_per_token=0.0, bytes_to_device_per_token=0.0, misses_per_token=0.0,
        stall_seconds_per_token=0.0, peak_rss=got["peak_rss"], baseline_rss=got["baseline_rss"], runs=runs,
        format=case.format, process_read_bytes_per_token=per_token("process_read_bytes"),
        runqueue_wait_share=share("runqueue_wait_seconds"), on_cpu_share=share("on_cpu_seconds"),
        cpu_seconds_per_token=per_token("on_cpu_seconds"), major_faults_per_token=per_token("major_faults"),
        engine="llama.cpp")


def llama_baseline_rss() -> int:
    """Peak RSS of llama.cpp's bench child with nothing loaded: the interpreter and the library."""
    out = _spawn(llama_child_argv(dict(baseline_only=True)), None)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp's bench child failed to start (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["baseline_rss"]


def offload_baseline_rss() -> int:
    """The same for our bench child: the interpreter with torch and this package imported."""
    out = subprocess.run([sys.executable, "-c", "import offload.bench; print(offload.bench.peak_rss())"],
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


# ---- the whole benchmark ------------------------------------------------------

CASES = ("a", "b", "c")


def parse_list(text) -> tuple[str, ...]:
    """"bf16, int8,int4" -> ("bf16", "int8", "int4"); None or "" -> ()."""
    return tuple(part.strip() for part in str(text or "").split(",") if part.strip())


def parse_cases(text) -> tuple[str, ...]:
    """"a,c" -> ("a", "c"): which of the cases to run."""
    from .errors import OffloadError

    cases = tuple(c.lower() for c in parse_list(text))
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        raise OffloadError(f"cases {text!r}: name some of {', '.join(CASES)} (a resident, b RAM cache 1/2, "
                           "c RAM 1/4 + disk), comma-separated")
    return cases


def parse_io_threads(text) -> tuple[int | None, ...]:
    """"1,2,4" -> (1, 2, 4); "" or "auto" -> (None,): the engine's own pool size."""
    from .errors import OffloadError

    out = []
    for part in parse_list(text) or ("auto",):
        if part.lower() == "auto":
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise OffloadError(f"--io-threads {text!r}: give whole numbers of at least 1 (or auto), comma-separated")
    return tuple(out)


SWITCH = {"auto": None, "on": True, "off": False}


def parse_switch(text, option: str) -> tuple[bool | None, ...]:
    """"auto,off" -> (None, False) for an on/off/auto option of case c (auto: the engine's own choice)."""
    from .errors import OffloadError

    parts = [p.lower() for p in parse_list(text) or ("auto",)]
    if any(p not in SWITCH for p in parts):
        raise OffloadError(f"{option} {text!r}: use auto, on or off, comma-separated")
    return tuple(SWITCH[p] for p in parts)


def parse_page_cache(text) -> tuple[bool | str | None, ...]:
    """Whether case c's reads keep out of the page cache (on: O_DIRECT where the file system allows it;
    fadvise: buffered, their pages dropped after each read), keep their pages (off), or as offload.load
    decides (auto: out of it when the checkpoint does not fit in the memory available)."""
    from .errors import OffloadError

    parts = [p.lower() for p in parse_list(text) or ("auto",)]
    if any(p not in SWITCH and p != "fadvise" for p in parts):
        raise OffloadError(f"--drop-page-cache {text!r}: use auto, on, fadvise or off, comma-separated")
    return tuple(SWITCH.get(p, p) for p in parts)


def parse_readahead(text) -> tuple[bool | None, ...]:
    """Whether the kernel reads ahead of case c's expert reads (on, the default: auto) or not (off:
    fadvise RANDOM on the reader's files, an experiment)."""
    return parse_switch(text, "--readahead")


def format_directory(model: str, experts: str | None) -> tuple[Path, str, str | None]:
    """(directory holding `model` with its experts in `experts`, the format's name, the `experts=`
    option that names it): quantized copies are made here, once, in offload.load's cache, so that
    no timed child quantizes."""
    from .api import _with_experts
    from .checkpoint import Checkpoint
    from .formats import parse_experts
    from .sources import model_directory

    source = model_directory(model)
    path = _with_experts(source, experts)
    ckpt = Checkpoint(path)
    ckpt.close()
    stored = ckpt.expert_format
    if stored.quantized:
        return path, stored.name, stored.name
    kind, _ = parse_experts(experts)
    return path, (experts if experts is not None and kind == "dense" else stored.name), experts


def case_budgets(cfg, eb: int, resident: int, device: str, cgroups: bool = True) -> dict:
    """The expert budgets of cases b and c in one format's bytes (`eb` per expert): (b) half the
    experts cached where they are computed, (c) a quarter (at least top_k per layer) in RAM, and
    the cgroup limits of c (and of b, when it runs confined) (None without a cgroup-v1 memory controller)."""
    layers = sum(cfg.sparse_layers)
    total = layers * cfg.num_experts
    half, quarter = total // 2, max(total // 4, layers * cfg.top_k)
    if device == "cpu":
        b_opts = dict(device="cpu", cpu_memory=half * eb)
        c_opts = dict(device="cpu", cpu_memory=quarter * eb)
    else:
        b_opts = dict(device=device, gpu_memory=resident + half * eb, cpu_memory=total * eb)
        c_opts = dict(device=device, gpu_memory=resident + half * eb, cpu_memory=quarter * eb)
    limit = resident + quarter * eb + RUNTIME_OVERHEAD if cgroups else None
    b_limit = resident + half * eb + RUNTIME_OVERHEAD if cgroups else None
    return dict(b=b_opts, c=c_opts, limit=limit, b_limit=b_limit, total=total, in_memory={"b": half, "c": quarter})


def default_cases(model: str, device: str, predictors=("none", "gate"), experts: str | None = None,
                  cases=CASES, io_threads=(None,), page_cache=(None,), fmt_name: str = "",
                  threads: int | None = None, readahead=(None,), confine_b: bool = False) -> tuple[list[Case], dict]:
    """(a) resident, (b) experts in RAM with a compute-side cache of half the
    experts, (c) experts on disk with a RAM budget of a quarter of them; (b)
    and (c) once per predictor, to show what prefetching saves; (c) also once per
    forced I/O pool size, page-cache setting and readahead setting asked for (None: the engine's own).
    `confine_b`: (b) too runs cold in a cgroup (resident + half the experts + the overhead), so that
    the page cache cannot hold the other half (as llama.cpp's b runs, `--against llama.cpp`).
    `model` is a directory whose experts are stored in `experts` (None: as stored);
    budgets count that format's bytes. `threads`: torch's CPU threads in every case (None: torch's default)."""
    from .checkpoint import Checkpoint
    from .config import RuntimeConfig, default_threads, resolve_device
    from .placement import expert_bytes, resident_bytes

    ckpt = Checkpoint(model)
    cfg, files = ckpt.config, ckpt.shard_files()
    ckpt.close()
    dtype = RuntimeConfig(device=device).compute_dtype(cfg.dtype, resolve_device(device))
    eb, resident = expert_bytes(cfg, dtype, experts), resident_bytes(cfg, dtype)
    budgets = case_budgets(cfg, eb, resident, device, CGROUP_ROOT.exists())
    b_name = "b: RAM cache 1/2, page cache" if device == "cpu" else "b: GPU cache 1/2, experts in RAM"
    common = dict(model=model, format=fmt_name)
    with_format = {} if experts is None else dict(experts=experts)
    if threads is not None:
        with_format["threads"] = threads
    out = []
    if "a" in cases:
        out.append(Case("a: resident", dict(device=device, **with_format), **common))
    if "b" in cases:
        confined = dict(memory_limit=budgets["b_limit"], cold=True) if confine_b and budgets["b_limit"] else {}
        if confined:
            b_name = "b: RAM 1/2 (cgroup)"
        for predictor in predictors:
            out.append(Case(f"{b_name}, {predictor}", dict(budgets["b"], predictor=predictor, **with_format),
                            **confined, **common))
    if "c" in cases:
        for predictor in predictors:
            for io, drop, ahead in itertools.product(io_threads, page_cache, readahead):
                name = f"c: RAM 1/4, disk (cgroup), {predictor}"
                name += f", io {io}" if io is not None else ""
                name += {None: "", True: ", drop on", False: ", drop off", "fadvise": ", drop fadvise"}[drop]
                name += {None: "", True: ", readahead on", False: ", readahead off"}[ahead]
                # cold: the checkpoint is dropped from the page cache, and the cgroup keeps it out
                out.append(Case(name, dict(budgets["c"], predictor=predictor, **with_format),
                                memory_limit=budgets["limit"], cold=True, io_threads=io, drop_page_cache=drop,
                                readahead=ahead, **common))
    info = dict(expert_bytes=eb, total_experts=budgets["total"], resident_bytes=resident, files=files,
                limit=budgets["limit"], budgets={"b": budgets["b"].get("cpu_memory"), "c": budgets["c"]["cpu_memory"]},
                b_limit=budgets["b_limit"] if confine_b else None, in_memory=budgets["in_memory"],
                threads=threads or default_threads(cfg), vocab_size=cfg.vocab_size)
    return out, info


def interleave(per_format: list[list[Case]]) -> list[Case]:
    """Cases of several formats in run order: case by case, the formats in turn (a bf16, a int4,
    b bf16, b int4, ...), so that the runs compared against each other are close in time."""
    out = []
    for i in range(max((len(cases) for cases in per_format), default=0)):
        out.extend(cases[i] for cases in per_format if i < len(cases))
    return out


def ratios(results: list[CaseResult]) -> list[tuple[float | None, float | None]]:
    """Per result: (tok/s over its own format's resident run, tok/s over the reference format's run of
    the same case); the reference format is the first one run. None where there is no such run."""
    reference = results[0].format if results else ""
    by = {(r.format, r.name): r for r in results}
    out = []
    for r in results:
        pair = []
        for other in (by.get((r.format, "a: resident")), by.get((reference, r.name))):
            pair.append(r.tokens_per_second / other.tokens_per_second
                        if other is not None and other.tokens_per_second else None)
        out.append(tuple(pair))
    return out


def merge(rounds: list[CaseResult]) -> CaseResult:
    """One case's results over several rounds: medians of the figures, the highest peak RSS, all runs."""
    if len(rounds) == 1:
        return rounds[0]
    out = {}
    for f in fields(CaseResult):
        values = [getattr(r, f.name) for r in rounds]
        if f.name == "runs":
            out[f.name] = [run for r in rounds for run in r.runs]
        elif f.name in ("peak_rss", "baseline_rss"):
            out[f.name] = max(values)
        elif isinstance(values[0], float):
            out[f.name] = statistics.median(values)
        else:
            out[f.name] = values[0]
    return CaseResult(**out)


AGAINST = {"llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp"}


def parse_against(text) -> str | None:
    """`--against`: None or "" -> None (no peer); "llama.cpp" (the one peer built) -> "llama.cpp"."""
    if text is None or not str(text).strip():
        return None
    name = AGAINST.get(str(text).strip().lower())
    if name is None:
        raise OffloadError(f"--against {text!r}: the peer built is llama.cpp (--against llama.cpp)")
    return name


def llama_cases(model: str, formats, planned: list[list[Case]], infos: dict, cases, echo=print):
    """Per format of ours, llama.cpp's cases on the same model written as GGUF in the matching type
    (offload/llamacpp.py; once, cached), each placed right after ours of the same letter:
      a  the file read into RAM at load (no mmap), llama.cpp's repacked layouts allowed: resident;
      b  the file mapped, cold, in a cgroup holding half the experts,
      c  the same with a quarter of them.
    A cgroup holds llama.cpp's other weights plus the same NUMBER of experts ours holds, in its own
    format's bytes, plus our RUNTIME_OVERHEAD less what torch and this package cost our child over
    llama.cpp's bare child (both measured here): neither side gets more room for weights.
    -> (the run order per format, {our format: llama.cpp's type})."""
    from .checkpoint import Checkpoint
    from .llamacpp import gguf_copy, gguf_sizes, gguf_type

    ours_base, theirs_base = offload_baseline_rss(), llama_baseline_rss()
    overhead = RUNTIME_OVERHEAD - max(0, ours_base - theirs_base)
    out, pairs = [], {}
    for (path, name, _), ours in zip(formats, planned):
        ckpt = Checkpoint(path)
        ckpt.close()
        qtype = gguf_type(ckpt.expert_format.kind)
        info = infos[name]
        gguf = gguf_copy(model, qtype, echo)
        resident, per_expert = gguf_sizes(gguf, info["total_experts"])
        limits = ({k: int(resident + n * per_expert + overhead) for k, n in info["in_memory"].items()}
                  if info["limit"] else {})
        common = dict(model=str(gguf), format=qtype, engine="llama.cpp", threads=info["threads"])
        theirs = {"a": Case("a: resident", {}, mmap=False, extra_bufts=True, **common),
                  "b": Case("b: RAM 1/2 (cgroup), mmap", {}, memory_limit=limits.get("b"), cold=True, **common),
                  "c": Case("c: RAM 1/4, disk (cgroup), mmap", {}, memory_limit=limits.get("c"), cold=True, **common)}
        out.append([c for letter in cases for c in [*(o for o in ours if o.name.startswith(letter + ":")),
                                                    theirs[letter]]])
        pairs[name] = qtype
        echo(f"  llama.cpp {qtype} ({gguf}): {fmt_bytes(per_expert)} per expert, other weights {fmt_bytes(resident)}; "
             f"threads {info['threads']}"
             + "".join(f", cgroup limit for {k} {fmt_bytes(v)}" for k, v in limits.items()))
    if limits:
        echo(f"  (each llama.cpp limit: its other weights + as many experts as ours holds + {fmt_bytes(overhead)}: "
             f"our {fmt_bytes(RUNTIME_OVERHEAD)} overhead less the {fmt_bytes(max(0, ours_base - theirs_base))} "
             f"our bare child takes over llama.cpp's ({fmt_bytes(ours_base)} with torch, {fmt_bytes(theirs_base)}))")
    return out, pairs


def report_against(ours: list[CaseResult], theirs: list[CaseResult], pairs: dict, echo=print) -> None:
    """Ours beside llama.cpp's run of the same case, in the matching format, and the ratio."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        peer = f"llama.cpp (llama-cpp-python {version('llama-cpp-python')})"
    except PackageNotFoundError:
        peer = "llama.cpp"
    width = max([len(r.name) for r in ours] + [4])
    echo("")
    echo(f"against {peer}: the same weights as GGUF, the same prompt ids, greedy, as many new tokens, as many threads")
    echo(f"{'case':{width}} {'ours':>8} {'tok/s':>7} {'llama.cpp':>9} {'tok/s':>7} {'ours/llama':>10} "
         f"{'their TTFT s':>12} {'their MB read/tok':>17} {'their peak RSS':>14}  how llama.cpp ran")
    ratios_by = {}
    for r in ours:
        t = next((t for t in theirs if t.format == pairs.get(r.format) and t.name[:2] == r.name[:2]), None)
        if t is None:
            continue
        ratio = r.tokens_per_second / t.tokens_per_second if t.tokens_per_second else None
        ratios_by.setdefault(r.name[0], []).append((ratio, r, t))
        echo(f"{r.name:{width}} {r.format:>8} {r.tokens_per_second:7.2f} {t.format:>9} {t.tokens_per_second:7.2f} "
             f"{f'{ratio:.2f}x' if ratio else '-':>10} {t.time_to_first_token:12.2f} "
             f"{t.process_read_bytes_per_token / 1e6:17.1f} {fmt_bytes(t.peak_rss):>14}  {t.placement}")
    targets = (("a", 1.0, "resident, same format"), ("c", 2.0, "a quarter of the experts in memory, llama.cpp mmap"))
    for letter, want, what in targets:
        for ratio, r, t in ratios_by.get(letter, []):
            if ratio is not None:
                echo(f"target {want:.1f}x ({what}): {r.name} [{r.format} vs {t.format}] {ratio:.2f}x, "
                     + ("met" if ratio >= want else "not met"))


def bench(model: str, device: str = "cpu", prompt_tokens: int = 32, new_tokens: int = 32, repeats: int = 3,
          predictors=("none", "gate"), prompts: list[str] | None = None, echo=print, experts=(None,),
          cases=CASES, io_threads=(None,), page_cache=(None,), rounds: int = 1,
          threads: int | None = None, readahead=(None,), against: str | None = None) -> list[CaseResult]:
    """Run the cases for each expert format in `experts` (None: as stored; e.g. ("bf16", "int8",
    "int4")), formats interleaved; the first format is the reference of the second ratio. With
    `rounds` > 1 the whole sequence runs that many times, every other time in reverse order, and
    each figure is the median over rounds.
    `against="llama.cpp"`: llama.cpp runs each case too, right after ours (see `llama_cases`)."""
    against = parse_against(against)
    if against:
        from .llamacpp import require_llama_cpp

        require_llama_cpp()  # before anything slow: one line saying how to install it
        if torch.device(device).type != "cpu":
            raise OffloadError(f"--against llama.cpp compares on the CPU (llama.cpp's CPU build); "
                               f"drop --device {device}")
    formats = [format_directory(model, e) for e in (experts or (None,))]
    planned, infos = [], {}
    for path, name, option in formats:
        cs, info = default_cases(str(path), device, predictors, option, cases, io_threads, page_cache, name,
                                 threads, readahead, confine_b=bool(against))
        planned.append(cs)
        infos[name] = info
    first = infos[formats[0][1]]
    echo(f"model {model}: {first['total_experts']} experts, other weights {fmt_bytes(first['resident_bytes'])}; "
         f"{prompt_tokens}-token prompt, {new_tokens} new tokens, median of {repeats}"
         + (f" x {rounds} rounds" if rounds > 1 else "") + "; torch threads "
         f"{threads or torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
         f"prompts: {'text' if prompts else 'random token ids'}")
    for name, info in infos.items():
        budgets = info["budgets"]
        echo(f"  {name}: {fmt_bytes(info['expert_bytes'])} per expert; expert budgets b "
             f"{fmt_bytes(budgets['b']) if budgets['b'] else '-'}, c {fmt_bytes(budgets['c'])}"
             + (f", cgroup limit for b {fmt_bytes(info['b_limit'])}" if info.get("b_limit") else "")
             + (f", cgroup limit for c {fmt_bytes(info['limit'])}" if info["limit"] else ""))
    if first["limit"] is None and "c" in cases:
        echo("(no cgroup-v1 memory controller here: case c runs unconfined, the page cache may hide the disk)")
    ids, pairs = None, {}
    if against:  # llama.cpp's cases, each right after ours of the same letter, on the prompts ours run
        planned, pairs = llama_cases(model, formats, planned, infos, cases, echo)
        vocab = infos[formats[0][1]]["vocab_size"]
        encode = None
        if prompts:
            from .tokenizer import Tokenizer

            encode = Tokenizer(formats[0][0]).encode
        ids = prompt_ids(vocab, prompt_tokens, repeats, prompts, encode)
    cold_bw = None
    order = interleave(planned)
    per_case: list[list[CaseResult]] = [[] for _ in order]
    for round_ in range(rounds):
        sequence = list(zip(order, per_case))
        if round_ % 2 and not against:
            # Every other round runs the cases in reverse (ABBA): on a disk that slows down as a session
            # reads (this machine's did, 2.2 to 0.7 GB/s), a fixed order favours the cases that run first.
            # llama.cpp's cases keep their place right after ours.
            sequence.reverse()
        for case, done in sequence:
            files = [case.model] if case.engine != "offload" else infos[case.format]["files"]
            if case.cold:
                drop_from_page_cache(files)
                if cold_bw is None:
                    cold_bw = read_bandwidth(files, limit=512 << 20)
                    drop_from_page_cache(files)
            echo(f"  running {case.name} [{case.format}]" + (f", round {round_ + 1}/{rounds}" if rounds > 1 else "")
                 + f" (load average {os.getloadavg()[0]:.1f}) ...")
            done.append(run_child(model, case, prompt_tokens, new_tokens, repeats, prompts, ids))
    results = [merge(done) for done in per_case]
    theirs = [r for r in results if r.engine != "offload"]
    results = [r for r in results if r.engine == "offload"]
    ref_files = infos[formats[0][1]]["files"]
    read_bandwidth(ref_files, limit=512 << 20)  # bring these bytes into the page cache...
    warm_bw = read_bandwidth(ref_files, limit=512 << 20)  # ...then time a RAM-to-RAM copy of them
    link_bw = None
    if torch.device(device).type == "cuda":  # what bounds a GPU run's misses: the copies to the device
        from .profile import h2d_bandwidth

        link_bw = h2d_bandwidth(torch.device(device), 1 << 30)
    report(results, echo)
    echo("")
    echo(f"bandwidth: page-cache copy {warm_bw / 1e9:.2f} GB/s"
         + (f"; cold disk read {cold_bw / 1e9:.2f} GB/s" if cold_bw else "")
         + (f"; pinned host -> device {link_bw / 1e9:.2f} GB/s" if link_bw else ""))
    report_bounds(results, warm_bw, cold_bw, echo, link_bw)
    if against:
        report_against(results, theirs, pairs, echo)
    return results + theirs


def report_bounds(results: list[CaseResult], warm_bw: float, cold_bw: float | None, echo=print,
                  link_bw: float | None = None) -> None:
    """Per offloaded case, the bound it chases: the bytes it moved per token at the bandwidth of each
    path they took (disk or page cache into RAM; on a GPU also pinned RAM -> device, measured in the
    same run), beside the resident run's compute; a case measured above it gets a note saying why."""
    resident = {r.format: r for r in results if r.name == "a: resident"}
    for r in results:
        base = resident.get(r.format)
        if r.name == "a: resident" or base is None or not base.tokens_per_second:
            continue
        bw, what = (cold_bw, "disk read") if r.name.startswith("c") else (warm_bw, "page-cache copy")
        moved = r.bytes_from_disk_per_token
        paths = [(moved, bw, what)] if moved else []
        if link_bw and r.bytes_to_device_per_token:
            paths.append((r.bytes_to_device_per_token, link_bw, "host -> device"))
        times = [m / b if b else 0.0 for m, b, _ in paths]
        floor = max(times, default=0.0)  # the paths run at once: the slowest one bounds the token
        compute = 1 / base.tokens_per_second
        bound = 1 / max(floor, compute)
        echo(f"bound for {r.name} [{r.format}]: "
             + "; ".join(f"{m / 1e6:.1f} MB/token at the {w} bandwidth = {t * 1000:.1f} ms"
                         for (m, _, w), t in zip(paths, times))
             + f" of I/O per token + {compute * 1000:.1f} ms of compute -> "
             f"{1 / (floor + compute):.2f} tok/s without overlap, {bound:.2f} with perfect "
             f"overlap; measured {r.tokens_per_second:.2f} ({r.tokens_per_second / bound:.0%} of that)")
        if r.tokens_per_second > bound:
            cached = r.process_read_bytes_per_token < 0.5 * moved
            echo(f"  note: measured above the bound ({r.tokens_per_second / bound:.2f}x): "
                 + ("the process read far fewer bytes from storage than the engine counted (MB read/tok), so "
                    "the reads came from the page cache, faster than the disk figure assumed"
                    if r.name.startswith("c") and cached else
                    "the bound's compute time is the resident run's and its bandwidth one probe's; a slow "
                    "resident run or a noisy probe (a busy machine) puts it too low"))


def _drop_column(r: CaseResult) -> str:
    if not r.io_threads:
        return "-"
    return "dio" if r.direct_io else "on" if r.drop_page_cache else "off"


def read_over_counted(r: CaseResult) -> float | None:
    """Bytes the process read from storage per expert byte the engine counted (None: none counted)."""
    return r.process_read_bytes_per_token / r.bytes_from_disk_per_token if r.bytes_from_disk_per_token else None


def report(results: list[CaseResult], echo=print) -> None:
    """The results table: speed and ratios, traffic counted and seen by the kernel, waits, memory."""
    reference = results[0].format if results else ""
    width = max([len(r.name) for r in results] + [4])
    show = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    echo("")
    echo(f"{'case':{width}} {'format':>8} {'tok/s':>7} {'x a':>5} {'x ' + reference:>9} {'TTFT s':>7} {'hit':>4} "
         f"{'MB disk/tok':>11} {'MB read/tok':>11} {'read/disk':>9} {'runq wait':>9} {'on-CPU':>6} {'CPU ms/tok':>10} "
         f"{'io':>3} "
         f"{'drop':>4} {'peak RSS':>10} {'RSS added':>10}")
    for r, (own, ref) in zip(results, ratios(results)):
        echo(f"{r.name:{width}} {r.format:>8} {r.tokens_per_second:7.2f} {show(own):>5} {show(ref):>9} "
             f"{r.time_to_first_token:7.2f} {r.hit_rate:4.0%} {r.bytes_from_disk_per_token / 1e6:11.1f} "
             f"{r.process_read_bytes_per_token / 1e6:11.1f} {show(read_over_counted(r)):>9} "
             f"{r.runqueue_wait_share:9.0%} {r.on_cpu_share:6.0%} {r.cpu_seconds_per_token * 1e3:10.1f} "
             f"{r.io_threads or '-':>3} "
             f"{_drop_column(r):>4} "
             f"{fmt_bytes(r.peak_rss):>10} {fmt_bytes(r.peak_rss - r.baseline_rss):>10}")
    echo(f"(x a: over the same format's resident run; x {reference}: over the {reference} run of the same case. "
         "MB disk/tok: expert bytes the engine counted as read; MB read/tok: what the process read from storage "
         "(/proc/self/io read_bytes, readahead included). runq wait: time all threads waited for a core, on-CPU: "
         "time they ran, both summed over threads over wall time; CPU ms/tok: that CPU time per new token (prefill "
         "included). io: the I/O pool; drop: expert reads keep out of the page cache (dio: with O_DIRECT, on: their "
         "pages dropped after each read). RSS added: peak RSS "
         "less the baseline, what loading and running added over the bare interpreter with torch.)")
    base = {r.format: r.tokens_per_second for r in results if r.name == "a: resident"}
    for r in results:
        resident = base.get(r.format)
        if r.name != "a: resident" and resident and r.tokens_per_second > resident:
            echo(f"note: {r.name} [{r.format}] ran faster than resident ({r.tokens_per_second:.2f} against "
                 f"{resident:.2f} tok/s): it does the resident run's work plus the reads, so the runs varied (a "
                 "busy machine, or a slowed resident run); take medians over more --repeats or --rounds")


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    case = Case(**args["case"])
    result = run_case(args["model"], case, args["prompt_tokens"], args["new_tokens"], args["repeats"],
                      args.get("prompts"))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _child_main(sys.argv[1])
