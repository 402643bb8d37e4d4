"""`offload check-gpu`: what this runtime does on the GPU at hand, against transformers, in minutes.

Builds random checkpoints on the GPU (seconds, where the CPU takes minutes): a Mixtral-8x7B-shaped
one and a 128-expert top-8 one (Qwen3-30B-A3B's shape), a few layers each; then per shape decodes
with transformers and with this runtime, all experts resident, and for the Mixtral shape with a
quarter of the experts on the GPU and the rest in pinned host RAM (no predictor, the gate
predictor, a measured profile deciding CPU experts; transformers + accelerate's device_map="auto"
with the same budget). Each figure is set against its bound, measured in the same run:
  resident   the device's copy bandwidth over the weight bytes a token reads (the non-expert
             weights but the embedding, plus top_k experts per MoE layer): the floor of a decode
  offloaded  the pinned host -> device bandwidth over the expert bytes a decode token moved
Decode speeds are medians over repeats; transformers' is the slope between a 1-token and an
(n+1)-token generate, so its prefill is not counted either.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHAPES = {  # name -> (shipped shape, overrides): the layer counts of the first GPU run
    "mixtral": ("mixtral-8x7b", dict(num_hidden_layers=4)),
    "128x8": ("qwen3-30b-a3b", dict(num_hidden_layers=8)),
}
TINY = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000)  # the CPU test's


@dataclass
class Row:
    shape: str
    runner: str
    tokens_per_second: float
    bound: float = 0.0  # tok/s the bandwidth allows (0: none stated)
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s the device reads and writes in a copy (counting both), median of 5."""
    from .profile import _median_seconds

    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / _median_seconds(lambda: b.copy_(a), 5, lambda: sync(device))


def prompt_ids(vocab: int, n: int = 16) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def ours(path: Path | object, device: torch.device, new: int, repeats: int, **options) -> tuple[float, float, object]:
    """Decode tok/s (median) of this runtime, the expert bytes a decode token moved (median; an
    (n+1)-token run's bytes less a 1-token run's, over n), and the runtime (`path` may be one)."""
    import offload

    llm = offload.load(path, device=str(device), **options) if isinstance(path, Path) else path
    prompt = prompt_ids(llm.model.cfg.vocab_size)

    def moved(n: int):
        before = llm.stats.bytes_to_device + llm.stats.bytes_from_disk
        result = llm.generate(prompt, max_new_tokens=n)
        return result.stats.tokens_per_second, llm.stats.bytes_to_device + llm.stats.bytes_from_disk - before

    moved(4)  # warm-up: kernels chosen, caches filled
    speeds, per_token = [], []
    for _ in range(repeats):
        speed, long = moved(new + 1)
        _, short = moved(1)
        speeds.append(speed)
        per_token.append(max(0, long - short) / new)
    return statistics.median(speeds), statistics.median(per_token), llm


def weight_bytes_per_token(llm) -> int:
    """What a decode token reads at least: every resident weight but the embedding (one row), and
    top_k experts in each MoE layer."""
    cfg = llm.model.cfg
    dense = sum(p.numel() * p.element_size() for name, p in llm.model.named_parameters() if "embed_tokens" not in name)
    return dense + len(cfg.moe_layers) * cfg.top_k * llm.placement.expert_bytes


