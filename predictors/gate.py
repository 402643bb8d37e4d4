"""Training-free lookahead (mixtral-offloading's speculative loading): apply
the routers of the next layers to the current layer's router input.

The residual stream changes little from one layer to the next, so layer
l+1's router, applied to what layer l's router saw, ranks l+1's experts
well. Costs one small [H, E] matvec per predicted layer.

Each router ranks with its family's own rule (offload/models/routing.py
`Router.choice_scores`): DeepSeek's groups and V3's score-correction bias, and
GPT-OSS's router bias, included, so a prediction is the choice that router
would make on that input.
"""

from __future__ import annotations

import torch

from .base import Predictor


class GatePredictor(Predictor):
    name = "gate"
    needs_hidden = True

    def __init__(self, routers: list, lookahead: int = 1):
        self.routers = routers  # per MoE position: its Router (weight [E, H] on the compute device, and its rule)
        self.lookahead = lookahead

    @classmethod
    def from_model(cls, model, lookahead: int = 1) -> "GatePredictor":
        return cls([block.gate for block in model.moe_blocks()], lookahead)

    def scores(self, pos, hidden, token_ids, chosen):
        out = {}
        with torch.inference_mode():
            h = torch.as_tensor(hidden).to(self.routers[0].weight)  # [N, H]
            for target in range(pos + 1, min(pos + 1 + self.lookahead, len(self.routers))):
                out[target] = self.routers[target].choice_scores(h).cpu().numpy()  # [N, E] float32
        return out


def routers_from_checkpoint(path) -> list:
    """The router of every MoE layer in float32, read alone (for evaluating `gate` on a trace)."""
    from offload.checkpoint import Checkpoint
    from offload.models.routing import Router

    ckpt = Checkpoint(path)
    cfg = ckpt.config
    routers = []
    for i in cfg.moe_layers:
        router = Router(cfg)
        for name, param in router.named_parameters():
            value = ckpt.tensor(ckpt.resident_name(
                f"model.layers.{i}.{cfg.family.moe_prefix}.{cfg.family.router_name}.{name}"))
            param.data = value.float()
        routers.append(router.requires_grad_(False))
    ckpt.close()
    return routers
