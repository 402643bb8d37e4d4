"""Figures of a run, for `offload plot`: which experts a routing trace uses (a layers x experts
heatmap), and from a run's stats JSON the hit rate and bytes moved per layer and the timeline of
its last decode step (recorded with `generate --timeline`).

matplotlib is optional (`pip install "moe-offload[plot]"`). Figures are built with
`matplotlib.figure.Figure`, never pyplot: no GUI backend, no global state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import OffloadError

# Timeline colours and lanes: the main thread computes and stalls, the I/O threads read and copy,
# the CPU worker computes missed experts beside the device.
KINDS = {
    "compute": ("tab:blue", 0, "expert compute (main thread)"),
    "stall": ("tab:red", 0, "stall: waiting for an expert"),
    "read": ("tab:orange", 1, "disk read (I/O thread)"),
    "fetch": ("tab:purple", 1, "host -> device copy (I/O thread)"),
    "cpu": ("tab:green", 2, "expert on the CPU worker"),
}
LANES = ("main", "I/O", "CPU")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OffloadError('offload plot needs matplotlib: pip install "moe-offload[plot]" '
                           '(in a checkout: pip install -e ".[plot]")') from None
    return Figure


def load_stats(path) -> dict:
    """A stats JSON as `generate --stats-file` writes it (RuntimeStats.as_dict), checked."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OffloadError(f"cannot read {path} as JSON ({exc}); write one with "
                           "`offload generate ... --stats-file FILE`") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("layers"), dict):
        raise OffloadError(f"{path} is not an offload stats JSON (no per-layer \"layers\"); write one with "
                           "`offload generate ... --stats-file FILE`")
    return stats


def expert_usage(trace) -> np.ndarray:
    """[L, E]: the share of the trace's tokens routed to each expert of each MoE layer (rows sum to top_k)."""
    counts = np.zeros((trace.num_layers, trace.num_experts))
    for layer in range(trace.num_layers):
        counts[layer] = np.bincount(trace.topk_ids[:, layer].reshape(-1), minlength=trace.num_experts)
    return counts / max(1, trace.num_tokens)


def figure(trace=None, stats: dict | None = None):
    """One figure, panels top to bottom: expert usage (with a trace), hit rate and bytes moved per
    layer (with stats), the decode-step timeline (when the stats have one). Returns (Figure, names)."""
    if trace is None and stats is None:
        raise OffloadError("nothing to plot: give a routing trace (--trace DIR) and/or a stats JSON (--stats FILE)")
    panels = []
    if trace is not None:
        panels.append(("expert usage", max(2.2, 0.45 * trace.num_layers + 1.2)))
    if stats is not None:
        panels += [("hit rate per layer", 2.6), ("bytes moved per layer", 2.6)]
        if stats.get("timeline"):
            layers = len({e["layer"] for e in stats["timeline"]["events"]}) or 1
            panels.append(("decode-step timeline", max(3.2, 0.55 * layers + 2.2)))
    Figure = _figure_class()
    fig = Figure(figsize=(10, sum(h for _, h in panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, height_ratios=[h for _, h in panels], squeeze=False)[:, 0]
    draw = {"expert usage": lambda ax: _usage(fig, ax, trace),
            "hit rate per layer": lambda ax: _hit_rate(ax, stats),
            "bytes moved per layer": lambda ax: _bytes(ax, stats),
            "decode-step timeline": lambda ax: _timeline(ax, stats["timeline"])}
    for (name, _), ax in zip(panels, axes):
        draw[name](ax)
    return fig, [name for name, _ in panels]


def _usage(fig, ax, trace) -> None:
    usage = expert_usage(trace)  # [L, E]
    image = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    L, E = usage.shape
    uniform = trace.top_k / trace.num_experts
    model = trace.header.get("model")
    name = model.get("name", "") if isinstance(model, dict) else str(model or "")
    ax.set_title(f"expert usage: share of {trace.num_tokens} tokens routed to each expert (top-{trace.top_k}; "
                 f"uniform {uniform:.3g})" + (f"\n{name}" if name else ""), fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(L), [str(x) for x in trace.layers])
    if E <= 32:
        ax.set_xticks(range(E))
    if L * E <= 128:  # small enough to read the numbers
        for (row, col), value in np.ndenumerate(usage):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 * usage.max() else "white")
    fig.colorbar(image, ax=ax, label="share of tokens", pad=0.01)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _layer_rows(stats: dict) -> tuple[list[str], list[dict]]:
    keys = sorted(stats["layers"], key=int)
    return keys, [stats["layers"][k] for k in keys]


def _hit_rate(ax, stats: dict) -> None:
    keys, rows = _layer_rows(stats)
    x = np.arange(len(keys))
    rates = [100 * r.get("hit_rate", 0.0) for r in rows]
    ax.bar(x, rates, color="tab:green")
    total = 100 * stats.get("hit_rate", 0.0)
    ax.axhline(total, color="black", linestyle="--", linewidth=1, label=f"all layers: {total:.1f}%")
    requests = sum(r.get("hits", 0) + r.get("misses", 0) for r in rows)
    ax.set_title(f"expert cache hit rate per layer ({_count(requests, 'expert request')}, "
                 f"{_count(stats.get('requests', 0), 'generation')}, {_count(stats.get('new_tokens', 0), 'new token')})",
                 fontsize=10)
    ax.set_ylim(0, 125)  # room above 100% for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("hit rate (%)")
    ax.set_xticks(x, keys)
    ax.set_xlabel("decoder layer")
    ax.legend(loc="upper right", fontsize=8)


def _bytes(ax, stats: dict) -> None:
    keys, rows = _layer_rows(stats)
    x = np.arange(len(keys))
    disk = np.array([r.get("bytes_from_disk", 0) for r in rows], dtype=float)
    link = np.array([r.get("bytes_to_device", 0) for r in rows], dtype=float)
    top = max(disk.max(initial=0), link.max(initial=0))
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= s),
                       ("bytes", 1))
    width = 0.4
    ax.bar(x - width / 2, disk / scale, width, color="tab:orange", label="read from disk")
    ax.bar(x + width / 2, link / scale, width, color="tab:purple", label="copied host -> device")
    tokens = stats.get("prompt_tokens", 0) + stats.get("new_tokens", 0)
    ax.set_title(f"expert bytes moved per layer (total over the run: {tokens} tokens; "
                 f"{stats.get('bytes_per_expert', 0):,} bytes per {stats.get('expert_format') or ''} expert)",
                 fontsize=10)
    ax.set_ylabel(unit)
    ax.set_ylim(0, 1.3 * top / scale if top else 1)  # room above the bars for the legend
    ax.set_xticks(x, keys)
    ax.set_xlabel("decoder layer")
    ax.legend(loc="upper right", fontsize=8)
    if top == 0:
        ax.text(0.5, 0.5, "nothing moved: every expert was resident or cached", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="gray")