def transformers_rate(path: Path, device: torch.device, new: int, repeats: int, **load) -> float:
    """transformers' decode tok/s: (n+1)-token generate less a 1-token one, medians."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **load).eval()
    first = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(model.config.vocab_size)], device=first)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    run(2)
    short = statistics.median(run(1) for _ in range(repeats))
    long = statistics.median(run(new + 1) for _ in range(repeats))
    return new / max(long - short, 1e-9)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check(workdir: Path, device: str = "cuda", shapes=tuple(SHAPES), new: int = 64, repeats: int = 3,
          accelerate: bool = True, tiny: bool = False, echo=print, experts: tuple = ()) -> list[Row]:
    """`experts`: quantized formats ("int8", "int4", ...) to run resident and, for the Mixtral shape, with
    a quarter of the experts on the GPU too (quantized once on this machine's CPU: minutes)."""
    from . import triton_moe
    from .grouped import grouped_mm_runs
    from .profile import h2d_bandwidth, measure, save_profile
    from .synthetic import make_synthetic, shape_config

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    echo(f"device {name}; torch {torch.__version__}; grouped_mm in bf16: "
         f"{'yes' if grouped_mm_runs(dev, torch.bfloat16) else 'no (per-expert loop)'}"
         + (f"; Triton int8/int4 kernels: {'yes' if triton_moe.available(dev, torch.bfloat16) else 'no (dequantized)'}"
            if experts and dev.type == "cuda" else ""))
    hbm, link = copy_bandwidth(dev), (h2d_bandwidth(dev, 1 << 30) if dev.type == "cuda" else 0.0)
    echo(f"copy bandwidth {hbm / 1e9:.0f} GB/s (read + write); pinned host -> device {link / 1e9:.1f} GB/s")
    rows: list[Row] = []
    for shape in shapes:
        base, overrides = SHAPES[shape]
        config = shape_config(base, **{**overrides, **(TINY if tiny else {})})
        start = time.perf_counter()
        path = make_synthetic(workdir / f"{shape}{'-tiny' if tiny else ''}", config, device=device)
        echo(f"{shape}: {base} with {config['num_hidden_layers']} layers at {path} "
             f"({time.perf_counter() - start:.0f} s to make or find)")
        hf = transformers_rate(path, dev, new, repeats, device_map=device)
        rows.append(Row(shape, "transformers, resident", hf))
        free(dev)
        speed, _, llm = ours(path, dev, new, repeats)
        floor = hbm / 2 / weight_bytes_per_token(llm)  # reading the weights once, at half the copy's bytes
        resident_bytes, expert_bytes, total = (llm.placement.resident_bytes, llm.placement.expert_bytes,
                                               llm.placement.total_experts)
        rows.append(Row(shape, "ours, resident", speed, floor, f"{speed / hf:.2f}x transformers; "
                        + llm.describe().split("; ", 2)[-1]))
        if dev.type == "cuda":
            llm.cuda_graphs = False
            eager, _, _ = ours(llm, dev, new, repeats)
            rows.append(Row(shape, "ours, resident, CUDA graphs off", eager, floor, f"{eager / hf:.2f}x transformers"))
        llm.close()
        del llm
        free(dev)
        for fmt in experts:  # quantized experts, resident: the floor counts the format's bytes
            speed, _, llm = ours(path, dev, new, repeats, experts=fmt)
            floor_q = hbm / 2 / weight_bytes_per_token(llm)
            rows.append(Row(shape, f"ours, resident, {llm.expert_format.name} experts", speed, floor_q,
                            f"{speed / hf:.2f}x transformers; " + llm.describe().split("; ", 2)[-1]))
            llm.close()
            del llm
            free(dev)
        if shape != "mixtral":
            continue
        budget = resident_bytes + total // 4 * expert_bytes + (256 << 20)
        budgets = dict(gpu_memory=budget) if dev.type == "cuda" else dict(cpu_memory=total // 4 * expert_bytes)
        profile = save_profile(measure(path, device=device, read_bytes=(64 if tiny else 512) << 20),
                               workdir / f"profile-{shape}.toml")
        for runner, options in (("none", dict(predictor="none")), ("gate", dict(predictor="gate")),
                                ("profile", dict(predictor="none", profile=str(profile)))):
            speed, moved, llm = ours(path, dev, max(2, new // 4), repeats, **budgets, **options)
            bound = link / moved if moved else 0.0
            rows.append(Row(shape, f"ours, a quarter of the experts on the GPU, predictor {options['predictor']}"
                            + (", measured profile" if runner == "profile" else ""), speed, bound,
                            f"{moved / 1e6:.0f} MB/token moved; {llm.describe().splitlines()[0]}"))
            llm.close()
            del llm
            free(dev)
        for fmt in experts:  # the same budget in bytes holds more quantized experts
            speed, moved, llm = ours(path, dev, max(2, new // 4), repeats, experts=fmt, predictor="gate", **budgets)
            rows.append(Row(shape, f"ours, same budget, {llm.expert_format.name} experts, predictor gate", speed,
                            link / moved if moved else 0.0,
                            f"{moved / 1e6:.0f} MB/token moved; {llm.describe().splitlines()[0]}"))
            llm.close()
            del llm
            free(dev)
        if accelerate and dev.type == "cuda":
            hf_off = transformers_rate(path, dev, 2, 1, device_map="auto",
                                       max_memory={0: budget, "cpu": 1 << 40})
            rows.append(Row(shape, "transformers + accelerate, same budget", hf_off))
            free(dev)
    report(rows, echo)
    return rows


def report(rows: list[Row], echo=print) -> None:
    echo("")
    echo(f"{'shape':8} {'runner':80} {'tok/s':>8} {'bound':>8} {'of bound':>8}  note")
    for r in rows:
        share = f"{r.tokens_per_second / r.bound:.0%}" if r.bound else "-"
        echo(f"{r.shape:8} {r.runner:80} {r.tokens_per_second:8.1f} {r.bound or 0:8.1f} {share:>8}  {r.note}")
