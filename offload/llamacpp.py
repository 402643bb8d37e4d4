"""llama.cpp as the yardstick: the same model written as a GGUF file, once, and run by llama-cpp-python.

`offload bench MODEL --against llama.cpp` times llama.cpp beside this runtime on the same weights.
This module writes the GGUF (`export_gguf`) and keeps it in the cache next to our other conversions
(`gguf_copy`: $MOE_OFFLOAD_CACHE/llamacpp/<name>-<type>-<fingerprint>/model.gguf, made once); the
timed child that runs llama.cpp is offload/llamacpp_child.py, which imports neither torch nor this
package so that only llama.cpp's own memory counts against a memory limit.

What is written, following llama.cpp's convert_hf_to_gguf.py for Mixtral:

  architecture  `llama` with experts: Mixtral-architecture checkpoints only (other families have
                their own GGUF layouts, not written here; offload.load still reads theirs)
  experts       stacked `blk.N.ffn_{gate,up}_exps` [E, I, H] and `ffn_down_exps` [E, H, I], in the
                type matching the format we run: F16 for bf16/fp16/fp32 experts, Q8_0 for int8,
                Q4_0 for int4 (quantized by gguf.quants in numpy from the checkpoint's weights)
  the rest      F16 matrices (as our bf16 resident weights: 2 bytes each), F32 norms and routers
                (llama.cpp keeps routers F32); q/k rows permuted for llama.cpp's RoPE kernel
  tokenizer     a byte-level BPE tokenizer.json becomes `gpt2` (tokens, types, merges); anything
                else, or none (synthetic checkpoints), a placeholder vocabulary: token ids only
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .errors import OffloadError

INSTALL = ('comparing with llama.cpp needs llama-cpp-python: pip install "moe-offload[gguf]" (or pip install '
           'llama-cpp-python gguf); it compiles llama.cpp from source, about 5 minutes')
# Our expert formats -> the GGUF type that matches them: bytes per weight and kind of kernel.
GGUF_TYPE = {"dense": "F16", "int8": "Q8_0", "int4": "Q4_0"}
FILE_TYPE = {"F16": 1, "Q4_0": 2, "Q8_0": 7}  # general.file_type (LlamaFileType.MOSTLY_*)
ATTENTION = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def require_llama_cpp() -> None:
    """One clear error, with the command that installs it, where llama-cpp-python is missing."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        raise OffloadError(INSTALL)


def gguf_type(expert_kind: str) -> str:
    """Our expert format's kind (dense, int8, int4) -> the GGUF type llama.cpp runs it in."""
    if expert_kind not in GGUF_TYPE:
        raise OffloadError(f"{expert_kind} experts have no GGUF counterpart here; compare bf16, int8 or int4")
    return GGUF_TYPE[expert_kind]


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows (half 1, half 2) interleaved in
    pairs, the order llama.cpp's RoPE kernel for arch `llama` expects (undone by sources/gguf.py)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_copy(model, qtype: str, echo=None) -> Path:
    """The GGUF file of `model` (a directory or hub id in this runtime's layout) with `qtype` experts
    (F16, Q8_0, Q4_0), written now into the cache if it is not there yet."""
    from .sources import cached_conversion, model_directory

    src = model_directory(model)
    files = [f for f in src.iterdir() if f.name == "config.json" or f.name.endswith(".safetensors")]
    directory = cached_conversion("llamacpp", f"{src.name}-{qtype}", files,
                                  lambda target: _export_directory(src, target, qtype, echo),
                                  f"writing {src} as GGUF with {qtype} experts for llama.cpp", echo)
    return directory / "model.gguf"


def _export_directory(src: Path, target: Path, qtype: str, echo) -> Path:
    from .writer import staged_directory

    with staged_directory(target) as tmp:
        export_gguf(src, tmp / "model.gguf", qtype, progress=echo is not None)
        # cached_conversion's mark of a finished directory; says what the file is
        (tmp / "config.json").write_text(json.dumps({"gguf": "model.gguf", "expert_type": qtype,
                                                     "source": str(src)}, indent=2))
    return target


