#!/usr/bin/env python
"""Train the small Mixtral-architecture MoE demo model shipped in offload/demo_model.

Everything is self-contained and CPU-only:

* a byte-level BPE tokenizer (``tokenizers``) is trained on the training split,
* a ``transformers.MixtralForCausalLM`` is trained from scratch on Tiny Shakespeare
  (first 90 % of the characters; the last 10 % are held out for validation),
  with the router load-balancing auxiliary loss computed per layer (see
  ``per_layer_balance_loss``: transformers' built-in Mixtral loss pools the
  counts of all layers, which lets experts die in one layer as long as the same
  expert index is busy in another),
* the result is saved as a standard Hugging Face directory (config.json,
  model.safetensors, tokenizer.json, tokenizer_config.json with a chat template,
  generation_config.json) plus a README.md model card holding the measured
  numbers and sha256 checksums of the other files.

Training samples: plain text windows (each starting with ``<|bos|>``) and, for a
fraction of the samples, the same play text rendered through the chat template:
consecutive speeches alternate between the ``user`` and ``assistant`` roles.
Both are built from the training split only.

Data order and initialisation are deterministic given ``--seed``. For an exactly
reproducible run pass ``--steps`` (the LR schedule then does not depend on
timing); ``--minutes`` is a wall-clock cap on the training loop, and if ``--steps``
is not given the step count is estimated from the speed of the first steps.

Usage (the shipped model):

    python scripts/train_demo_model.py --threads 1 --steps N --minutes M

``--benchmark`` times a few training steps for a list of candidate model sizes
instead of training (used to pick the shipped size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD, BOS, EOS, USER, ASSISTANT, END = SPECIAL_TOKENS

# Jinja chat template: <|bos|> then, per message, <|role|>\n content <|end|>\n.
# Only the user and assistant roles exist (they are the only ones trained).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('the demo model only knows the user and assistant roles') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

PLAIN_SAMPLE_PROMPT = "ROMEO:\n"
CHAT_SAMPLE_MESSAGES = [{"role": "user", "content": "ROMEO:\nWhat news, my lord? Speak, is the king alive?"}]

# Candidate sizes for --benchmark: (hidden, intermediate, layers, experts, heads, kv_heads, vocab)
BENCH_CANDIDATES = [
    (256, 224, 4, 8, 8, 2, 2048),
    (256, 256, 4, 8, 8, 2, 2048),
    (256, 256, 4, 8, 8, 4, 2048),
    (320, 320, 4, 8, 8, 4, 2048),
    (256, 512, 4, 8, 8, 4, 4096),
    (384, 384, 4, 8, 8, 4, 4096),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt",
                   help="training text; relative paths are resolved against the repository root")
    p.add_argument("--out", default="offload/demo_model", help="output model directory (relative to the repo root)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (defines the LR schedule)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap for the training loop")
    p.add_argument("--val-fraction", type=float, default=0.10)
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=2048)
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=224, help="per-expert FFN width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512, help="training context = max_position_embeddings")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    # optimisation
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.02,
                   help="coefficient of the load-balancing loss, summed over layers (Switch Transformer's alpha)")
    p.add_argument("--dropout", type=float, default=0.2,
                   help="training-only residual dropout on attention/MoE outputs (forward hooks; not part of the saved model)")
    p.add_argument("--chat-fraction", type=float, default=0.25, help="fraction of samples rendered with the chat template")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--sample-tokens", type=int, default=120, help="tokens for the greedy samples in the card")
    p.add_argument("--notes", default=None, help="markdown file inserted into the card under 'Design notes'")
    p.add_argument("--metrics-json", default=None, help="also write the final metrics to this JSON file")
    p.add_argument("--benchmark", action="store_true", help="time candidate model sizes and exit")
    p.add_argument("--bench-steps", type=int, default=4)
    return p.parse_args(argv)


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_text: str, vocab_size: int, ctx: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator([train_text], trainer)
    bos_id = tok.token_to_id(BOS)
    # tokenizer("text") -> <|bos|> text  (apply_chat_template does not add it twice)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=ctx,
        clean_up_tokenization_spaces=False,
    )
    return tok, hf_tok


# ----------------------------------------------------------------------------- data


class SampleSource:
    """Deterministic sampler of training sequences of exactly ``ctx`` tokens."""

    def __init__(self, tok, train_text: str, ctx: int, chat_fraction: float, seed: int):
        self.ctx = ctx
        self.chat_fraction = chat_fraction
        self.rng = np.random.default_rng(seed)
        ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        self.bos, self.end = tok.token_to_id(BOS), tok.token_to_id(END)
        self.role = [tok.token_to_id(USER), tok.token_to_id(ASSISTANT)]
        self.newline = ids("\n")
        self.plain = np.asarray(ids(train_text), dtype=np.int64)
        # speeches ("NAME:\nline\nline") are separated by blank lines in the corpus
        speeches = [s.strip() for s in train_text.split("\n\n") if s.strip()]
        # token ids of "\n" + content, exactly as the chat template renders them
        self.speeches = [ids("\n" + s) for s in speeches]

    def chat_sequence(self, start: int) -> list[int]:
        seq = [self.bos]
        i, r = start, 0
        while len(seq) < self.ctx:
            seq += [self.role[r]] + self.speeches[i % len(self.speeches)] + [self.end] + self.newline
            i, r = i + 1, 1 - r
        return seq[: self.ctx]

    def sample(self) -> list[int]:
        if self.rng.random() < self.chat_fraction:
            return self.chat_sequence(int(self.rng.integers(len(self.speeches))))
        off = int(self.rng.integers(len(self.plain) - self.ctx))
        return [self.bos] + self.plain[off: off + self.ctx - 1].tolist()

    def batch(self, batch_size: int) -> torch.Tensor:
        return torch.tensor([self.sample() for _ in range(batch_size)], dtype=torch.long)


def eval_windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Windows of <= ctx tokens overlapping by one token: every token after the first is predicted once."""
    out, start = [], 0
    while start < len(ids) - 1:
        out.append(ids[start: start + ctx])
        start += ctx - 1
    return out


