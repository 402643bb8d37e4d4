"""Routing-only prediction and cost-aware prefetch, measured on routing traces (issue 14, item 6).

    python scripts/prefetch_figures.py [--out /tmp/prefetch-figures] [--profiles colab-t4,rtx3060-12g,...]
                                       [--tokens 512] [--no-synthetic]

Traces (fitted on the first half of each, scored and replayed on the second, as the CLI does):

- demo: the shipped demo-model trace (tests/data/demo_trace), token ids included;
- demo-routing: the same routing with the token ids left out, written as JSON Lines and brought
  back by `offload import-trace` (what a server's routing log gives);
- switch: google/switch-base-8's captured routing (tests/data/switch_base_8_trace, imported from
  /work/shared/data/traces/switch-base-8.json the same way when that file is there);
- synthetic-60x4 (unless --no-synthetic): a Qwen1.5-MoE-shaped trace (60 experts, top-4, 24 layers)
  drawn from a residual-stream model (below), where affinity is weak as on the real 60-expert log.

For each: recall@k / recall@2k and the LRU hit rate (half the experts cached per layer, prefetching
the predicted top-k) of `affinity` and `routing` (predictors/evaluate.py, what `offload eval-predictor`
prints), then `offload simulate` per profile: no prefetch, each predictor fetching its top-k every
step (`NAME:topk`), and by expected gain (`NAME`). Every row names the command that gives it; the
figures are computed here through the same functions, each predictor fitted once per trace.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from offload.predictors.evaluate import accuracy, predictor_factory
from offload.predictors.evaluate import simulate as hit_rates
from offload.predictors.trace import Trace, load_trace, save_trace
from offload.profile import load_profile
from offload.simulate import load_shape, predictor_scores, simulate

ROOT = Path(__file__).resolve().parents[1]
SWITCH_JSON = Path("/work/shared/data/traces/switch-base-8.json")
PREDICTORS = ("affinity", "routing")


def to_jsonl(trace: Trace, path: Path, token_ids: bool) -> None:
    """A trace as `offload import-trace` reads it: one row per token and MoE layer."""
    seq = np.zeros(trace.num_tokens, dtype=np.int64)
    seq[trace.sequence_starts[1:]] = 1
    seq = np.cumsum(seq)
    with open(path, "w") as f:
        for t in range(trace.num_tokens):
            for layer in range(trace.num_layers):
                row = {"token": t, "layer": layer, "experts": trace.topk_ids[t, layer].tolist(),
                       "sequence": int(seq[t])}
                if token_ids:
                    row["token_id"] = int(trace.token_ids[t])
                f.write(json.dumps(row) + "\n")


def switch_jsonl(path: Path) -> None:
    """switch-base-8.json's `selections[token][layer]` (expert ids) as import-trace's rows."""
    raw = json.loads(SWITCH_JSON.read_text())
    with open(path, "w") as f:
        for t, layers in enumerate(raw["selections"]):
            for layer, experts in enumerate(layers):
                f.write(json.dumps({"token": t, "layer": layer, "experts": experts}) + "\n")


def import_trace(jsonl: Path, out: Path, experts: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    command = ["offload", "import-trace", str(jsonl), "--out", str(out), "--num-experts", str(experts)]
    print("$", " ".join(command))
    subprocess.run(command, check=True)


def synthetic(experts=60, top_k=4, layers=24, sequences=8, length=512, hidden=64, vocab=3000,
              drift=0.4, tie=0.9, noise=1.0, seed=0) -> Trace:
    """Routing from a toy residual stream: a token's state is its embedding (Zipf-drawn ids) plus its
    sequence's topic; each layer adds `drift` noise and routes top_k of W_l @ state + `noise`, with
    W_l correlated `tie` with W_(l-1). No token ids or router probabilities are kept."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((layers, experts, hidden)) / np.sqrt(hidden)
    for layer in range(1, layers):
        w[layer] = tie * w[layer - 1] + np.sqrt(1 - tie ** 2) * w[layer]
    embed = rng.standard_normal((vocab, hidden))
    zipf = 1 / np.arange(1, vocab + 1)
    ids = np.zeros((sequences * length, layers, top_k), dtype=np.int64)
    for s in range(sequences):
        topic = rng.standard_normal(hidden)
        state = embed[rng.choice(vocab, length, p=zipf / zipf.sum())] + topic  # [n, H]
        for layer in range(layers):
            state = state + drift * rng.standard_normal(state.shape)
            logits = state @ w[layer].T + noise * rng.standard_normal((length, experts))
            ids[s * length:(s + 1) * length, layer] = np.argsort(-logits, axis=1)[:, :top_k]
    n = len(ids)
    probs = np.zeros((n, layers, experts), np.float32)
    np.put_along_axis(probs, ids, 1 / top_k, axis=2)
    return Trace(np.full(n, -1), ids, np.full(ids.shape, 1 / top_k, np.float32), probs,
                 np.arange(0, n, length), None, {"has_token_ids": False, "has_router_probs": False})


