"""Prefill, then decode one token at a time, with a preallocated KV cache.

`DecodeLoop` yields, per step, the new token of every row of a batch (left
padded); `TextStream` turns one row's tokens into printable text, holding
back anything that could still become a stop string.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .errors import OffloadError
from .kv_cache import KVCache
from .models.decoder import MoECausalLM
from .sampling import Sampler, SamplingParams
from .stats import GenerationStats
from .tokenizer import Tokenizer


def check_prompts(prompts: list[list[int]], vocab_size: int, context: int, room: int = 1) -> None:
    """Non-empty, in the vocabulary, and leaving `room` tokens of the context (1 to generate; 0 to score)."""
    for row, ids in enumerate(prompts):
        if not ids:
            raise OffloadError("the prompt is empty; give at least one token")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise OffloadError(f"prompt {row} has token ids outside the vocabulary (0..{vocab_size - 1})")
        if len(ids) + room > context:
            raise OffloadError(
                f"the prompt is {len(ids)} tokens but the model's context is {context}; "
                "shorten it (in chat, /reset starts a new conversation)"
            )


class DecodeLoop:
    """Iterate to get, per step, one token id (or None once a row has finished) per prompt."""

    def __init__(self, model: MoECausalLM, prompts: list[list[int]], params: SamplingParams,
                 eos_ids: set[int], device: torch.device, dtype: torch.dtype, pad_id: int = 0,
                 static: bool = False, graphs: bool = False):
        cfg = model.cfg
        check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
        self.model, self.prompts, self.params = model, prompts, params
        self.eos_ids, self.device, self.dtype, self.pad_id = eos_ids, device, dtype, pad_id
        # Decode with the static KV cache (offload/graphs.py says when), replayed as a CUDA graph if `graphs`.
        self.static, self.graphs = static or graphs, graphs
        self.graph = None  # the DecodeGraph of the last run, if any (its `failed` says why it stayed eager)
        longest = max(len(p) for p in prompts)
        # Generation stops at the end of the context window, whatever max_new_tokens says.
        self.max_new = min(params.max_new_tokens, cfg.max_position_embeddings - longest)
        self.done = [False] * len(prompts)
        self.finish_reason = ["length"] * len(prompts)
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))

    def finish(self, row: int, reason: str) -> None:
        if not self.done[row]:
            self.done[row], self.finish_reason[row] = True, reason

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        cfg, b = self.model.cfg, len(self.prompts)
        t = max(len(p) for p in self.prompts)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        valid = torch.zeros((b, t), dtype=torch.bool)
        for row, prompt in enumerate(self.prompts):  # left padding: every row ends at the same slot
            ids[row, t - len(prompt):] = torch.tensor(prompt)
            valid[row, t - len(prompt):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        cache = KVCache(cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, t + self.max_new, self.device, self.dtype)
        sampler = Sampler(self.params, self.device)
        next_pos = positions[:, -1:] + 1  # [B, 1]
        ones = torch.ones((b, 1), dtype=torch.bool, device=self.device)

        start = time.perf_counter()
        logits = self.model(ids, positions, valid, cache, last_only=True)[:, -1]  # [B, V]
        if self.static:
            cache.make_static()
        if self.graphs:
            from .graphs import DecodeGraph

            self.graph = DecodeGraph(self.model, cache, b, self.device)
        for step in range(self.max_new):
            finite = torch.isfinite(logits).all(dim=-1)  # [B]
            try:
                tokens = sampler(logits)  # [B]
            except RuntimeError:  # sampling from NaN probabilities
                _check_finite(finite.tolist(), step)
                raise
            # The host needs the tokens anyway; this is the step's one sync, and it brings back
            # whether each row's logits were finite (greedy NaN logits would quietly pick token 0).
            host = torch.cat([tokens, finite.long()]).tolist()  # [2B]
            values = host[:b]
            _check_finite(host[b:], step)
            now = time.perf_counter()
            if step == 0:
                self.stats.prefill_seconds = self.stats.time_to_first_token = now - start
                decode_start = now
            out: list[int | None] = []
            for row, token in enumerate(values):
                if self.done[row] or token in self.eos_ids:
                    self.finish(row, "eos")
                    out.append(None)
                else:
                    out.append(token)
                    self.stats.new_tokens += 1
                    self.stats.decode_tokens += step > 0
            self.stats.decode_seconds = now - decode_start
            yield out
            if all(self.done) or step == self.max_new - 1:
                break
            if self.graph is not None:
                logits = self.graph.step(tokens, next_pos)
            else:
                logits = self.model(tokens[:, None], next_pos, ones, cache, last_only=True)[:, -1]
            next_pos = next_pos + 1
        if self.max_new < self.params.max_new_tokens:
            for row in range(b):
                self.finish(row, "context")


def _check_finite(finite: list, step: int) -> None:
    if not all(finite):
        rows = [r for r, ok in enumerate(finite) if not ok]
        raise OffloadError(f"the model produced NaN or infinite logits at step {step} (rows {rows}); its weights "
                           "are damaged or overflow in this dtype: check the checkpoint, or load it with "
                           "dtype='float32'")


class TextStream:
    """One row's tokens -> text pieces; stops at (and drops) the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.decode_stream()
        self.stops = stops
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        self.text += self.decoder.step(token_id)
        hits = [at for stop in self.stops if (at := self.text.find(stop, max(0, self.emitted - len(stop)))) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        safe = len(self.text)
        for stop in self.stops:
            # Hold back a tail that may be the start of this stop string.
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        piece = self.text[self.emitted:max(safe, self.emitted)]
        self.emitted += len(piece)
        return piece

    def close(self) -> str:
        """The rest of the text once generation ends, including bytes that never
        completed a character (shown as U+FFFD, as a full decode shows them)."""
        if not self.stopped:
            full = self.tokenizer.decode(self.token_ids)
            if full.startswith(self.text):
                self.text = full
        return self.flush()

    def flush(self) -> str:
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