@torch.no_grad()
def evaluate(model, windows, num_experts, top_k, want_usage=False):
    """Mean next-token cross-entropy (nats) over all windows; optionally per-layer expert usage."""
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    counts = None
    for w in windows:
        x = torch.tensor([w], dtype=torch.long)
        out = model(input_ids=x, output_router_logits=want_usage)
        logits = out.logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        total_tok += x.shape[1] - 1
        if want_usage:
            if counts is None:
                counts = torch.zeros(len(out.router_logits), num_experts, dtype=torch.float64)
            for layer, rl in enumerate(out.router_logits):
                sel = torch.topk(rl.float().softmax(-1), top_k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(sel, minlength=num_experts).double()
    model.train(was_training)
    usage = (counts / counts.sum(-1, keepdim=True)).tolist() if want_usage else None
    return total_nll / total_tok, total_nll, total_tok, usage


# ----------------------------------------------------------------------------- model


def build_model(args, vocab_size, special_ids):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.ctx,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=True,
        tie_word_embeddings=True,
        rope_theta=args.rope_theta,
        sliding_window=None,
        attention_dropout=0.0,
        bos_token_id=special_ids[BOS],
        eos_token_id=special_ids[EOS],
        pad_token_id=special_ids[PAD],
    )
    model = MixtralForCausalLM(config)
    # the per-expert loop is faster than the grouped_mm fallback on CPU at this size (measured)
    model.set_experts_implementation("eager")
    return model


def add_dropout_hooks(model, p: float):
    if p <= 0:
        return []

    def attn_hook(module, inputs, output):
        if module.training:
            return (F.dropout(output[0], p, True),) + tuple(output[1:])

    def mlp_hook(module, inputs, output):
        if module.training:
            return F.dropout(output, p, True)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(attn_hook))
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
    return handles