def top1_shape(out: Path) -> Path:
    """Mixtral-8x7B's sizes routing top-1, for the switch trace (8 experts, top-1)."""
    raw = json.loads((ROOT / "offload" / "shapes" / "mixtral-8x7b.json").read_text())
    path = out / "mixtral-8x7b-top1.json"
    path.write_text(json.dumps({**raw, "num_experts_per_tok": 1}, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/prefetch-figures")
    parser.add_argument("--profiles", default="colab-t4,rtx3060-12g,rtx4090-24g,cpu-only")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--no-synthetic", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    traces = {"demo": (ROOT / "tests" / "data" / "demo_trace", "mixtral-8x7b")}
    to_jsonl(load_trace(traces["demo"][0]), out / "demo-routing.jsonl", token_ids=False)
    import_trace(out / "demo-routing.jsonl", out / "demo-routing", 8)
    traces["demo-routing"] = (out / "demo-routing", "mixtral-8x7b")
    switch = ROOT / "tests" / "data" / "switch_base_8_trace"
    if SWITCH_JSON.exists():
        switch_jsonl(out / "switch.jsonl")
        import_trace(out / "switch.jsonl", out / "switch", 8)
        switch = out / "switch"
    traces["switch"] = (switch, str(top1_shape(out)))
    if not args.no_synthetic:
        shutil.rmtree(out / "synthetic-60x4", ignore_errors=True)
        save_trace(synthetic(), out / "synthetic-60x4", {"source": "scripts/prefetch_figures.py synthetic()"})
        traces["synthetic-60x4"] = (out / "synthetic-60x4", "qwen1.5-moe-a2.7b")

    profiles = args.profiles.split(",")
    for name, (path, shape) in traces.items():
        trace = load_trace(path)
        fit, test = trace.split(0.5)
        slots = max(trace.top_k, trace.num_experts // 2)
        print(f"\n== {name}: {trace.num_tokens} tokens, {trace.num_layers} layers, top-{trace.top_k} of "
              f"{trace.num_experts}; fitted on {fit.num_tokens}, scored on {test.num_tokens}")
        print(f"$ offload eval-predictor --trace {path}   (LRU, {slots} slots per layer)")
        print(f"{'predictor':10} {'recall@k':>8} {'recall@2k':>9} {'LRU hit':>8} {'+prefetch':>9}")
        plain = hit_rates(test, "lru", slots)["hit_rate"]
        for predictor in PREDICTORS:
            fitted = predictor_factory(predictor, trace)(fit)
            rows = accuracy(fitted, test)
            ahead = hit_rates(test, "lru", slots, fitted.replay(test))["hit_rate"]
            print(f"{predictor:10} {np.mean([r.recall_k for r in rows]):8.3f} "
                  f"{np.mean([r.recall_2k for r in rows]):9.3f} {plain:8.3f} {ahead:9.3f}")
        cfg = load_shape(shape)
        modes = ["none"] + [f"{p}{m}" for p in PREDICTORS for m in (":topk", "")]
        scores = {mode: predictor_scores(mode, fit, test) for mode in modes}
        print(f"$ offload simulate --trace {path} --shape {shape} --tokens {args.tokens} "
              "--profile PROFILE --predictor MODE")
        print(f"{'profile':12}" + "".join(f" {m:>15}" for m in modes) + "   (tok/s, hit)")
        for profile in profiles:
            cells = []
            for mode in modes:
                r = simulate(test, load_profile(profile), cfg, "lru", scores[mode], max_tokens=args.tokens)
                cells.append(f"{r.tokens_per_second:9.3g} {r.hit_rate:4.0%}")
            print(f"{profile:12}" + "".join(f" {c:>15}" for c in cells))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