def export_gguf(model, out, qtype: str = "F16", progress: bool = False) -> Path:
    """Write the Mixtral-architecture checkpoint `model` (a directory in this runtime's layout, any
    expert format offload reads) to the GGUF file `out` with experts in `qtype` (F16, Q8_0 or Q4_0),
    streaming one layer at a time; `out` appears only when complete."""
    import gguf
    from tqdm.auto import tqdm

    from .cache.store import ExpertReader, SlotPool
    from .checkpoint import Checkpoint

    if qtype not in FILE_TYPE:
        raise OffloadError(f"GGUF type {qtype!r} is not written here; use one of {', '.join(FILE_TYPE)}")
    out = Path(out)
    ckpt = Checkpoint(Path(model))
    try:
        cfg = ckpt.config
        _check_exportable(ckpt)
        T = gguf.GGMLQuantizationType
        expert_type = T[qtype]
        tmp = out.with_name(f".{out.name}.partial")
        w = gguf.GGUFWriter(str(tmp), "llama")
        _metadata(w, ckpt, qtype)
        _tokenizer(w, ckpt.path, cfg)
        moe = cfg.family.moe_prefix

        def resident(name: str) -> np.ndarray:
            return ckpt.tensor(ckpt.resident_name(name)).float().numpy()

        plan = []  # (GGUF name, numpy shape, type, producer): infos first, then the data in this order
        vocab, hidden, width, experts = cfg.vocab_size, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        plan.append(("token_embd.weight", (vocab, hidden), T.F16, lambda: resident("model.embed_tokens.weight")))
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            plan.append((f"blk.{i}.attn_norm.weight", (hidden,), T.F32,
                         lambda p=p: resident(p + "input_layernorm.weight")))
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            for ours, theirs in ATTENTION.items():
                shape = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
                heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(ours)

                def attention(p=p, ours=ours, heads=heads):
                    x = resident(f"{p}self_attn.{ours}.weight")
                    return llama_permute(x, heads) if heads else x

                plan.append((f"blk.{i}.{theirs}.weight", shape[ours], T.F16, attention))
            plan.append((f"blk.{i}.ffn_norm.weight", (hidden,), T.F32,
                         lambda p=p: resident(p + "post_attention_layernorm.weight")))
            plan.append((f"blk.{i}.ffn_gate_inp.weight", (experts, hidden), T.F32,
                         lambda p=p: resident(f"{p}{moe}.gate.weight")))
            for which, shape in (("gate", (experts, width, hidden)), ("up", (experts, width, hidden)),
                                 ("down", (experts, hidden, width))):
                plan.append((f"blk.{i}.ffn_{which}_exps.weight", shape, expert_type,
                             lambda i=i, which=which: layer_experts(i)[which]))
        plan.append(("output_norm.weight", (hidden,), T.F32, lambda: resident("model.norm.weight")))
        if not cfg.tie_word_embeddings:
            plan.append(("output.weight", (vocab, hidden), T.F16, lambda: resident("lm_head.weight")))

        have = ckpt.expert_format
        reading = SlotPool(1, replace(have, dtype=torch.float32), torch.device("cpu"))
        reader = ExpertReader(ckpt.expert_extents, ckpt.shard_files())
        held = {}  # one layer's three stacked expert tensors, already in the file's type
        bar = tqdm(total=cfg.num_layers * experts, unit="expert", disable=not progress, desc=f"experts to {qtype}")

        def layer_experts(layer: int) -> dict[str, np.ndarray]:
            if held.get("layer") != layer:
                held.clear()
                stacks = {k: np.empty(s, dtype=np.float32) for k, s in
                          (("gate", (experts, width, hidden)), ("up", (experts, width, hidden)),
                           ("down", (experts, hidden, width)))}
                for e in range(experts):
                    reader.read(layer, e, reading.targets(0))
                    gate_up, down = have.dequantize(reading[0], torch.float32)  # [2I, H], [H, I]
                    stacks["gate"][e], stacks["up"][e] = gate_up[:width].numpy(), gate_up[width:].numpy()
                    stacks["down"][e] = down.numpy()
                    bar.update()
                held.update({k: _encode(v, expert_type) for k, v in stacks.items()}, layer=layer)
            return held

        try:
            for name, shape, kind, _ in plan:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, kind) if kind not in (T.F16, T.F32) else shape
                dtype = {T.F16: np.float16, T.F32: np.float32}.get(kind, np.uint8)
                nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
                w.add_tensor_info(name, byte_shape, np.dtype(dtype), nbytes,
                                  raw_dtype=kind if dtype is np.uint8 else None)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name, shape, kind, make in plan:
                data = _encode(make(), kind) if kind in (T.F16, T.F32) else make()
                w.write_tensor_data(np.ascontiguousarray(data))
            w.close()
            tmp.replace(out)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
            reader.close()
    finally:
        ckpt.close()
    return out