def per_layer_balance_loss(router_logits, num_experts, top_k):
    """Switch-Transformer load-balancing loss for each layer separately: E * sum_i f_i * P_i, where f_i is the
    fraction of the layer's routed token-slots sent to expert i (sums to top_k; no gradient) and P_i the mean router
    probability of expert i. Same normalisation as transformers' load_balancing_loss_func (top_k when balanced),
    but per layer instead of pooled over layers. Returns a tensor [num_layers]."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        with torch.no_grad():
            sel = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
            f = torch.bincount(sel, minlength=num_experts).float() / probs.shape[0]
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses)


def param_counts(model, cfg):
    total = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_local_experts
    return total, expert, active


def lr_at(step, args, total_steps):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )


# ----------------------------------------------------------------------------- benchmark


def benchmark(args):
    from transformers import MixtralConfig, MixtralForCausalLM

    print(f"threads={torch.get_num_threads()} batch={args.batch_size}x{args.ctx} steps={args.bench_steps} (+1 warm-up)")
    print("| hidden | ffn/expert | layers | experts | heads/kv | vocab | params | fp32 MB | s/step | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for h, i, nl, e, nh, kv, v in BENCH_CANDIDATES:
        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=nl,
                            num_attention_heads=nh, num_key_value_heads=kv, head_dim=h // nh,
                            num_local_experts=e, num_experts_per_tok=args.top_k, max_position_embeddings=args.ctx,
                            output_router_logits=True, router_aux_loss_coef=args.aux_coef, tie_word_embeddings=True)
        model = MixtralForCausalLM(cfg)
        model.set_experts_implementation("eager")
        model.router_aux_loss_coef = 0.0
        add_dropout_hooks(model, args.dropout)
        opt = make_optimizer(model, args)
        x = torch.randint(0, v, (args.batch_size, args.ctx))
        times = []
        for _ in range(args.bench_steps + 1):
            t0 = time.perf_counter()
            out = model(input_ids=x, labels=x, output_router_logits=True)
            (out.loss + args.aux_coef * per_layer_balance_loss(out.router_logits, e, args.top_k).sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        dt = sum(times[1:]) / args.bench_steps
        n = sum(p.numel() for p in model.parameters())
        print(f"| {h} | {i} | {nl} | {e} | {nh}/{kv} | {v} | {n / 1e6:.2f}M | {n * 4 / 1e6:.1f} | {dt:.2f} | "
              f"{args.batch_size * args.ctx / dt:.0f} |", flush=True)


# ----------------------------------------------------------------------------- saving


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_hf_dir(model, hf_tok, out_dir: Path, gen_cfg) -> list[str]:
    """save_pretrained into a temp dir next to out_dir, then move each file in with os.replace."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)  # safetensors, per-expert tensor names (block_sparse_moe.experts.e.w1/w2/w3)
        gen_cfg.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp, save_jinja_files=False)  # chat template inside tokenizer_config.json
        # transformers 5 writes "TokenizersBackend"; "PreTrainedTokenizerFast" loads the same in 5.x and also in 4.x
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.chmod(tmp / name, 0o644)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        for name in names:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


# ----------------------------------------------------------------------------- card


def dead_share(num_experts: int) -> float:
    """Below this share of the routing an expert counts as dying: 16% of an even share
    (2% with 8 experts), so the check means the same at 60 or 128 experts."""
    return 0.16 / num_experts


def fmt_usage_table(usage, min_frac):
    e = len(usage[0])
    lines = ["| layer | " + " | ".join(f"e{j}" for j in range(e)) + " | min | max |",
             "|---|" + "---|" * (e + 2)]
    for layer, row in enumerate(usage):
        lines.append(f"| {layer} | " + " | ".join(f"{100 * v:.1f}%" for v in row)
                     + f" | {100 * min(row):.1f}% | {100 * max(row):.1f}% |")
    lines.append("")
    ok = all(min(r) > min_frac for r in usage)
    lines.append(f"Every expert above {100 * min_frac:.2g}% in every layer: **{'yes' if ok else 'NO'}**.")
    return "\n".join(lines)


def write_card(out_dir: Path, files: list[str], m: dict, notes: str | None):
    cfg = m["config"]
    checks = "\n".join(f"{sha256(out_dir / f)}  {f}" for f in files)
    sizes = "\n".join(f"| {f} | {(out_dir / f).stat().st_size:,} |" for f in files)
    hist = "\n".join(f"| {h['step']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {100 * h['min_usage']:.1f}% | {h['lr']:.2e} | {h['elapsed_min']:.1f} |"
                     for h in m["history"])
    card = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, demo, tiny-shakespeare]
---

# offload demo model: a tiny Mixtral-architecture MoE trained on Tiny Shakespeare