def _timeline(ax, timeline: dict) -> None:
    events = timeline["events"]
    layers = sorted({e["layer"] for e in events})
    row = {layer: i for i, layer in enumerate(layers)}
    lane_height = 0.8 / len(LANES)
    seen = set()
    for e in events:
        if e["kind"] == "layer":  # the layer's whole expert step: a pale band behind its lanes
            start, end = 1000 * e["start"], 1000 * e["end"]
            ax.broken_barh([(start, max(end - start, 1e-3))], (row[e["layer"]] - 0.45, 0.9), facecolors="0.9",
                           edgecolors="0.6", linewidth=0.5, zorder=0,
                           label=None if "layer" in seen else "MoE layer's expert step")
            seen.add("layer")
            continue
        color, lane, label = KINDS.get(e["kind"], ("gray", 0, e["kind"]))
        y = row[e["layer"]] - 0.4 + lane * lane_height
        start, end = 1000 * e["start"], 1000 * e["end"]
        ax.broken_barh([(start, max(end - start, 1e-3))], (y, lane_height * 0.9), facecolors=color,
                       edgecolors=color, linewidth=0.5, alpha=0.8 if e["kind"] in ("read", "fetch") else 1.0,
                       label=None if e["kind"] in seen else label)
        seen.add(e["kind"])
    span = max((1000 * e["end"] for e in events), default=1.0)
    stall = sum(e["end"] - e["start"] for e in events if e["kind"] == "stall")
    ax.set_title(f"timeline of the last decode step ({_count(timeline.get('tokens', 1), 'token')}, expert work only; "
                 f"{len(events)} spans, stalls {1000 * stall:.2f} ms of {span:.2f} ms)", fontsize=10)
    ax.set_xlabel("ms since the step began (gaps: attention, routers and the rest of the model)")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)  # layer 0 on top, as the step runs downwards
    ax.set_xlim(0, span * 1.02)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, fontsize=8, frameon=False,
              title="lanes in each layer's row, top to bottom: main thread, I/O threads, CPU worker",
              title_fontsize=8)


def save_png(fig, out, force: bool = False) -> Path:
    """Write `fig` to `out` (a .png): refuse an existing file unless `force`; a temp name renamed at
    the end, so an error leaves no half-written file."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise OffloadError(f"--out {out} must name a .png file")
    if out.exists() and not force:
        raise OffloadError(f"{out} already exists; choose another --out or pass --force to overwrite it")
    if not out.parent.is_dir():
        raise OffloadError(f"{out.parent} is not a directory; create it first")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
