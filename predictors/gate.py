"""Training-free lookahead (mixtral-offloading's speculative loading): apply
the routers of the next layers to the current layer's router input.

The residual stream changes little from one layer to the next, so layer
l+1's router, applied to what layer l's router saw, ranks l+1's experts
well. Costs one small [H, E] matvec per predicted layer.
"""

from __future__ import annotations

import torch

from .base import Predictor


class GatePredictor(Predictor):
    name = "gate"
    needs_hidden = True

    def __init__(self, routers: list[torch.Tensor], lookahead: int = 1):
        self.routers = routers  # per MoE position: router weight [E, H] (on the compute device)
        self.lookahead = lookahead

    @classmethod
    def from_model(cls, model, lookahead: int = 1) -> "GatePredictor":
        return cls([block.gate.weight for block in model.moe_blocks()], lookahead)

    def scores(self, pos, hidden, token_ids, chosen):
        out = {}
        with torch.inference_mode():
            h = torch.as_tensor(hidden).to(self.routers[0])  # [N, H]
            for target in range(pos + 1, min(pos + 1 + self.lookahead, len(self.routers))):
                out[target] = torch.softmax((h @ self.routers[target].T).float(), -1).cpu().numpy()  # [N, E]
        return out


def routers_from_checkpoint(path) -> list[torch.Tensor]:
    """Router weights of every MoE layer, read alone (for evaluating `gate` on a trace)."""
    from offload.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    cfg = ckpt.config
    routers = [ckpt.tensor(ckpt.resident_name(f"model.layers.{i}.{cfg.family.moe_prefix}.gate.weight")).float()
               for i in cfg.moe_layers]
    ckpt.close()
    return routers
