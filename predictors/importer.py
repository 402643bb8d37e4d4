"""Routing traces from other tools, as offload-trace/1 (`offload import-trace`).

JSON Lines, one row per token and MoE layer:

    {"token": 0, "layer": 0, "experts": [5, 9, 12, 40]}                  required
    ... "weights": [0.4, 0.3, 0.2, 0.1]    the k routing weights or probabilities, as the router gave them
    ... "probs": [0.01, ...]               the full router distribution over the E experts
    ... "token_id": 1234                   the input token's id
    ... "sequence": 7                      which request or sequence the token belongs to

`token` runs 0..T-1 over the whole log (tokens of one sequence in order), `layer` 0..L-1 over
the MoE layers; every (token, layer) pair appears exactly once, each with the same k. Optional
fields are all-or-nothing across rows. What is absent is recorded as absent in the header:
predictors that need token ids fall back to one frequency prior, and the score policy sees
only the k chosen experts' weights (predictors/trace.py load_trace).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from offload.errors import OffloadError

from .trace import Trace, save_trace

OPTIONAL = ("weights", "probs", "token_id", "sequence")


def read_jsonl(path, num_experts: int | None = None) -> Trace:
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append((number, json.loads(line)))
    except FileNotFoundError:
        raise OffloadError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise OffloadError(f"{path} is not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise OffloadError(f"{path}, line {number}: not JSON ({exc.msg}); one JSON object per line") from None
    if not rows:
        raise OffloadError(f"{path} has no rows; expected one JSON object per token and MoE layer")
    for number, row in rows:
        if not isinstance(row, dict) or not all(_whole(row.get(k)) for k in ("token", "layer")) or not (
                isinstance(row.get("experts"), list) and row["experts"] and all(map(_whole, row["experts"]))):
            raise OffloadError(f"{path}, line {number}: a row needs whole numbers \"token\" and \"layer\" and a "
                               "non-empty list \"experts\" of expert ids")
    tokens = 1 + max(r["token"] for _, r in rows)
    layers = 1 + max(r["layer"] for _, r in rows)
    k = len(rows[0][1]["experts"])
    present = {name: name in rows[0][1] for name in OPTIONAL}
    grid: dict[tuple[int, int], dict] = {}
    for number, row in rows:
        key = (row["token"], row["layer"])
        if min(key) < 0 or key in grid:
            raise OffloadError(f"{path}, line {number}: token {key[0]}, layer {key[1]} is negative or repeated")
        if len(row["experts"]) != k or any((name in row) != present[name] for name in OPTIONAL):
            raise OffloadError(f"{path}, line {number}: every row needs the same k ({k}) and the same optional "
                               f"fields ({', '.join(n for n in OPTIONAL if present[n]) or 'none'}) as the first")
        grid[key] = row
    if len(grid) != tokens * layers:
        missing = next((t, l) for t in range(tokens) for l in range(layers) if (t, l) not in grid)
        raise OffloadError(f"{path}: {tokens} tokens x {layers} layers need {tokens * layers} rows, found "
                           f"{len(grid)} (first missing: token {missing[0]}, layer {missing[1]})")
    ids = np.array([[grid[t, l]["experts"] for l in range(layers)] for t in range(tokens)], dtype=np.int64)
    experts = num_experts or (len(rows[0][1]["probs"]) if present["probs"] else int(ids.max()) + 1)
    if ids.min() < 0 or ids.max() >= experts:
        raise OffloadError(f"{path}: expert ids {int(ids.min())}..{int(ids.max())} fall outside 0..{experts - 1}; "
                           "pass --num-experts")
    weights = (np.array([[grid[t, l]["weights"] for l in range(layers)] for t in range(tokens)], np.float32)
               if present["weights"] else np.full((tokens, layers, k), 1 / k, np.float32))
    if weights.shape != (tokens, layers, k):
        raise OffloadError(f"{path}: every \"weights\" list needs k = {k} numbers")
    probs = None
    if present["probs"]:
        probs = np.array([[grid[t, l]["probs"] for l in range(layers)] for t in range(tokens)], np.float32)
        if probs.shape != (tokens, layers, experts):
            raise OffloadError(f"{path}: every \"probs\" list needs the {experts} experts' probabilities")
    token_ids = (np.array([grid[t, 0]["token_id"] for t in range(tokens)], np.int64) if present["token_id"]
                 else np.full(tokens, -1, np.int64))
    if present["sequence"]:
        seq = [grid[t, 0]["sequence"] for t in range(tokens)]
        starts = np.array([0] + [t for t in range(1, tokens) if seq[t] != seq[t - 1]], np.int64)
    else:
        starts = np.zeros(1, np.int64)
    if probs is None:  # the k weights stand in for the full distribution
        probs = np.zeros((tokens, layers, experts), np.float32)
        np.put_along_axis(probs, ids, weights, axis=2)
    header = {"num_experts": experts, "has_token_ids": present["token_id"], "has_router_probs": present["probs"],
              "layers": list(range(layers))}
    return Trace(token_ids, ids, weights, probs, starts, None, header)


def import_trace(path, out, num_experts: int | None = None, source: str = "") -> Trace:
    trace = read_jsonl(path, num_experts)
    save_trace(trace, out, {**trace.header, "source": source or f"imported from {path}"})
    return trace


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
