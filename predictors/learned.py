"""A lightweight pre-gating predictor (ProMoE, Pre-gated MoE without the
fine-tuning): per MoE layer l and distance d, a linear map from layer l's
router input to layer l+d's experts, trained on a trace's hidden states
with a multi-label loss. Saved as safetensors next to the model (never
pickle) and loaded automatically when present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from offload.checkpoint import PREDICTOR_FILE as FILENAME  # the checkpoint skips it as a weight shard
from offload.errors import OffloadError

from .base import Predictor

FORMAT = "offload-predictor/1"


class LearnedPredictor(Predictor):
    name = "learned"
    needs_hidden = True

    def __init__(self, weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], num_layers: int,
                 lookahead: int):
        self.weights = weights  # (pos, d) -> (W [E, H], b [E])
        self.L, self.lookahead = num_layers, lookahead

    def scores(self, pos, hidden, token_ids, chosen):
        out = {}
        with torch.inference_mode():
            for d in range(1, self.lookahead + 1):
                if (pos, d) in self.weights:
                    w, b = self.weights[(pos, d)]
                    h = torch.as_tensor(hidden).to(w)
                    out[pos + d] = torch.sigmoid(h @ w.T + b).cpu().numpy()  # [N, E]
        return out

    def to(self, device) -> "LearnedPredictor":
        self.weights = {k: (w.to(device), b.to(device)) for k, (w, b) in self.weights.items()}
        return self

    @classmethod
    def train(cls, trace, lookahead: int = 1, epochs: int = 30, lr: float = 1e-2, seed: int = 0,
              weight_decay: float = 1e-4, progress: bool = False) -> "LearnedPredictor":
        """Fit one map per (MoE layer, distance). `progress` draws a bar of the maps fitted on stderr,
        when it is a terminal."""
        if trace.hidden is None:
            raise OffloadError("this trace has no hidden states; record it with `offload trace ... --hidden`")
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        hidden = torch.from_numpy(trace.hidden.astype(np.float32))  # [T, L, H]
        maps = [(pos, d) for pos in range(trace.num_layers) for d in range(1, lookahead + 1)
                if pos + d < trace.num_layers]
        with tqdm(maps, desc="training the predictor", unit="layer", file=sys.stderr, leave=False,
                  disable=None if progress else True) as bar:
            for pos, d in bar:
                x = hidden[:, pos]  # [T, H]
                y = torch.zeros(trace.num_tokens, trace.num_experts)
                y.scatter_(1, torch.from_numpy(trace.topk_ids[:, pos + d]), 1.0)  # multi-hot [T, E]
                w = (torch.randn(trace.num_experts, x.shape[1], generator=gen) * 0.01).requires_grad_()
                b = torch.zeros(trace.num_experts, requires_grad=True)
                opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
                for _ in range(epochs):  # full batch: traces are small
                    opt.zero_grad()
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T + b, y)
                    loss.backward()
                    opt.step()
                weights[(pos, d)] = (w.detach(), b.detach())
        return cls(weights, trace.num_layers, lookahead)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        tensors = {}
        for (pos, d), (w, b) in self.weights.items():
            tensors[f"layer{pos}.ahead{d}.weight"] = w.contiguous().cpu()
            tensors[f"layer{pos}.ahead{d}.bias"] = b.contiguous().cpu()
        meta = {"format": FORMAT, "num_layers": str(self.L), "lookahead": str(self.lookahead)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None, num_experts: int | None = None,
             hidden: int | None = None) -> "LearnedPredictor":
        """Read a saved predictor; with the model's shape given, refuse one trained for another model."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        retrain = "retrain it with `offload train-predictor`, or use predictor='gate'"
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise OffloadError(f"{path} is not an offload predictor (format {meta.get('format')!r}); "
                                       + retrain)
                weights = {}
                for name in f.keys():
                    if name.endswith(".weight"):
                        layer, ahead = name.split(".")[:2]
                        key = (int(layer[5:]), int(ahead[5:]))
                        weights[key] = (f.get_tensor(name), f.get_tensor(name[:-6] + "bias"))
            predictor = cls(weights, int(meta["num_layers"]), int(meta["lookahead"]))
        except OffloadError:
            raise
        except Exception as exc:  # damaged file, missing tensor or metadata
            raise OffloadError(f"cannot read the predictor {path} ({type(exc).__name__}: {exc}); {retrain}") from None
        for (pos, _), (w, b) in weights.items():
            wrong = ((num_layers is not None and (predictor.L != num_layers or pos >= num_layers))
                     or (num_experts is not None and (w.shape[0] != num_experts or b.shape != (num_experts,)))
                     or (hidden is not None and w.shape[1] != hidden))
            if wrong:
                raise OffloadError(f"{path} was trained for another model ({predictor.L} MoE layers, weights "
                                   f"{tuple(w.shape)}), not this one ({num_layers} MoE layers, {num_experts} "
                                   f"experts, hidden {hidden}); " + retrain)
        return predictor
