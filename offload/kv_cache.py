"""Preallocated key/value cache: one [B, Hkv, S, D] pair per layer, filled in place.

Static mode (`make_static`, decode on a GPU): each one-token step writes at `pos`, a device
tensor the step itself advances, and attention reads every slot through a mask built from it:
the same shapes and addresses at every step, which a CUDA graph needs (offload/graphs.py).

Multi-head latent attention (offload/models/mla.py) caches one row per token
instead: the compressed latent and the rotated key, [B, 1, S, kv_lora_rank +
qk_rope_head_dim] in the keys' place (its config says num_kv_heads=1 and
head_dim=that width); it never asks for values, so none are allocated.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        # Values are allocated with the first `append` of a layer: latent attention has none.
        self.v: list[torch.Tensor | None] = [None] * num_layers
        # Which slots hold real tokens: left padding of a batch stays False forever.
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # [B, S]
        self.length = 0  # slots filled so far (same for every row)
        self.max_len = max_len
        self.pos: torch.Tensor | None = None  # static mode: [1] the slot the next step writes, on the device

    def make_static(self) -> None:
        """From now on every step is one token, written at `pos`, attending over all slots (masked)."""
        self.pos = torch.full((1,), self.length, dtype=torch.long, device=self.valid.device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at the current end; return all keys/values so far [B, Hkv, L+T, D]."""
        if self.v[layer] is None:
            self.v[layer] = torch.zeros_like(self.k[layer])
        if self.pos is not None:  # static: every slot comes back, the unwritten ones masked
            self.k[layer].index_copy_(2, self.pos, k)
            self.v[layer].index_copy_(2, self.pos, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def append_latent(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Latent attention: write rows [B, T, W] at the current end; return all rows so far [B, L+T, W]."""
        if self.pos is not None:
            raise NotImplementedError("latent attention has no static mode")
        start, end = self.length, self.length + rows.shape[1]
        self.k[layer][:, 0, start:end] = rows
        return self.k[layer][:, 0, :end]

    def reserve(self, valid: torch.Tensor) -> None:
        """Mark the next T slots, valid [B, T], before the layers write them."""
        t = valid.shape[1]
        if self.length + t > self.max_len:
            raise ValueError("KV cache overflow")  # callers check the context length first
        if self.pos is not None:
            self.valid.index_copy_(1, self.pos, valid)
            return
        self.valid[:, self.length:self.length + t] = valid

    def advance(self, t: int) -> None:
        self.length += t
        if self.pos is not None:
            self.pos += t  # on the device: a CUDA graph's replay advances it too