A deliberately small Mixture-of-Experts causal LM that the `offload` runtime uses for
tests, demos and routing traces. It is a standard `MixtralForCausalLM` checkpoint:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("offload/demo_model")
tok = AutoTokenizer.from_pretrained("offload/demo_model")
```

It writes Shakespeare-flavoured pastiche and nothing else; it is not useful as a language model.
All numbers below were measured by `scripts/train_demo_model.py` in the run that produced these
weights (the card is generated by that script).

## Architecture

| | |
|---|---|
| architecture | `MixtralForCausalLM` (model_type `mixtral`) |
| layers | {cfg['num_hidden_layers']} |
| hidden size | {cfg['hidden_size']} |
| attention | {cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} key/value heads (GQA), head dim {cfg['head_dim']}, RoPE theta {cfg['rope_theta']:g} |
| MoE | {cfg['num_local_experts']} experts per layer, top-{cfg['num_experts_per_tok']} routing (softmax over all experts, top-k renormalised), SwiGLU experts with FFN width {cfg['intermediate_size']} |
| context | {cfg['max_position_embeddings']} tokens (`max_position_embeddings`, = training context) |
| vocabulary | {cfg['vocab_size']} (byte-level BPE) |
| embeddings | input embedding and LM head tied (`tie_word_embeddings: true`; no `lm_head.weight` in the file) |
| parameters | {m['params_total']:,} total; {m['params_expert']:,} in experts ({100 * m['params_expert'] / m['params_total']:.1f}%); {m['params_active']:,} active per token |
| one expert | {m['params_per_expert']:,} parameters (w1, w2, w3) = {m['bytes_per_expert']:,} bytes in {m['weight_dtype']} |
| weights | {m['weight_dtype']}, `model.safetensors`, {m['safetensors_bytes']:,} bytes |

Tensor names follow the original Mixtral layout:
`model.layers.{{i}}.block_sparse_moe.gate.weight` ([experts, hidden]) and
`model.layers.{{i}}.block_sparse_moe.experts.{{e}}.w1/w2/w3.weight`
(w1 = gate proj [ffn, hidden], w3 = up proj [ffn, hidden], w2 = down proj [hidden, ffn]).

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the training split only
(vocabulary {cfg['vocab_size']} including the special tokens). Special tokens:
`<|pad|>` (id {m['special_ids'][PAD]}), `<|bos|>` ({m['special_ids'][BOS]}), `<|eos|>` ({m['special_ids'][EOS]}),
`<|user|>` ({m['special_ids'][USER]}), `<|assistant|>` ({m['special_ids'][ASSISTANT]}), `<|end|>` ({m['special_ids'][END]}, end of turn).
`tokenizer("text")` prepends `<|bos|>`. The chat template (in `tokenizer_config.json`) renders
`<|bos|>` then, per message, `<|role|>\\n{{content}}<|end|>\\n`, and `<|assistant|>\\n` with
`add_generation_prompt=True`; only the `user` and `assistant` roles exist.
`generation_config.json` stops on `<|eos|>` or `<|end|>`.

## Training data

Tiny Shakespeare (`tinyshakespeare.txt`, {m['data_chars']:,} characters; from the karpathy/char-rnn
repository, data/tinyshakespeare/input.txt, public domain). The first {100 * (1 - m['val_fraction']):.0f}% of the
characters ({m['train_chars']:,}) are the training split ({m['train_tokens']:,} tokens); the last
{100 * m['val_fraction']:.0f}% ({m['val_chars']:,} characters, {m['val_tokens']:,} tokens) are held out for validation and
were used for nothing but the validation numbers below.

Each training sequence is {cfg['max_position_embeddings']} tokens. With probability {1 - m['args']['chat_fraction']:.2f} it is a
random window of the training text preceded by `<|bos|>`; otherwise ({m['args']['chat_fraction']:.2f}) it is the training
text rendered through the chat template, consecutive speeches (blocks separated by blank
lines, speaker name included) alternating as `user` and `assistant` turns, starting at a random
speech. The loss is taken on every token. Data order is fixed by the seed.

## Training

| | |
|---|---|
| command | `{m['command']}` |
| torch threads | {m['threads']} (CPU: {m['cpu']}) |
| torch / transformers / tokenizers | {m['versions']} |
| optimizer | AdamW (betas 0.9/0.95, weight decay {m['args']['weight_decay']} on matrices), peak LR {m['args']['lr']:g}, {m['args']['warmup']} warm-up steps, cosine decay to {m['args']['min_lr']:g} over {m['planned_steps']} steps, grad clip {m['args']['grad_clip']} |
| batch | {m['args']['batch_size']} x {cfg['max_position_embeddings']} tokens = {m['args']['batch_size'] * cfg['max_position_embeddings']:,} tokens per step |
| router aux loss | Switch-Transformer load-balancing loss computed **per layer** from the router logits (`output_router_logits=True`) and summed over layers, coefficient {m['args']['aux_coef']} (recorded as `router_aux_loss_coef` in config.json). transformers' built-in Mixtral loss was switched off during training because it pools the expert counts of all layers, so it cannot stop an expert from dying in one layer while the same expert index is busy in another. |
| regularisation | residual dropout {m['args']['dropout']} on attention and MoE outputs during training only (forward hooks; the saved model has no dropout) |
| steps done | {m['steps_done']} of {m['planned_steps']} planned{' (stopped by the --minutes cap)' if m['stopped_by_time'] else ''} |
| tokens seen | {m['tokens_seen']:,} ({m['tokens_seen'] / m['train_tokens']:.1f} passes over the training split) |
| training time | {m['train_seconds'] / 60:.1f} min for the training loop ({m['tokens_seen'] / m['train_seconds']:.0f} tokens/s incl. periodic validation), {m['total_seconds'] / 60:.1f} min for the whole script |

## Results

| | |
|---|---|
| final train loss (mean cross-entropy of the last {m['train_loss_window']} steps, dropout on, nats/token) | {m['final_train_loss']:.4f} |
| train loss, eval mode, on the first {m['train_eval_tokens']:,} training tokens | {m['train_eval_loss']:.4f} (perplexity {math.exp(m['train_eval_loss']):.2f}) |
| **validation loss** (held-out 10%, nats/token) | **{m['val_loss']:.4f}** |
| **validation perplexity** (per token) | **{m['val_ppl']:.2f}** |
| validation bits per character | {m['val_bpc']:.4f} |
| final router aux loss, mean per layer over the last steps (perfectly balanced = {cfg['num_experts_per_tok']}) | {m['final_aux_loss']:.4f} |

Validation: the held-out text is tokenized as one stream preceded by `<|bos|>` and cut into
{cfg['max_position_embeddings']}-token windows that overlap by one token, so each of its {m['val_tokens']:,} tokens is
predicted exactly once (a token at position p of its window is predicted from the p tokens before it).

### Expert usage on the validation text

Fraction of routed token-slots (tokens x top-{cfg['num_experts_per_tok']}) that went to each expert, per layer, over the
whole held-out text:

{fmt_usage_table(m['expert_usage'], dead_share(cfg['num_local_experts']))}

### Validation history

| step | train loss (mean of last 50 steps) | val loss | least-used expert (any layer, val) | LR | elapsed min |
|---|---|---|---|---|---|
{hist}

### Greedy samples

Plain text, prompt `{PLAIN_SAMPLE_PROMPT!r}` (with `<|bos|>`), {m['args']['sample_tokens']} new tokens, greedy:

```text
{m['sample_plain']}
```

Chat, `apply_chat_template({json.dumps(CHAT_SAMPLE_MESSAGES)}, add_generation_prompt=True)`, greedy until `<|end|>`
(at most {m['args']['sample_tokens']} new tokens), decoded without special tokens:

```text
{m['sample_chat']}
```

## Design notes

{notes.strip() if notes else '(none)'}

## Files and checksums

| file | bytes |
|---|---|
{sizes}

sha256 (`sha256sum -c` format, run inside this directory):

```text
{checks}
```
"""
    atomic_write_text(out_dir / "README.md", card)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.benchmark:
        benchmark(args)
        return 0
    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    import platform

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    data_path = resolve(args.data)
    out_dir = resolve(args.out)
    text = data_path.read_text(encoding="utf-8")
    n_train = int(len(text) * (1 - args.val_fraction))
    train_text, val_text = text[:n_train], text[n_train:]

    tok, hf_tok = train_tokenizer(train_text, args.vocab_size, args.ctx)
    special_ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    src = SampleSource(tok, train_text, args.ctx, args.chat_fraction, args.seed)
    val_ids = [special_ids[BOS]] + tok.encode(val_text, add_special_tokens=False).ids
    val_windows = eval_windows(val_ids, args.ctx)
    train_eval_ids = [special_ids[BOS]] + src.plain[: len(val_ids) - 1].tolist()
    train_windows = eval_windows(train_eval_ids, args.ctx)
    print(f"data: {len(text):,} chars; train {len(train_text):,} chars / {len(src.plain):,} tokens "
          f"({len(src.speeches):,} speeches); val {len(val_text):,} chars / {len(val_ids) - 1:,} tokens; vocab {vocab}")

    model = build_model(args, vocab, special_ids)
    cfg = model.config
    total, expert, active = param_counts(model, cfg)
    print(f"model: {total:,} params ({expert:,} in experts), {active:,} active per token, fp32 {total * 4 / 1e6:.1f} MB")
    hooks = add_dropout_hooks(model, args.dropout)
    opt = make_optimizer(model, args)
    model.router_aux_loss_coef = 0.0  # built-in pooled loss off; per_layer_balance_loss is added instead
    model.train()

    planned = args.steps
    budget_s = args.minutes * 60 if args.minutes else None
    if planned is None and budget_s is None:
        raise SystemExit("give --steps and/or --minutes")
    history, recent, recent_aux = [], [], []
    step, t_loop = 0, time.time()
    t_after_warm = None
    stopped_by_time = False
    bar = tqdm(total=planned, desc="train", dynamic_ncols=True, mininterval=5.0)
    while True:
        if planned is None and step == 25:  # estimate the step count that fits the time budget
            per_step = (time.time() - t_after_warm) / 20
            planned = max(step + 1, int((budget_s - (time.time() - t_loop)) / (per_step * 1.03)) + step)
            bar.total = planned
            bar.refresh()
            print(f"\nestimated {per_step:.2f}s/step -> schedule of {planned} steps", flush=True)
        if planned is not None and step >= planned:
            break
        if budget_s is not None and time.time() - t_loop > budget_s:
            stopped_by_time = True
            print(f"\ntime budget reached at step {step}", flush=True)
            break
        if step == 5:
            t_after_warm = time.time()
        lr = lr_at(step, args, planned if planned is not None else 10**9)
        for g in opt.param_groups:
            g["lr"] = lr
        x = src.batch(args.batch_size)
        out = model(input_ids=x, labels=x, output_router_logits=True)  # model.router_aux_loss_coef = 0: out.loss = CE
        aux_layers = per_layer_balance_loss(out.router_logits, args.experts, args.top_k)
        (out.loss + args.aux_coef * aux_layers.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = aux_layers.mean().item()
        ce = out.loss.item()
        recent.append(ce)
        recent_aux.append(aux)
        recent, recent_aux = recent[-50:], recent_aux[-50:]
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(recent):.3f}", aux=f"{aux:.3f}", lr=f"{lr:.1e}", refresh=False)
        if step % args.eval_every == 0 or step == planned:
            vl, _, _, vu = evaluate(model, val_windows, args.experts, args.top_k, want_usage=True)
            vmin = [min(r) for r in vu]
            history.append(dict(step=step, train_loss=float(np.mean(recent)), val_loss=vl, lr=lr,
                                min_usage=min(vmin), elapsed_min=(time.time() - t_loop) / 60))
            tqdm.write(f"step {step}: train loss {np.mean(recent):.4f} (last 50) | val loss {vl:.4f} "
                       f"(ppl {math.exp(vl):.2f}) | aux/layer {np.mean(recent_aux):.3f} | min expert usage per layer "
                       + " ".join(f"{100 * v:.1f}%" for v in vmin)
                       + f" | lr {lr:.2e} | {(time.time() - t_loop) / 60:.1f} min")
    bar.close()
    train_seconds = time.time() - t_loop
    model.router_aux_loss_coef = cfg.router_aux_loss_coef
    for h in hooks:
        h.remove()
    model.eval()

    # ---- final evaluation
    val_loss, val_nll, val_tok, usage = evaluate(model, val_windows, args.experts, args.top_k, want_usage=True)
    train_eval_loss = evaluate(model, train_windows, args.experts, args.top_k)[0]
    if not history or history[-1]["step"] != step:
        history.append(dict(step=step, train_loss=float(np.mean(recent)), val_loss=val_loss, lr=lr,
                            min_usage=min(min(r) for r in usage), elapsed_min=train_seconds / 60))
    val_bpc = val_nll / math.log(2) / len(val_text)
    print(f"\nfinal: steps {step}, train loss {np.mean(recent):.4f} (last {len(recent)} steps), "
          f"train loss (eval mode) {train_eval_loss:.4f}")
    print(f"validation: loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f}, "
          f"{val_bpc:.4f} bits/char over {val_tok:,} tokens")
    print("expert usage on validation (fraction of routed token-slots):")
    for layer, row in enumerate(usage):
        print(f"  layer {layer}: " + " ".join(f"{100 * v:5.1f}%" for v in row) + f"   min {100 * min(row):.1f}%")
    dead = dead_share(args.experts)
    if any(min(r) <= dead for r in usage):
        print(f"WARNING: some expert is at or below {100 * dead:.2g}% of the routed token-slots", flush=True)

    # ---- save (fp32 unless it would not fit in 30 MB)
    cfg.output_router_logits = False  # inference default; pass output_router_logits=True to get router logits
    weight_dtype = "float32"
    if total * 4 > 29_500_000:
        model.to(torch.bfloat16)
        weight_dtype = "bfloat16"
    cfg.dtype = weight_dtype
    gen_cfg = GenerationConfig(bos_token_id=special_ids[BOS], eos_token_id=[special_ids[EOS], special_ids[END]],
                               pad_token_id=special_ids[PAD], do_sample=False)
    files = save_hf_dir(model, hf_tok, out_dir, gen_cfg)

    # ---- reload exactly as a user would, check, and take the greedy samples from the reloaded model
    m2 = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    t2 = AutoTokenizer.from_pretrained(out_dir)
    m2.eval()
    with torch.no_grad():
        x = torch.tensor([val_windows[0]])
        diff = (m2(input_ids=x).logits - model.float()(input_ids=x).logits).abs().max().item()
    print(f"reloaded with AutoModelForCausalLM/AutoTokenizer: max |logit diff| on a validation window = {diff:.2e}")
    chat_ids = t2.apply_chat_template(CHAT_SAMPLE_MESSAGES, add_generation_prompt=True)
    if hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    mine = [special_ids[BOS], special_ids[USER]] + tok.encode("\n" + CHAT_SAMPLE_MESSAGES[0]["content"], add_special_tokens=False).ids \
        + [special_ids[END]] + src.newline + [special_ids[ASSISTANT]] + src.newline
    assert list(chat_ids) == mine, ("chat template and training format disagree", chat_ids, mine)
    with torch.no_grad():
        p_ids = t2(PLAIN_SAMPLE_PROMPT, return_tensors="pt").input_ids
        g = m2.generate(p_ids, max_new_tokens=args.sample_tokens, do_sample=False, eos_token_id=None)
        sample_plain = t2.decode(g[0], skip_special_tokens=True)
        c_ids = torch.tensor([chat_ids])
        g = m2.generate(c_ids, max_new_tokens=args.sample_tokens, do_sample=False)
        sample_chat = t2.decode(g[0, c_ids.shape[1]:], skip_special_tokens=True)
    print(f"greedy sample (plain):\n{sample_plain}\n---\ngreedy sample (chat):\n{sample_chat}\n---")

    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    metrics = dict(
        config=dict(num_hidden_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                    num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                    head_dim=cfg.head_dim, rope_theta=args.rope_theta,
                    num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                    intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                    vocab_size=cfg.vocab_size),
        args=vars(args), special_ids=special_ids,
        params_total=total, params_expert=expert, params_active=active, params_per_expert=per_expert,
        bytes_per_expert=per_expert * (4 if weight_dtype == "float32" else 2), weight_dtype=weight_dtype,
        safetensors_bytes=(out_dir / "model.safetensors").stat().st_size,
        data_chars=len(text), train_chars=len(train_text), val_chars=len(val_text), val_fraction=args.val_fraction,
        train_tokens=len(src.plain), val_tokens=val_tok,
        command="python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        threads=args.threads, cpu=platform.processor() or platform.machine(),
        versions=f"{torch.__version__} / {transformers.__version__} / {tokenizers.__version__}",
        planned_steps=planned, steps_done=step, stopped_by_time=stopped_by_time,
        tokens_seen=step * args.batch_size * args.ctx, train_seconds=train_seconds,
        final_train_loss=float(np.mean(recent)), train_loss_window=len(recent), final_aux_loss=float(np.mean(recent_aux)),
        train_eval_loss=train_eval_loss, train_eval_tokens=len(train_eval_ids) - 1,
        val_loss=val_loss, val_ppl=math.exp(val_loss), val_bpc=val_bpc, expert_usage=usage,
        history=history, sample_plain=sample_plain, sample_chat=sample_chat, reload_max_logit_diff=diff,
        files=files,
    )
    metrics["total_seconds"] = time.time() - t_start
    notes = Path(args.notes).read_text() if args.notes else None
    write_card(out_dir, files, metrics, notes)
    if args.metrics_json:
        Path(args.metrics_json).write_text(json.dumps(metrics, indent=1))
    print(f"saved {out_dir} ({', '.join(files + ['README.md'])}) in {metrics['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
