#!/usr/bin/env python
"""Record an expert-routing trace of the demo model on held-out text.

Runs ``offload/demo_model`` with plain ``transformers`` (fp32, CPU,
``output_router_logits=True``) over tokens from the validation split of Tiny
Shakespeare (the last 10 % of the characters, never used for training) and writes
``trace.safetensors`` + ``header.json`` in the ``offload-trace/1`` format
(documented in tests/data/demo_trace/README.md and in the header itself).

    python scripts/record_demo_trace.py --threads 1

The held-out token stream is cut into ``--num-sequences`` consecutive chunks of
``--seq-len - 1`` tokens; each chunk is preceded by ``<|bos|>`` and run as one
sequence, so the trace has num_sequences * seq_len tokens (bos included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import sha256  # noqa: E402  (one checksum helper for the model card and the trace)
FORMAT = "offload-trace/1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="offload/demo_model")
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--val-fraction", type=float, default=0.10, help="held-out tail of the text (must match training)")
    p.add_argument("--num-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence including <|bos|>")
    p.add_argument("--out", default="tests/data/demo_trace")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", action="store_true",
                   help="also store `hidden` float16 [T, L, H], the router input of every MoE layer "
                        "(off by default: 2 KB per token for the demo model)")
    return p.parse_args(argv)


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def atomic_write_bytes(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve(args.model)
    out_dir = resolve(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    L, E, K = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    if args.seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} > max_position_embeddings {cfg.max_position_embeddings}")

    text = resolve(args.data).read_text(encoding="utf-8")
    n_train = int(len(text) * (1 - args.val_fraction))
    val_text = text[n_train:]
    tok.model_max_length = 1 << 30  # we tokenize the whole split once, then cut it ourselves
    val_ids = tok(val_text, add_special_tokens=False).input_ids
    chunk = args.seq_len - 1
    if args.num_sequences * chunk > len(val_ids):
        raise SystemExit("not enough held-out tokens for the requested trace")
    # character span of the traced text inside the corpus, for the header
    used = val_ids[: args.num_sequences * chunk]
    used_chars = len(tok.decode(used))

    # cross-check: capture what the experts module is actually given (selected ids and mixing weights)
    seen = {}

    def make_hook(layer):
        def hook(module, inputs):
            seen[layer] = (inputs[1].detach().clone(), inputs[2].detach().clone())
        return hook

    gate_in = {}

    def make_gate_hook(layer):
        def hook(module, inputs):
            gate_in[layer] = inputs[0].detach().reshape(-1, cfg.hidden_size).clone()
        return hook

    handles = [lay.mlp.experts.register_forward_pre_hook(make_hook(i)) for i, lay in enumerate(model.model.layers)]
    handles += [lay.mlp.gate.register_forward_pre_hook(make_gate_hook(i)) for i, lay in enumerate(model.model.layers)]
    hidden = []

    token_ids, topk_ids, topk_probs, router_probs, starts = [], [], [], [], []
    pos = 0
    with torch.no_grad():
        for s in range(args.num_sequences):
            seq = [tok.bos_token_id] + val_ids[s * chunk: (s + 1) * chunk]
            x = torch.tensor([seq], dtype=torch.long)
            out = model(input_ids=x, output_router_logits=True)
            assert len(out.router_logits) == L
            # [L, T, E] -> [T, L, E]; softmax over all experts in float32 (as Mixtral's router does)
            probs = torch.stack([rl.float().reshape(len(seq), E) for rl in out.router_logits], 0).softmax(-1)
            probs = probs.transpose(0, 1).contiguous()
            vals, idx = torch.topk(probs, K, dim=-1)  # sorted by descending probability
            for layer in range(L):
                m_idx, m_w = seen[layer]
                assert torch.equal(m_idx.reshape(len(seq), K), idx[:, layer]), "trace ids differ from the model's"
                torch.testing.assert_close(m_w.reshape(len(seq), K).float(),
                                           vals[:, layer] / vals[:, layer].sum(-1, keepdim=True))
            # router logits = gate input @ gate weight^T: ties the recorded hidden states to the recorded routing
            for layer in range(L):
                torch.testing.assert_close(gate_in[layer] @ model.model.layers[layer].mlp.gate.weight.T,
                                           out.router_logits[layer].reshape(len(seq), E).float())
            hidden.append(torch.stack([gate_in[layer] for layer in range(L)], 1))
            starts.append(pos)
            pos += len(seq)
            token_ids.append(x[0])
            topk_ids.append(idx)
            topk_probs.append(vals)
            router_probs.append(probs)

    for h in handles:
        h.remove()
    tensors = {
        "token_ids": torch.cat(token_ids).to(torch.int32),
        "topk_ids": torch.cat(topk_ids).to(torch.int16),
        "topk_probs": torch.cat(topk_probs).to(torch.float32),
        "router_probs": torch.cat(router_probs).to(torch.float16),
        "sequence_starts": torch.tensor(starts, dtype=torch.int64),
    }
    if args.hidden:
        tensors["hidden"] = torch.cat(hidden).to(torch.float16)
    T = tensors["token_ids"].numel()
    usage = torch.stack([torch.bincount(tensors["topk_ids"][:, layer].reshape(-1).long(), minlength=E)
                         for layer in range(L)]).double()
    usage = (usage / usage.sum(-1, keepdim=True))

    header = {
        "format": FORMAT,
        "model": {
            "name": "offload demo model (offload/demo_model)",
            "path": os.path.relpath(model_dir, REPO_ROOT),
            "architecture": (cfg.architectures or ["MixtralForCausalLM"])[0],
            "model_type": cfg.model_type,
            "model_safetensors_sha256": sha256(model_dir / "model.safetensors"),
        },
        "num_layers": L,
        "num_experts": E,
        "top_k": K,
        "num_tokens": T,
        "num_sequences": len(starts),
        "layers": list(range(L)),
        "has_hidden": bool(args.hidden),
        "sequence_length": args.seq_len,
        "source": {
            "description": (
                "Tiny Shakespeare validation split: the last 10% of the characters of tinyshakespeare.txt "
                "(karpathy/char-rnn data/tinyshakespeare/input.txt), held out from training. The split's "
                f"first {len(used)} tokens, cut into {len(starts)} consecutive chunks of {chunk} tokens; "
                "each chunk is preceded by <|bos|> and run as its own sequence (no KV cache across sequences)."
            ),
            "file": os.path.basename(args.data),
            "corpus_chars": len(text),
            "split_start_char": n_train,
            "traced_chars": used_chars,
        },
        "layer_index": "axis L indexes MoE layers; `layers` gives their decoder layer indices (here every layer is MoE)",
        "router_probability_convention": (
            "softmax over all num_experts router logits, computed in float32; topk_probs are the top-k values of "
            "that distribution exactly as selected, NOT renormalised. Mixtral weights the chosen experts' outputs by "
            "topk_probs / topk_probs.sum(-1) (renormalised to sum to 1)."
        ),
        "tensors": {
            "token_ids": {"dtype": "int32", "shape": ["num_tokens"],
                          "meaning": "input token ids, sequences concatenated; each sequence starts with <|bos|>"},
            "topk_ids": {"dtype": "int16", "shape": ["num_tokens", "num_layers", "top_k"],
                         "meaning": "ids of the experts the router selected for the token in that layer, "
                                    "ordered by descending router probability"},
            "topk_probs": {"dtype": "float32", "shape": ["num_tokens", "num_layers", "top_k"],
                           "meaning": "router probabilities of the selected experts (see router_probability_convention)"},
            "router_probs": {"dtype": "float16", "shape": ["num_tokens", "num_layers", "num_experts"],
                             "meaning": "the full router softmax distribution (rounded to float16)"},
            "sequence_starts": {"dtype": "int64", "shape": ["num_sequences"],
                                "meaning": "index into the token axis where each sequence begins; a sequence ends "
                                           "where the next begins (or at num_tokens)"},
            "hidden": {"dtype": "float16", "shape": ["num_tokens", "num_layers", "hidden_size"],
                       "meaning": "optional (present when has_hidden): the router input of each MoE layer, i.e. "
                                  "the post-attention RMSNorm output; router_logits = hidden @ gate.weight^T"},
        },
        "expert_usage": {
            "meaning": "fraction of routed token-slots per expert in this trace, [layer][expert]",
            "values": [[round(v, 5) for v in row] for row in usage.tolist()],
        },
        "generator": {
            "script": "scripts/record_demo_trace.py",
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": "float32 weights and activations, CPU",
        },
    }
    meta = {"format": FORMAT, "num_layers": str(L), "num_experts": str(E), "top_k": str(K)}
    atomic_write_bytes(out_dir / "trace.safetensors", save(tensors, metadata=meta))
    header["trace_safetensors_sha256"] = sha256(out_dir / "trace.safetensors")
    atomic_write_bytes(out_dir / "header.json", (json.dumps(header, indent=2) + "\n").encode())
    print(f"wrote {out_dir}: {T} tokens, {L} layers, {E} experts, top-{K}; "
          f"trace.safetensors {(out_dir / 'trace.safetensors').stat().st_size:,} bytes")
    for layer in range(L):
        print(f"  layer {layer} usage: " + " ".join(f"{100 * v:5.1f}%" for v in usage[layer].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