def _encode(x: np.ndarray, kind) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if kind == T.F32:
        return x.astype(np.float32)
    if kind == T.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), kind)


def _check_exportable(ckpt) -> None:
    cfg, name = ckpt.config, ckpt.path.name
    if cfg.family.model_type != "mixtral":
        raise OffloadError(f"{name} is a {cfg.family.model_type} model; writing GGUF for llama.cpp is built for "
                           "Mixtral-architecture models only (llama.cpp's arch `llama` with experts). Convert "
                           "other families with llama.cpp's convert_hf_to_gguf.py")
    if cfg.qkv_bias or cfg.o_bias or any(w is not None for w in cfg.sliding_windows):
        raise OffloadError(f"{name} has attention biases or sliding-window layers, which llama.cpp's arch `llama` "
                           "does not have; it cannot be written as GGUF here")
    if not all(cfg.sparse_layers):
        raise OffloadError(f"{name} has dense layers between its MoE layers; Mixtral has none, so it cannot be "
                           "written as a Mixtral GGUF here")
    if ckpt.expert_format.bias or cfg.hidden_act != "silu":
        raise OffloadError(f"{name}'s experts are not SiLU-gated without biases, as llama.cpp's Mixtral needs")


def _metadata(w, ckpt, qtype: str) -> None:
    cfg = ckpt.config
    w.add_name(ckpt.path.name)
    w.add_file_type(FILE_TYPE[qtype])
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.moe_intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_theta))
    if cfg.rope_scaling_factor != 1.0:
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling_factor)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_vocab_size(cfg.vocab_size)


def _tokenizer(w, path: Path, cfg) -> str:
    """Write the vocabulary: `gpt2` from a byte-level BPE tokenizer.json, else a placeholder (token
    ids only: llama.cpp then cannot turn text into the same ids). Returns which was written."""
    import gguf

    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 1
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else 2
    data = _byte_level_bpe(path / "tokenizer.json")
    if data is None:  # SentencePiece-style placeholders: unknown, bos, eos, the 256 bytes, then pieces by id
        names = {0: "<unk>", bos: "<s>", eos: "</s>"}
        tokens, types = [], []
        byte = 0
        for i in range(cfg.vocab_size):
            if i in names:
                tokens.append(names[i])
                types.append(gguf.TokenType.UNKNOWN if i == 0 else gguf.TokenType.CONTROL)
            elif byte < 256 and cfg.vocab_size >= 259 + len(names):
                tokens.append(f"<0x{byte:02X}>")
                types.append(gguf.TokenType.BYTE)
                byte += 1
            else:
                tokens.append(f"[TOKEN{i}]")
                types.append(gguf.TokenType.NORMAL)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        return "placeholder"
    vocab = max(cfg.vocab_size, 1 + max(i for _, i in data["tokens"]))
    tokens, types = [f"[PAD{i}]" for i in range(vocab)], [gguf.TokenType.UNUSED] * vocab
    for text, i in data["tokens"]:
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in data["added"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(data["merges"])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(data["add_bos"](bos))
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(template, str):
        w.add_chat_template(template)
    return "gpt2"


def _byte_level_bpe(path: Path) -> dict | None:
    """A tokenizer.json that is GPT-2's kind (BPE over bytes, GPT-2's split regex) -> its parts; None
    for any other kind (llama.cpp names each by its own pre-tokenizer; not written here)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return dict(tokens=list(model["vocab"].items()), added=data.get("added_tokens", []), merges=merges,
                add_bos=lambda bos: tok.encode("a").ids[:1] == [bos])


def gguf_sizes(path, total_experts: int) -> tuple[int, float]:
    """(bytes of the file's non-expert tensors, bytes per expert) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    experts = sum(int(t.n_bytes) for t in reader.tensors if "_exps." in t.name)
    rest = sum(int(t.n_bytes) for t in reader.tensors) - experts
    return rest, experts / max(1, total_experts)
