"""The `offload` command: a thin click layer over the public API."""

from __future__ import annotations

import math
import os
import re
import sys
import warnings

import click

import offload
import offload.checkpoint
from offload.errors import OffloadError


def _runtime_options(fn):
    """Flags shared by every command that loads a model; they mirror offload.load()."""
    options = [
        click.argument("model", required=False),
        click.option("--device", default="auto", show_default=True, help="Compute device: auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default=None, help="Compute dtype (float32, bfloat16, float16); default: the checkpoint's."),
        click.option("--gpu-memory", default=None, help="Device memory budget, e.g. 6GiB; default: measured free memory."),
        click.option("--cpu-memory", default=None, help="Host RAM budget for expert weights, e.g. 16GiB."),
        click.option("--cache-policy", default="lru", show_default=True, help="Expert cache policy: lru, lfu or score."),
        click.option("--cache-split", default="auto", show_default=True,
                     help="Expert slots in equal per-layer shares (layer), one pool (global), or auto: "
                          "per layer when every layer's share holds top_k experts, else global."),
        click.option("--predictor", default="gate", show_default=True,
                     help="Expert prefetch predictor: none, gate, learned, affinity, routing."),
        click.option("--profile", default=None, help="Hardware profile name or TOML path."),
        click.option("--threads", default=None, type=int,
                     help="CPU threads for matmuls (torch's intra-op pool); default: torch's (one per core)."),
        click.option("--experts", default=None,
                     help="Expert format: int8 or int4 (int4-g32/-g64/-g128), lossy; an unquantized MODEL is "
                          "quantized once into the cache. Default: as stored."),
        click.option("--dense", default=None, type=click.Choice(["int8"]),
                     help="Also keep the attention projections, dense MLPs and LM head in int8 (lossy; fewer bytes "
                          "per token, for CPU decode). Default: the compute dtype."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf (click's range check lets nan through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number in the range {self._describe_range()}.", param, ctx)
        return number


def _sampling_options(fn):
    """Checked here, before the model loads, so that chat refuses them at once rather than at every message.
    The ranges are SamplingParams' (offload/sampling.py), which checks them again for API callers."""
    options = [
        click.option("--max-new-tokens", "-n", default=256, show_default=True, type=click.IntRange(min=1),
                     help="Most tokens to generate per reply."),
        click.option("--temperature", "-t", default=0.0, show_default=True, type=_Finite(min=0),
                     help="Sampling temperature; 0 is greedy."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Sample among the k likeliest tokens; 0 turns it off."),
        click.option("--top-p", default=1.0, show_default=True, type=_Finite(0, 1, min_open=True),
                     help="Nucleus sampling mass; 1.0 turns it off."),
        click.option("--seed", default=None, type=click.IntRange(0, 2**63 - 1),
                     help="Random seed, for reproducible sampling."),
        click.option("--stop", multiple=True, callback=_unescape,
                     help="Stop when this text appears (repeatable). Backslash escapes \\n, \\t, \\r and "
                          "\\\\ are read, so --stop '\\n\\n' stops at a blank line."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(ctx, param, values):
    """--stop values as the shell passes them: \\n, \\t, \\r and \\\\ become the characters they name
    (bash keeps "\\n" as two characters); any other backslash stays as typed."""
    return tuple(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), v) for v in values)


def _load(model, **runtime):
    """offload.load with the _runtime_options, as click passes them; its warnings become one line each."""
    if model is None:
        click.echo("No MODEL given: using the demo model shipped with moe-offload.", err=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # e.g. gpu_memory ignored on a CPU-only run
        llm = offload.load(model, **runtime)
    for w in caught:
        if issubclass(w.category, UserWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:  # another library's warning, shown as Python would have
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    click.echo(f"[{llm.describe()}]", err=True)
    return llm


def _write_json(text: str, path: str) -> None:
    """Write `text` to `path` through a temp name, so a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _predictor_list(ctx, param, text):
    """--predictors as a tuple of known names, checked before any case runs (a case runs in a child process)."""
    from offload.config import PREDICTORS

    names = tuple(name.strip() for name in text.split(","))
    if not all(names) or any(name not in PREDICTORS for name in names):
        raise click.BadParameter(f"{text!r}: give some of {', '.join(PREDICTORS)}, comma-separated")
    return names


class _Group(click.Group):
    """Turns OffloadError into one readable line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OffloadError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(offload.__version__, prog_name="offload")
def main():
    """Run Mixture-of-Experts language models on small hardware."""


@main.command()
@_runtime_options
@_sampling_options
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--stats", "show_stats", is_flag=True,
              help="Print the run's statistics as JSON to stderr afterwards (stdout keeps only the text).")
@click.option("--stats-file", default=None, type=click.Path(dir_okay=False),
              help="Write the statistics as JSON to this file (for `offload plot --stats`).")
@click.option("--timeline", is_flag=True,
              help="Record the last decode step's expert work (compute, stalls, reads, copies per layer) into "
                   "the statistics, for `offload plot`; offloaded runs only (set --cpu-memory or --gpu-memory).")
def generate(model, max_new_tokens, temperature, top_k, top_p, seed, stop, prompt, show_stats, stats_file,
             timeline, **runtime):
    """Continue PROMPT with MODEL (a Hugging Face directory or hub id; default: the demo model)."""
    with _load(model, **runtime) as llm:
        if timeline:
            llm.record_timeline(True)
        for piece in llm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop=list(stop)):
            click.echo(piece, nl=False)
        click.echo()
        click.echo(llm.stats.last.summary(), err=True)
        if show_stats:
            click.echo(llm.stats.to_json(), err=True)
        if stats_file:
            _write_json(llm.stats.to_json(), stats_file)
            click.echo(f"wrote {stats_file}", err=True)


@main.command()
@_runtime_options
@_sampling_options
@click.option("--system", default=None, help="A system message to start the conversation with.")
@click.option("--stats", "show_stats", is_flag=True,
              help="After each reply, print the full statistics as JSON to stderr.")
def chat(model, max_new_tokens, temperature, top_k, top_p, seed, stop, system, show_stats, **runtime):
    """Talk with MODEL in the terminal. /reset starts over, /exit (or Ctrl-D) quits,
    Ctrl-C stops the current reply."""
    with _load(model, **runtime) as llm:
        start = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        click.echo("Type a message. /reset starts over, /exit quits, Ctrl-C stops a reply.", err=True)
        while True:
            try:
                line = click.prompt(click.style("you", fg="green", bold=True), prompt_suffix="> ")
            except (EOFError, KeyboardInterrupt, click.exceptions.Abort):
                click.echo()
                return
            text = line.strip()
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                messages = list(start)
                click.echo("(conversation cleared)", err=True)
                continue
            if not text:
                continue
            messages.append({"role": "user", "content": text})
            reply = []
            click.echo(click.style("model> ", fg="cyan", bold=True), nl=False)
            try:
                for piece in llm.chat(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, stop=list(stop), stream=True):
                    reply.append(piece)
                    click.echo(piece, nl=False)
            except KeyboardInterrupt:
                click.echo(" [stopped]", nl=False)
            except OffloadError as exc:  # e.g. the conversation outgrew the context: keep the session
                messages.pop()
                click.echo(f"\nerror: {exc}", err=True)
                continue
            click.echo()
            messages.append({"role": "assistant", "content": "".join(reply)})
            if llm.stats.last is not None:
                click.echo(click.style(f"[{llm.stats.last.summary()}]", dim=True), err=True)
            if show_stats:
                click.echo(llm.stats.to_json(), err=True)


@main.command()
@click.argument("model", required=False)
@click.option("--bits", required=True, type=int, help="8 (int8, one scale per output channel) or 4 (int4 with "
                                                       "a scale and zero per group).")
@click.option("--group-size", default=None, type=click.IntRange(min=1),
              help="int4 group size along the input: 32, 64 or 128 [default: 32].")
@click.option("--out", required=True, type=click.Path(), help="New directory for the quantized model.")
def quantize(model, bits, group_size, out):
    """Write MODEL (default: the demo model) with int8 or int4 experts to OUT, a model directory
    that every command loads like any other. Lossy: compare with `offload eval-quality`."""
    from offload.quantize import quantize_model

    if bits not in (4, 8):
        raise OffloadError(f"--bits {bits} is not built; use --bits 8 (int8) or --bits 4 (int4)")
    if model is None:
        from offload.demo import demo_model_path

        model = demo_model_path()
    path = quantize_model(model, out, f"int{bits}", group_size)
    size = sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(".safetensors"))
    click.echo(f"wrote {path} ({size / 2**20:.1f} MiB of weights)")


@main.command()
@click.argument("model")
@click.option("--device", default="cpu", show_default=True, help="Compute device: cpu, cuda or cuda:N.")
@click.option("--prompt-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Prompt length of each timed generation.")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens generated per timed run.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per configuration; medians are shown.")
@click.option("--predictors", default="none,gate", show_default=True, callback=_predictor_list,
              help="Comma-separated predictors to run the offloaded cases with: none, gate, learned, affinity.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file, one prompt per line (default: random token ids).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results to this JSON file.")
@click.option("--experts", default=None, help="Comma-separated expert formats to run every case in, e.g. "
              "bf16,int8,int4 (default: as stored); quantized copies are made once, up front. The first "
              "format is the reference of the second ratio.")
@click.option("--cases", default="a,b,c", show_default=True,
              help="Which cases to run: a resident, b RAM cache 1/2, c RAM 1/4 + disk (comma-separated).")
@click.option("--io-threads", default="auto", show_default=True,
              help="Comma-separated I/O pool sizes to run case c with (auto: the engine's own).")
@click.option("--drop-page-cache", default="auto", show_default=True,
              help="Comma-separated page-cache settings to run case c with: auto (as offload.load decides), "
                   "on (reads keep out of it: O_DIRECT where the file system allows it), fadvise (buffered "
                   "reads, their pages dropped after), off (the page cache keeps them).")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1),
              help="Run the whole sequence this many times, every other time in reverse order; figures are "
                   "medians over rounds (for busy machines, and disks whose speed drifts).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch's CPU threads in every case (default: torch's, one per core).")
@click.option("--readahead", default="auto", show_default=True,
              help="Comma-separated readahead settings to run case c with: auto/on (the kernel's), off "
                   "(fadvise RANDOM on the expert files: each read fetches what it asks for; an experiment).")
@click.option("--against", default=None, metavar="llama.cpp",
              help="Also run every case with llama.cpp (needs the gguf extra: llama-cpp-python) on the same model "
                   "written as GGUF once (F16 for bf16 experts, Q8_0 for int8, Q4_0 for int4; Mixtral-architecture "
                   "models only), the same prompts, threads and memory share, and print both and the ratio.")
def bench(model, device, prompt_tokens, new_tokens, repeats, predictors, prompts_file, json_out, experts, cases,
          io_threads, drop_page_cache, rounds, threads, readahead, against):
    """Time MODEL resident, with half the experts cached, and with a quarter in RAM and the rest on disk."""
    import json
    from dataclasses import asdict

    from offload.bench import bench as run_bench
    from offload.bench import (parse_against, parse_cases, parse_io_threads, parse_list, parse_page_cache,
                               parse_readahead)

    against = parse_against(against)
    if against:  # before reading prompts or models: one line saying how to install it, exit code 2
        from offload.llamacpp import require_llama_cpp

        require_llama_cpp()
    prompts = [line.strip() for line in open(prompts_file, encoding="utf-8") if line.strip()] if prompts_file else None
    results = run_bench(model, device, prompt_tokens, new_tokens, repeats, predictors,
                        prompts, echo=click.echo, experts=parse_list(experts) or (None,), cases=parse_cases(cases),
                        io_threads=parse_io_threads(io_threads), page_cache=parse_page_cache(drop_page_cache),
                        rounds=rounds, threads=threads, readahead=parse_readahead(readahead), against=against)
    if json_out:
        tmp = json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
        os.replace(tmp, json_out)


@main.command()
@click.argument("model")
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file: one prompt per line (each recorded as its own sequence).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for the trace.")
@click.option("--hidden", is_flag=True, help="Also keep every MoE layer's router input (for train-predictor).")
@click.option("--device", default="auto", show_default=True, help="Compute device: auto, cpu, cuda or cuda:N.")
def trace(model, prompts, out, hidden, device):
    """Record which experts MODEL routes every token of PROMPTS to (offload-trace/1)."""
    from offload.predictors.trace import save_trace

    try:
        lines = [line.rstrip("\n") for line in open(prompts, encoding="utf-8") if line.strip()]
    except UnicodeDecodeError as exc:
        raise OffloadError(f"{prompts} is not UTF-8 text ({exc}); convert it, e.g. with iconv -t utf-8") from None
    if not lines:
        raise OffloadError(f"{prompts} has no non-empty line")
    from pathlib import Path

    from offload.writer import check_new_directory

    out = os.path.realpath(out)  # through a symlink: the trace goes where it points, not beside the link
    check_new_directory(Path(out))  # before the model is loaded and run
    with offload.load(model, device=device, predictor="none") as llm:
        recorded = llm.trace(lines, hidden=hidden, progress=True)
        save_trace(recorded, out, {"model": str(llm.path), "architecture": llm.config.family.architecture,
                                   "source": f"prompts from {prompts}"})
    click.echo(f"wrote {out}: {recorded.num_tokens} tokens, {recorded.num_layers} MoE layers")


@main.command("train-predictor")
@click.argument("model")
@click.option("--trace", "trace_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A trace recorded with --hidden.")
@click.option("--lookahead", default=1, show_default=True, type=click.IntRange(min=1),
              help="How many MoE layers ahead to predict (fewer than the trace's MoE layers).")
@click.option("--epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="Full-batch training epochs per layer.")
@click.option("--out", default=None, type=click.Path(), help="Where to save (default: predictor.safetensors in MODEL).")
def train_predictor(model, trace_dir, lookahead, epochs, out):
    """Train the learned predictor on a trace and save it next to MODEL, where load() finds it."""
    from offload.checkpoint import resolve_model_path
    from offload.predictors.learned import FILENAME, LearnedPredictor
    from offload.predictors.trace import load_trace

    recorded = load_trace(trace_dir)
    if lookahead >= recorded.num_layers:  # the lower bounds are the options' types
        raise OffloadError(f"--lookahead {lookahead} must be between 1 and the trace's MoE layers less one "
                           f"({recorded.num_layers - 1})")
    predictor = LearnedPredictor.train(recorded, lookahead=lookahead, epochs=epochs, progress=True)
    path = predictor.save(out or resolve_model_path(model) / FILENAME)
    click.echo(f"saved {path}")


@main.command("eval-predictor")
@click.option("--trace", "trace_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The trace to score on.")
@click.option("--model", default=None, help="Model directory: needed for the gate predictor (its routers).")
@click.option("--slots-per-layer", default=None, type=click.IntRange(min=1),
              help="Cache size for the hit-rate table, from top_k to the number of experts (default: half the "
                   "experts).")
@click.option("--train-fraction", default=0.5, show_default=True, type=_Finite(0, 1, min_open=True, max_open=True),
              help="Share of the trace's tokens that affinity and learned fit on; the rest is scored.")
@click.option("--epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="Training epochs of the learned predictor.")
def eval_predictor(trace_dir, model, slots_per_layer, train_fraction, epochs):
    """Recall and precision of each predictor on a trace, and cache hit rates with and without prefetch."""
    from offload.predictors.evaluate import predictor_factory, report
    from offload.predictors.learned import LearnedPredictor
    from offload.predictors.trace import load_trace

    recorded = load_trace(trace_dir)
    if slots_per_layer is not None and not recorded.top_k <= slots_per_layer <= recorded.num_experts:
        raise OffloadError(f"--slots-per-layer {slots_per_layer} must be between top_k ({recorded.top_k}) and the "
                           f"number of experts ({recorded.num_experts})")
    fit, test = recorded.split(train_fraction)
    click.echo(f"fitted on {fit.num_tokens} tokens, scored on {test.num_tokens} (a {train_fraction:g} split by "
               "tokens)" + ("" if recorded.header.get("has_token_ids", True) else
                            "; no token ids in this trace: affinity's token prior is one frequency prior"))
    predictors = {}
    if model is not None and test.hidden is not None:
        model_path = offload.checkpoint.resolve_model_path(model)
        predictors["gate"] = predictor_factory("gate", recorded, model_path)(fit)
    if fit.hidden is not None:
        predictors["learned"] = LearnedPredictor.train(fit, epochs=epochs, progress=True)
    for name in ("affinity", "routing"):  # routing only: they run on every trace
        predictors[name] = predictor_factory(name, recorded)(fit)
    missing = [n for n in ("gate", "learned") if n not in predictors]
    if missing:
        click.echo(f"{', '.join(missing)}: n/a (they need a trace recorded with --hidden"
                   f"{' and --model' if 'gate' in missing else ''})")
    report(test, predictors, slots_per_layer or max(recorded.top_k, recorded.num_experts // 2), echo=click.echo)


@main.command()
@click.option("--trace", "trace_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Routing trace to replay (its second half; predictors fit on the first).")
@click.option("--profile", "profile_name", default="colab-t4", show_default=True,
              help="Hardware profile name or TOML path.")
@click.option("--shape", default="mixtral-8x7b", show_default=True,
              help="Model sizes: a shipped shape (offload/shapes/: mixtral-8x7b, qwen3-30b-a3b, deepseek-v2-lite, ...), "
                   "a config.json, a model "
                   "directory, or a hub id (only its config.json is downloaded).")
@click.option("--policy", default="lru", show_default=True, help="Cache policy: lru, lfu or score.")
@click.option("--predictor", default="none", show_default=True,
              help="none, routing, affinity, learned, gate; NAME:topk fetches the predicted top-k every step "
                   "(default: by expected gain, calibrated on the trace's first half).")
@click.option("--cpu/--no-cpu", default=True, show_default=True, help="Allow computing missed experts on the CPU.")
@click.option("--model", default=None, help="Model directory, for the gate predictor's routers.")
@click.option("--gpu-memory", default=None, help="Device budget (default: the profile's memory less 1 GiB).")
@click.option("--cpu-memory", default=None, help="Host budget for experts (default: the profile's RAM less 2 GiB "
                                                  "and the resident weights).")
@click.option("--cache-split", default="auto", show_default=True, help="auto, layer or global, as for generate.")
@click.option("--dtype", default=None, help="Weights' dtype (default: the shape's, as a run would use).")
@click.option("--tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Decode steps replayed, at most.")
@click.option("--prompt-tokens", default=0, show_default=True, type=click.IntRange(min=0),
              help="The first N tokens of each trace sequence are one prefill step, not decode steps.")
@click.option("--experts", default=None,
              help="Experts' format, as for generate: bf16, int8, int4 (group 32), int4-g64, int4-g128 "
                   "(default: as the shape stores them).")
@click.option("--table", is_flag=True, help="Sweep every shipped profile, policy, predictor and CPU setting "
                                            "(at the --experts format).")
def simulate(trace_dir, profile_name, shape, policy, predictor, cpu, model, gpu_memory, cpu_memory, cache_split,
             dtype, tokens, prompt_tokens, experts, table):
    """Model the decode speed of a configuration by replaying a trace through the real caches and scheduler."""
    import itertools

    from offload.config import parse_memory
    from offload.predictors.trace import load_trace
    from offload.profile import load_profile, shipped_profiles
    from offload.simulate import load_shape, predictor_scores, shape_format
    from offload.simulate import simulate as run

    cfg = load_shape(shape)
    fmt = shape_format(shape, experts)  # as stored, or converted; a misspelt format fails here
    recorded = load_trace(trace_dir)
    fit, test = recorded.split(0.5)
    gpu, host = parse_memory(gpu_memory, "gpu_memory"), parse_memory(cpu_memory, "cpu_memory")
    click.echo(f"{shape} sizes, {fmt.name if fmt.quantized else 'unquantized'} experts, routing from {trace_dir} "
               f"({min(test.num_tokens, tokens)} decode tokens replayed)")
    header = f"{'profile':12} {'policy':6} {'predictor':9} {'cpu':4} {'tok/s':>8} {'hit':>5} {'CPU share':>9} " \
             f"{'disk MB/tok':>11} {'link MB/tok':>11} {'slots dev/host':>14} split"
    click.echo(header)
    profiles = shipped_profiles() if table else [profile_name]
    predictors = ("none", "routing", "affinity", "learned", "gate") if table else (predictor,)
    scores = {}
    for name in predictors:
        try:
            scores[name] = predictor_scores(name, fit, test, model)
        except OffloadError as exc:
            if not table:
                raise
            click.echo(f"(skipping {name}: {exc})", err=True)
    best, baseline = {}, {}  # profile -> (tok/s, policy, predictor, cpu); baseline: LRU, no prefetch, no CPU
    for prof in profiles:
        hw = load_profile(prof)
        allows = (False, True) if table and hw.device != "cpu" else (cpu,)
        for pol, name, allow in itertools.product(("lru", "lfu", "score") if table else (policy,), scores, allows):
            try:
                r = run(test, hw, cfg, pol, scores[name], allow, gpu, host, tokens, cache_split, dtype,
                        prompt_tokens, fmt)
            except OffloadError as exc:
                if not table:
                    raise
                click.echo(f"{hw.name:12} {exc}")
                best[hw.name] = None
                break  # the plan does not fit this profile, whatever the policy: the next profile
            p = r.placement
            click.echo(f"{hw.name:12} {pol:6} {name:9} {'yes' if allow else 'no':4} "
                       f"{r.tokens_per_second:8.3g} {r.hit_rate:5.0%} {r.cpu_share:9.0%} "
                       f"{r.disk_bytes_per_token / 1e6:11.1f} {r.link_bytes_per_token / 1e6:11.1f} "
                       f"{f'{p.device_slots}/{p.host_slots}':>14} {p.split}"
                       + (f"  prefill {r.prefill_seconds:.3g} s" if prompt_tokens else ""))
            entry = (r.tokens_per_second, pol, name, "CPU experts" if allow and hw.device != "cpu" else "")
            best[hw.name] = max(best.get(hw.name, entry), entry)
            if (pol, name, allow and hw.device != "cpu") == ("lru", "none", False):
                baseline[hw.name] = entry[0]
    if table:
        click.echo("\nfastest modeled per profile (baseline: lru, no prefetch, no CPU experts):")
        for name, entry in best.items():
            if entry is None:
                click.echo(f"  {name:12} no placement fits (see above)")
                continue
            speed, pol, pred, side = entry
            base = baseline.get(name, float("nan"))
            click.echo(f"  {name:12} {', '.join(x for x in (pol, pred, side) if x):32} {speed:8.3g} tok/s "
                       f"(baseline {base:.3g}, x{speed / base:.2f})")


@main.command()
@click.argument("model", required=False)
@click.option("--device", default="auto", show_default=True, help="Device to measure: auto, cpu, cuda or cuda:N.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the profile here (TOML).")
@click.option("--tmp-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Without MODEL, where the disk is measured on a 512 MiB temporary file (removed afterwards); "
                   "default: the system's temp directory. Pick the drive your models live on.")
def profile(model, device, out, tmp_dir):
    """Measure this machine (copy, disk and expert-matmul speeds at MODEL's shapes) into a hardware profile."""
    import tempfile

    from offload.profile import in_memory_fs, measure, save_profile

    if model is None:
        where = tmp_dir or tempfile.gettempdir()
        click.echo(f"No MODEL: the disk is measured on a 512 MiB temporary file in {where} (removed afterwards; "
                   "--tmp-dir DIR measures another drive).", err=True)
        if in_memory_fs(where):
            click.echo(f"warning: {where} is in RAM (tmpfs): the disk figure will be memory's; pass --tmp-dir "
                       "on the drive your models live on", err=True)
    measured = measure(model, device=device, tmp_dir=tmp_dir)
    for field, value in vars(measured).items():
        click.echo(f"{field:20} {value}")
    if out:
        click.echo(f"wrote {save_profile(measured, out)}")


@main.command("check-gpu")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the random checkpoints go (about 21 GB; kept for the next run). Default: a folder "
                   "in the system's temp directory.")
@click.option("--device", default="cuda", show_default=True, help="cuda or cuda:N (cpu with --tiny, for a dry run).")
@click.option("--shapes", default="mixtral,128x8", show_default=True,
              help="Comma-separated: mixtral (Mixtral-8x7B, 4 layers), 128x8 (Qwen3-30B-A3B's experts, 8 layers).")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(4, 4096), help="Decode tokens per run.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 50), help="Runs per figure (median).")
@click.option("--no-accelerate", is_flag=True, help="Skip transformers + accelerate offloading (slow: ~1 tok/s).")
@click.option("--tiny", is_flag=True, help="Tiny versions of the shapes: checks the command itself in seconds.")
@click.option("--experts", "expert_formats", default="",
              help="Comma-separated quantized formats to run too (int8, int4, int4-g128, ...): resident, and for "
                   "the Mixtral shape in the offloaded budget. Each is quantized once on this CPU (minutes).")
def check_gpu(workdir, device, shapes, tokens, repeats, no_accelerate, tiny, expert_formats):
    """Decode speed on this GPU against transformers and the bandwidth bounds, on random checkpoints
    of real shapes built on the GPU (scripts/gpu_check.sh runs this after the gpu-marked tests)."""
    import tempfile
    from pathlib import Path

    import torch

    from offload.gpucheck import SHAPES, check

    names = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or not names:
        raise click.UsageError(f"--shapes takes {', '.join(SHAPES)}; got {shapes!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError("no CUDA GPU here; run this on a machine with one (or --device cpu --tiny)")
    if device == "cpu" and not tiny:
        raise click.UsageError("--device cpu is for a dry run of the command: add --tiny")
    where = Path(workdir) if workdir else Path(tempfile.gettempdir()) / "moe-offload-gpu-check"
    where.mkdir(parents=True, exist_ok=True)
    from offload.formats import parse_experts

    formats = tuple(f.strip() for f in expert_formats.split(",") if f.strip())
    for fmt in formats:
        try:
            parse_experts(fmt)
        except OffloadError as exc:
            raise click.BadParameter(str(exc), param_hint="--experts") from None
    check(where, device, tuple(names), tokens, repeats, accelerate=not no_accelerate, tiny=tiny, echo=click.echo,
          experts=formats)


@main.command("eval-quality")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--text", "text_file", required=True, metavar="FILE", help="UTF-8 text to score, e.g. held-out data.")
@click.option("--window", default=None, type=int,
              help="Tokens per scored window (they overlap by one); default: 512 or the context, if shorter.")
@click.option("--max-tokens", default=20000, show_default=True,
              help="Score at most this many tokens from the start of the text; 0 scores all of it.")
@click.option("--experts-b", default=None,
              help="Load MODEL_B with this expert format (int8, int4, int4-g32...), e.g. with MODEL_B = MODEL_A.")
@click.option("--device", default="auto", show_default=True, help="Compute device: auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default=None, help="Compute dtype (float32, bfloat16, float16); default: the checkpoint's.")
@click.option("--threads", default=None, type=int, help="CPU threads for matmuls; default: torch's (one per core).")
@click.option("--dense-b", default=None, type=click.Choice(["int8"]),
              help="Load MODEL_B with its attention, dense MLPs and LM head in int8 (see --dense).")
def eval_quality(model_a, model_b, text_file, window, max_tokens, experts_b, dense_b, device, dtype, threads):
    """Perplexity of MODEL_A (the reference) and MODEL_B on the --text FILE, KL(A || B) of their next-token
    distributions and how often their likeliest tokens agree: what a lossy format costs."""
    from offload.quality import compare

    report = compare(model_a, model_b, text_file, window=window, max_tokens=max_tokens or None,
                     experts_b=experts_b, dense_b=dense_b, progress=True, echo=lambda m: click.echo(m, err=True),
                     device=device, dtype=dtype, threads=threads)
    click.echo(report.table())


@main.command()
@_runtime_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the server to the network (set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--api-key", default=None, envvar="OFFLOAD_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/ routes (or set OFFLOAD_API_KEY).")
@click.option("--model-name", default=None,
              help="Model id clients send and /v1/models lists; default: MODEL's name, or 'demo'.")
@click.option("--max-body", default="1MiB", show_default=True, help="Largest request body; larger ones get a 413.")
@click.option("--max-queue", default=256, show_default=True,
              help="Requests that may wait for the generation worker; more get a 503.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn's log level.")
def serve(model, host, port, api_key, model_name, max_body, max_queue, log_level, **runtime):
    """Serve MODEL over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics. Requests run one at a time, in arrival order. Needs `pip install "moe-offload[serve]"`."""
    from offload.config import parse_memory

    try:
        from offload.server import ServerConfig, served_name
        from offload.server import serve as run_server
    except ImportError as exc:
        raise OffloadError(f"offload serve needs the serve extra ({exc.name} is missing): "
                           "pip install \"moe-offload[serve]\"") from None
    model_name = model_name or served_name(model)
    config = ServerConfig(model_name=model_name, api_key=api_key, max_body_bytes=parse_memory(max_body, "--max-body"),
                          max_queue=max_queue)
    with _load(model, **runtime) as llm:
        click.echo(f"serving {model_name!r} on http://{host}:{port}/v1", err=True)
        run_server(llm, host=host, port=port, config=config, log_level=log_level)


@main.command()
@click.option("--trace", "trace_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A routing trace (offload trace --out DIR): heatmap of the share of tokens each expert gets, "
                   "per layer.")
@click.option("--stats", "stats_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A run's statistics (generate --stats-file FILE): hit rate and bytes moved per layer, and "
                   "the last decode step's timeline when recorded with --timeline.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The PNG file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def plot(trace_dir, stats_file, out, force):
    """Draw a routing trace and/or a run's statistics into one PNG (needs `pip install "moe-offload[plot]"`)."""
    from offload.plot import figure, load_stats, save_png
    from offload.predictors.trace import load_trace

    if trace_dir is None and stats_file is None:
        raise OffloadError("nothing to plot: give --trace DIR (a routing trace) and/or --stats FILE "
                           "(from `offload generate ... --stats-file FILE`)")
    if os.path.exists(out) and not force:  # before any work
        raise OffloadError(f"{out} already exists; choose another --out or pass --force to overwrite it")
    trace = load_trace(trace_dir) if trace_dir else None
    stats = load_stats(stats_file) if stats_file else None
    if stats is not None and not stats.get("timeline"):
        click.echo(f"({stats_file} has no timeline: record one with `offload generate ... --timeline "
                   "--stats-file FILE` on an offloaded run)", err=True)
    fig, panels = figure(trace, stats)
    save_png(fig, out, force=force)
    click.echo(f"wrote {out}: {', '.join(panels)}")


@main.command("import-trace")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for the trace.")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True,
              help="jsonl: one JSON object per token and MoE layer (see predictors/importer.py).")
@click.option("--num-experts", type=click.IntRange(min=1), default=None,
              help="Experts per layer, when the rows carry no full router distribution (default: the "
                   "largest expert id + 1).")
def import_trace(file, out, fmt, num_experts):
    """Turn a routing log from another tool into an offload-trace/1 directory, for eval-predictor,
    train-predictor and simulate."""
    from offload.predictors.importer import import_trace as run

    trace = run(file, out, num_experts)
    missing = [name for name, flag in (("token ids", "has_token_ids"), ("router probabilities", "has_router_probs"))
               if not trace.header[flag]]
    click.echo(f"wrote {out}: {trace.num_tokens} tokens, {trace.num_layers} MoE layers, top-{trace.top_k} of "
               f"{trace.num_experts} experts, {len(trace.sequence_starts)} sequence(s)"
               + (f"; without {' and '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
