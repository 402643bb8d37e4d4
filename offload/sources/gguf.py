"""GGUF files (llama.cpp's format) as models, converted once into this runtime's own directory.

`offload.load("model.gguf")` lands in `open_gguf`: a local file, split files (pass any part of
`x-00001-of-00003.gguf`) or a file on the hub ("org/repo/file.gguf", fetched with
huggingface_hub) is converted once by `convert_gguf` into the cache (see `cached_conversion`)
and loaded from there like any model directory. What becomes what:

  architecture   `llama` with experts -> Mixtral, `qwen2moe`, `qwen3moe`, `olmoe`; the shape from
                 the `{arch}.*` keys and the tensors -> a config.json our ModelConfig reads
  non-experts    dequantized once (gguf.quants, numpy) to float32 when every matrix in the file is
                 F32 (or floats of mixed kinds), float16 / bfloat16 when all are F16 / BF16, else
                 (a quantized file) bfloat16
  experts        ONE format per model (offload/formats.py): the one most expert weights fit
                 without loss. Q4_0, Q4_1, Q4_K -> int4 group 32 with the nibbles repacked, not
                 re-quantized (only the scales and zeros are rounded to bf16); Q5_0, Q5_1, Q5_K,
                 Q6_K, Q8_0 -> int8 per channel (dequantized, re-quantized); F32/F16/BF16 -> dense.
                 The minority is dequantized and re-quantized into that format (a Q4_K_M file's
                 Q6_K down matrices become int4-g32: 0.6x the bytes of int8 for the whole model)
  tokenizer      tokenizer.ggml.* -> tokenizer.json (byte-level BPE "gpt2", SentencePiece "llama")
                 and tokenizer_config.json (special tokens, add_bos, chat template)

llama.cpp's converter stores q and k of arch `llama` with each head's rows interleaved for its
RoPE kernel (`permute` in convert_hf_to_gguf.py); they are put back in Hugging Face order here.
The conversion streams one decoder layer at a time and writes all or nothing (offload/writer.py).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import OffloadError
from ..formats import ExpertFormat
from ..quant import SCALE_DTYPE, pack_int4, quantize_int4
from ..writer import PACKED, ModelWriter, staged_directory
from .gguf_tokenizer import special_ids, tokenizer_files

try:
    import gguf
except ImportError:  # a default dependency; an install that predates it lacks it
    gguf = None

ARCHITECTURES = {"llama": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
                 "qwen3moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
# Whether the top-k router weights are renormalised: llama.cpp's graph for each arch fixes it.
NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
INT4_EXACT = ("Q4_0", "Q4_1", "Q4_K")  # repacked into int4-g32 without re-quantizing
REQUANTIZED = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")  # dequantized, then int8 (or int4 as a minority)
FLOATS = ("F32", "F16", "BF16")
GROUP = 32  # every supported 4-bit GGUF type has 32-weight (sub-)blocks
SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
ROWS_PER_CHUNK = 4096  # rows dequantized at once: bounds the float32 copy of a big embedding

LAYER_NAMES = {  # GGUF blk.N.<name> -> our model.layers.N.<name>; "{moe}" is the family's MoE prefix
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "{moe}.gate", "ffn_gate_shexp": "{moe}.shared_expert.gate_proj",
    "ffn_up_shexp": "{moe}.shared_expert.up_proj", "ffn_down_shexp": "{moe}.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "{moe}.shared_expert_gate",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",  # dense layers
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
EXPERT = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_exps|\.\d+)\.weight$")


# ---- finding the files ---------------------------------------------------------------

def open_gguf(model, echo=None) -> Path:
    """The cached model directory converted from `model` (a .gguf path, any part of split files,
    or "org/repo/path/file.gguf" on the hub), converting it now if it is not there yet."""
    from . import cached_conversion

    files = gguf_files(model)
    stem = _stem(files[0].name)
    return cached_conversion("gguf", stem, files, lambda target: convert_gguf(files, target, echo),
                             f"converting {files[0].name}" + (f" (+{len(files) - 1} parts)" if len(files) > 1 else "")
                             + " from GGUF", echo)


def _stem(name: str) -> str:
    m = SPLIT.match(name)
    return m["stem"] if m else name[:-len(".gguf")] if name.lower().endswith(".gguf") else name


def _part_names(name: str) -> list[str]:
    """All part names of a split GGUF, from any one of them; [name] for a single file."""
    m = SPLIT.match(name)
    if not m:
        return [name]
    count = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def gguf_files(model) -> list[Path]:
    path = Path(model).expanduser()
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") < 2:
        if not path.is_file():
            raise OffloadError(f"GGUF file {path} does not exist" + (" (it is a directory)" if path.is_dir() else "")
                               + "; pass a .gguf file, or 'org/repo/file.gguf' for a file on the Hugging Face hub")
        files = [path.with_name(n) for n in _part_names(path.name)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise OffloadError(f"{path.name} is part of a split GGUF whose parts {', '.join(missing)} are missing "
                               f"from {path.parent}; download every part into the same folder")
        return files
    return _hub_files(text)


def _hub_files(text: str) -> list[Path]:
    org, repo, filename = text.split("/", 2)
    folder, _, name = filename.rpartition("/")
    from huggingface_hub import hf_hub_download

    files = []
    for part in _part_names(name):
        try:
            files.append(Path(hf_hub_download(repo_id=f"{org}/{repo}", filename=f"{folder}/{part}" if folder else part)))
        except Exception as exc:  # network, auth, missing repo or file: all end the same way for the user
            reason = " ".join(str(exc).split())[:300]
            raise OffloadError(f"could not download {part!r} from the hub repo '{org}/{repo}' "
                               f"({type(exc).__name__}: {reason}); check the repo and file name and the network, "
                               "or pass a local .gguf file") from None
    return files


# ---- reading -------------------------------------------------------------------------

class GGUFSource:
    """The parts of one GGUF model, opened: metadata (from the first part) and every tensor by name.
    Tensors are numpy views of memory-mapped files: nothing is read until converted."""

    def __init__(self, files: list[Path]):
        if gguf is None:
            raise OffloadError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'")
        self.files = [Path(f) for f in files]
        readers = [self._open(f) for f in self.files]
        self.fields = readers[0].fields
        self._values = {}
        self.tensors = {}
        for f, reader in zip(self.files, readers):
            size = f.stat().st_size
            for t in reader.tensors:
                if t.data_offset + t.n_bytes > size:
                    raise _damaged(f, f"tensor {t.name} runs past the end of the file")
                self.tensors[t.name] = t
        count = self.get("split.count")
        if count is not None and (int(count) != len(self.files) or
                                  int(self.get("split.tensors.count", len(self.tensors))) != len(self.tensors)):
            raise OffloadError(f"{self.files[0].name} says it is split into {count} parts holding "
                               f"{self.get('split.tensors.count')} tensors, but {len(self.files)} part(s) with "
                               f"{len(self.tensors)} tensors were found; download every part again")
        self.arch = str(self.get("general.architecture", ""))

    @staticmethod
    def _open(f: Path):
        try:
            return gguf.GGUFReader(f)
        except Exception as exc:  # a truncated or foreign file fails anywhere in the header
            raise _damaged(f, f"{type(exc).__name__}: {exc}") from None

    def get(self, key: str, default=None):
        if key not in self._values:  # decoded once: a vocabulary is 100k+ strings
            field = self.fields.get(key)
            self._values[key] = None if field is None else field.contents()
        value = self._values[key]
        return default if value is None else value

    def key(self, name: str, default=None):
        """`{arch}.{name}`; a per-layer array must hold one value throughout."""
        value = self.get(f"{self.arch}.{name}", default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise OffloadError(f"{self.files[0].name} sets {self.arch}.{name} per layer ({value}); "
                                   "models whose layers differ in shape are not supported")
            value = value[0]
        return value

    def need(self, name: str):
        value = self.key(name)
        if value is None:
            raise OffloadError(f"{self.files[0].name} lacks the metadata key {self.arch}.{name}; the file is "
                               "incomplete or from a converter this runtime does not know")
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order (outermost first); GGUF lists dimensions innermost first."""
        if name not in self.tensors:
            raise OffloadError(f"{self.files[0].name} lacks the tensor {name}; the file is incomplete")
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name


def _damaged(f: Path, reason: str) -> OffloadError:
    return OffloadError(f"cannot read {f} as a GGUF file ({reason}); the file is damaged or truncated (or not "
                        "GGUF): download it again")


def dequantize(qtype, raw: np.ndarray) -> torch.Tensor:
    """GGUF blocks (or floats) of any type gguf.quants knows -> float32, rows as stored."""
    out = gguf.quants.dequantize(np.asarray(raw), qtype)
    return torch.from_numpy(np.array(out, dtype=np.float32))


def _resident(src: GGUFSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One non-expert tensor in `dtype`, dequantized a few thousand rows at a time."""
    t, shape = src.tensors[name], src.shape(name)
    rows = t.data.reshape(-1, t.data.shape[-1])
    out = torch.empty((rows.shape[0], shape[-1]), dtype=dtype)
    for start in range(0, rows.shape[0], ROWS_PER_CHUNK):
        out[start:start + ROWS_PER_CHUNK] = dequantize(t.tensor_type, rows[start:start + ROWS_PER_CHUNK]).to(dtype)
    return out.reshape(shape)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for arch `llama`: its converter regroups each head's
    rows (half 1, half 2) into interleaved pairs; this puts them back."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- 4-bit GGUF blocks -> our int4 (q - 8) * scale + zero, group 32 --------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes per value [..., 2] -> float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of packed 6-bit sub-block scales and mins [..., 12] -> (sc, m) [..., 8]."""
    s = s.to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc.float(), m.float()


def repack_q4(qtype: str, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix of Q4_0 / Q4_1 / Q4_K blocks [N, bytes per row] -> (q uint8 [N, K], scales and zeros
    bf16 [K/32, N, 2]) with the same nibbles: w = d (q - 8) (Q4_0), d q + m (Q4_1), d sc q - dmin m (Q4_K)."""
    b = torch.from_numpy(np.array(raw, dtype=np.uint8))  # a copy: the file's pages are read-only
    n = b.shape[0]
    if qtype in ("Q4_0", "Q4_1"):
        head = 2 if qtype == "Q4_0" else 4
        blocks = b.view(n, -1, head + 16)  # [N, G, bytes]
        qs = blocks[..., head:]  # byte j: weight j (low nibble), weight j + 16 (high)
        q = torch.cat([qs & 15, qs >> 4], dim=-1)  # [N, G, 32]
        scale = _f16(blocks[..., 0:2])  # [N, G]
        zero = torch.zeros_like(scale) if qtype == "Q4_0" else _f16(blocks[..., 2:4]) + 8 * scale
    else:  # Q4_K: super-blocks of 256 = 8 sub-blocks of 32
        blocks = b.view(n, -1, 144)  # [N, S, 144]: d, dmin, 12 bytes of scales, 128 of nibbles
        d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]  # [N, S, 1]
        sc, m = k_scales(blocks[..., 4:16])  # [N, S, 8]
        qs = blocks[..., 16:].reshape(n, -1, 4, 32)  # chunk c: sub-block 2c (low nibbles), 2c + 1 (high)
        q = torch.stack([qs & 15, qs >> 4], dim=3).reshape(n, -1, 32)  # [N, G, 32]
        scale = (d * sc).reshape(n, -1)  # [N, G]
        # (q - 8) scale + zero = q scale - dmin m. The zero uses the scale before its bf16 rounding,
        # so that rounding costs |q - 8| <= 8 steps of it rather than q <= 15.
        zero = 8 * scale - (dmin * m).reshape(n, -1)
    sz = torch.stack([scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)], dim=-1).transpose(0, 1).contiguous()
    return q.reshape(n, -1).to(torch.uint8), sz


def _int4(qtype: str, enum, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if qtype in INT4_EXACT:
        return repack_q4(qtype, raw)
    return quantize_int4(dequantize(enum, raw), GROUP)


# ---- the plan: architecture, config, formats -----------------------------------------

class Plan:
    """Everything decided before a byte is written: family, config.json, dtype, expert format."""

    def __init__(self, src: GGUFSource):
        from ..config import ModelConfig
        from ..models import FAMILIES

        self.src, arch, name = src, src.arch, src.files[0].name
        if arch not in ARCHITECTURES:
            raise OffloadError(f"{name} holds a {arch or 'unnamed'!r} model; GGUF files of these architectures are "
                               f"supported: {_supported()}")
        self.layers = int(src.need("block_count"))
        self.moe = [i for i in range(self.layers) if src.has(f"blk.{i}.ffn_gate_inp.weight")]
        if not self.moe:
            raise OffloadError(f"{name} is a dense {arch!r} model (no experts); moe-offload runs Mixture-of-Experts "
                               f"models: {_supported()}")
        self.family = FAMILIES[ARCHITECTURES[arch]]
        self._check_names()
        self.expert_types = Counter()  # GGUF type -> expert weights stored in it
        first = self.moe[0]
        self.num_experts, self.width, self.hidden = self.expert_shape(first, "gate")
        for layer in self.moe:
            for which in ("gate", "up", "down"):
                for qtype, _, _ in self.expert_matrices(layer, which):
                    self.expert_types[qtype] += self.width * self.hidden
        unsupported = sorted(set(self.expert_types) - set(INT4_EXACT + REQUANTIZED + FLOATS))
        if unsupported:
            raise OffloadError(f"{name} stores experts as {', '.join(unsupported)}, which moe-offload cannot convert; "
                               f"supported expert types: {', '.join(INT4_EXACT)} (-> int4-g32 as they are), "
                               f"{', '.join(REQUANTIZED)} (-> int8), {', '.join(FLOATS)} (-> dense). Use a file "
                               "quantized to one of them, e.g. Q4_K_M, Q4_0 or Q8_0")
        self.dtype = self._dtype()
        self.format, self.why = self._format()
        self.config = self._config()
        self.model_config = ModelConfig.from_dict(self.config, self.family)

    def _check_names(self) -> None:
        known = set(GLOBAL_NAMES)
        for i in range(self.layers):
            known |= {f"blk.{i}.{base}.{kind}" for base in LAYER_NAMES for kind in ("weight", "bias")}
        unknown = sorted(n for n in self.src.tensors if n not in known and not EXPERT.match(n))
        if unknown:
            shown = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
            raise OffloadError(f"{self.src.files[0].name} holds tensors this runtime has no place for ({shown}): the "
                               f"{self.src.arch!r} model is a variant moe-offload does not run yet")

    def expert_matrices(self, layer: int, which: str):
        """[(type name, type, rows of expert e)] for e in 0..E-1, from a stacked `ffn_*_exps` tensor or
        (older Mixtral files) one `ffn_*.{e}` tensor per expert."""
        stacked = f"blk.{layer}.ffn_{which}_exps.weight"
        if self.src.has(stacked):
            t = self.src.tensors[stacked]
            return [(t.tensor_type.name, t.tensor_type, t.data[e]) for e in range(self.num_experts)]
        out = []
        for e in range(self.num_experts):
            name = f"blk.{layer}.ffn_{which}.{e}.weight"
            if not self.src.has(name):
                raise OffloadError(f"{self.src.files[0].name} has a router in layer {layer} but no {stacked} (nor "
                                   f"{name}); the file is incomplete")
            t = self.src.tensors[name]
            out.append((t.tensor_type.name, t.tensor_type, t.data))
        return out

    def expert_shape(self, layer: int, which: str) -> tuple[int, int, int]:
        stacked = f"blk.{layer}.ffn_{which}_exps.weight"
        if self.src.has(stacked):
            return self.src.shape(stacked)  # [E, I, H]
        count = sum(1 for n in self.src.tensors if n.startswith(f"blk.{layer}.ffn_{which}.") and EXPERT.match(n))
        if not count:
            raise OffloadError(f"{self.src.files[0].name} has a router in layer {layer} but no {stacked}; "
                               "the file is incomplete")
        return (count, *self.src.shape(f"blk.{layer}.ffn_{which}.0.weight"))

    def _dtype(self) -> str:
        """float32 / float16 / bfloat16 when every non-expert matrix is stored so (float32 for a mix of
        float kinds), bfloat16 once any is quantized: the dtype resident weights are written in.
        Routers do not count: llama.cpp keeps them F32 in every file, F16 and Q4_K_M alike."""
        kinds = {self.src.type(n) for n, t in self.src.tensors.items()
                 if len(t.shape) >= 2 and not EXPERT.match(n) and ".ffn_gate_inp" not in n}
        if kinds <= set(FLOATS) and set(self.expert_types) <= set(FLOATS):
            kinds |= set(self.expert_types)  # dense experts are written in the same dtype
        if not kinds <= set(FLOATS):
            return "bfloat16"
        if len(kinds) == 1:
            return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[kinds.pop()]
        return "float32"

    def _format(self) -> tuple[ExpertFormat, str]:
        total = sum(self.expert_types.values())
        four = sum(n for t, n in self.expert_types.items() if t in INT4_EXACT)
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]
        h, i = self.hidden, self.width
        if 2 * four >= total:
            try:
                return ExpertFormat("int4", h, i, dtype, GROUP), "most expert weights are 4-bit blocks of 32"
            except OffloadError as exc:
                return ExpertFormat("int8", h, i, dtype), f"int8, as int4 does not fit this shape ({exc})"
        if set(self.expert_types) <= set(FLOATS):
            return ExpertFormat("dense", h, i, dtype), "the experts are stored as floats"
        return ExpertFormat("int8", h, i, dtype), "most expert weights have more than 4 bits"

    def _config(self) -> dict:
        src, family, arch = self.src, self.family, self.src.arch
        vocab, hidden = src.shape("token_embd.weight")
        heads = int(src.need("attention.head_count"))
        kv_heads = int(src.key("attention.head_count_kv", heads) or heads)
        head_dim = src.shape("blk.0.attn_q.weight")[0] // heads
        if (gating := src.key("expert_gating_func")) not in (None, 1):  # 1 = softmax
            raise OffloadError(f"{src.files[0].name} routes with expert_gating_func={gating} (sigmoid); only softmax "
                               "routers are supported")
        config = {
            "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": vocab,
            "hidden_size": hidden, "num_hidden_layers": self.layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "num_experts_per_tok": int(src.need("expert_used_count")),
            "rms_norm_eps": float(src.key("attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(src.key("context_length", 4096)),
            "rope_theta": float(src.key("rope.freq_base", 10000.0)),
            "tie_word_embeddings": not src.has("output.weight"), "hidden_act": "silu", "dtype": self.dtype,
        }
        scaling = src.key("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise OffloadError(f"{src.files[0].name} uses {scaling!r} RoPE scaling; supported: none, linear")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(src.key("rope.scaling.factor", 1.0))}
        norm_topk = bool(src.key("expert_weights_norm", NORM_TOPK[arch]))
        dense = [i for i in range(self.layers) if i not in self.moe]
        dense_width = src.shape(f"blk.{dense[0]}.ffn_gate.weight")[0] if dense else int(
            src.key("feed_forward_length", self.width) or self.width)
        if dense and arch in ("llama", "olmoe"):
            raise OffloadError(f"{src.files[0].name} has dense layers {dense} without experts, which {arch!r} "
                               "models do not have here; the file is not a model moe-offload knows")
        bias = src.has("blk.0.attn_q.bias")
        if arch == "llama":
            config.update(num_local_experts=self.num_experts, intermediate_size=self.width, sliding_window=None)
        elif arch == "olmoe":
            clip = src.key("attention.clamp_kqv")
            config.update(num_experts=self.num_experts, intermediate_size=self.width, norm_topk_prob=norm_topk,
                          attention_bias=bias, clip_qkv=None if clip is None else float(clip))
        else:
            config.update(num_experts=self.num_experts, moe_intermediate_size=self.width,
                          intermediate_size=dense_width, norm_topk_prob=norm_topk, mlp_only_layers=dense,
                          decoder_sparse_step=1, use_sliding_window=False)
            if arch == "qwen2moe":
                shared = f"blk.{self.moe[0]}.ffn_gate_shexp.weight"
                if not src.has(shared):
                    raise OffloadError(f"{src.files[0].name} is a qwen2moe model without its shared expert ({shared})")
                config.update(qkv_bias=bias, shared_expert_intermediate_size=src.shape(shared)[0])
            else:
                config.update(attention_bias=bias)
        config.update(special_ids(src))
        return config

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Our model's parameter shapes for this config, built on `meta` (nothing allocated)."""

        from ..models.decoder import MoECausalLM

        with torch.device("meta"):
            model = MoECausalLM(self.model_config)
        return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _supported() -> str:
    return ", ".join(f"{a} ({h}{', with experts' if a == 'llama' else ''})" for a, h in ARCHITECTURES.items())


# ---- converting ----------------------------------------------------------------------

def convert_gguf(files, out, echo=None) -> Path:
    """Write the GGUF model in `files` (one file, or every part of a split one, first part first) to
    `out` as a model directory in this runtime's layout; all or nothing."""
    from tqdm.auto import tqdm

    files = [Path(f) for f in files]
    src = GGUFSource(files)
    plan = Plan(src)
    tokenizer = tokenizer_files(src, echo)
    expected = plan.expected_shapes()
    fmt, family, dtype = plan.format, plan.family, plan.format.dtype
    moe_prefix = family.moe_prefix
    with staged_directory(Path(out)) as tmp:
        writer = ModelWriter(tmp)
        bar = tqdm(total=len(plan.moe) * plan.num_experts, unit="expert", disable=echo is None, file=sys.stderr,
                   desc=f"converting experts to {fmt.name}")
        try:
            for layer in range(plan.layers):
                tensors = {}
                for name in src.tensors:
                    if name.startswith(f"blk.{layer}.") and not EXPERT.match(name):
                        base, kind = name[len(f"blk.{layer}."):].rsplit(".", 1)
                        ours = f"model.layers.{layer}.{LAYER_NAMES[base].format(moe=moe_prefix)}.{kind}"
                        tensors[ours] = _converted(src, plan, name, ours, expected, dtype)
                if layer in plan.moe:
                    tensors.update(_experts(plan, layer, fmt, moe_prefix, bar))
                writer.add_layer(layer, tensors)
            rest = {ours: _converted(src, plan, name, ours, expected, dtype)
                    for name, ours in GLOBAL_NAMES.items() if src.has(name)}
            writer.add("model-rest.safetensors", rest)
        finally:
            bar.close()
        missing = sorted(n for n in expected if n not in writer.weight_map
                         and not (n == "lm_head.weight" and plan.config["tie_word_embeddings"]))
        if missing:
            raise OffloadError(f"{files[0].name} lacks tensors the model needs (for {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''}); the file is incomplete")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer[0], encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(_json(tokenizer[1]), encoding="utf-8")
        config = dict(plan.config, moe_offload_source=_source_note(plan))
        writer.finish(config, fmt)
    return Path(out)


def _converted(src, plan, name, ours, expected, dtype) -> torch.Tensor:
    w = _resident(src, name, dtype)
    cfg = plan.model_config
    if src.arch == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias", ".attn_k.weight", ".attn_k.bias")):
        w = unpermute(w, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
    if ours.endswith("shared_expert_gate.weight"):
        w = w.reshape(1, -1)  # stored as a vector [H]
    if ours not in expected or tuple(w.shape) != expected[ours]:
        want = expected.get(ours)
        raise OffloadError(f"{src.files[0].name}: {name} has shape {tuple(w.shape)}, but the model its metadata "
                           f"describes needs {want if want else 'no such tensor'} for {ours}; the file does not match "
                           "its own metadata")
    return w


def _experts(plan: Plan, layer: int, fmt: ExpertFormat, moe_prefix: str, bar) -> dict[str, torch.Tensor]:
    """One layer's routed experts: packed [E, bytes] for int4/int8, per-expert matrices for dense."""
    gate, up, down = (plan.expert_matrices(layer, w) for w in ("gate", "up", "down"))
    shapes = {"gate": (plan.width, plan.hidden), "up": (plan.width, plan.hidden), "down": (plan.hidden, plan.width)}
    for which, shape in shapes.items():
        got = plan.expert_shape(layer, which)
        if got != (plan.num_experts, *shape):
            raise OffloadError(f"{plan.src.files[0].name}: layer {layer}'s {which} experts have shape {got}, layer "
                               f"{plan.moe[0]}'s {(plan.num_experts, *shape)}; models whose layers differ "
                               "in shape are not supported")
    prefix = f"model.layers.{layer}.{moe_prefix}"
    out = {}
    packed = torch.empty((plan.num_experts, fmt.nbytes), dtype=torch.uint8) if fmt.quantized else None  # [E, bytes]
    for e in range(plan.num_experts):
        (tg, eg, g), (tu, eu, u), (td, ed, d) = gate[e], up[e], down[e]
        if fmt.kind == "int4":
            (qg, sg), (qu, su), (qd, sd) = _int4(tg, eg, g), _int4(tu, eu, u), _int4(td, ed, d)
            buf = torch.zeros(fmt.nbytes, dtype=torch.uint8)
            parts = [pack_int4(torch.cat([qg, qu])), torch.cat([sg, su], dim=1), pack_int4(qd), sd]  # gate rows first
            for view, part in zip(fmt.views(buf), parts):
                view.copy_(part)
            packed[e] = buf
        elif fmt.kind == "int8":
            packed[e] = fmt.quantize(dequantize(eg, g), dequantize(eu, u), dequantize(ed, d))
        else:
            for name, (qtype, raw) in zip(plan.family.expert_names, ((eg, g), (eu, u), (ed, d))):
                out[f"{prefix}.experts.{e}.{name}.weight"] = dequantize(qtype, raw).to(fmt.dtype)
        bar.update()
    if packed is not None:
        out[f"{prefix}.{PACKED}"] = packed
    return out


def _source_note(plan: Plan) -> dict:
    """config.json's `moe_offload_source`: where the model came from; describe() prints `summary`."""
    types = dict(sorted(plan.expert_types.items(), key=lambda kv: -kv[1]))
    fmt = plan.format.name
    kind = plan.format.kind
    holds = {"float32": FLOATS, "float16": ("F16",), "bfloat16": ("BF16",)}[plan.dtype]
    exact = [t for t in types if (kind == "int4" and t in INT4_EXACT) or (kind == "dense" and t in holds)]
    redone = [t for t in types if t not in exact]
    how = []
    if exact:
        how.append(f"{'/'.join(exact)} kept" + (" (scales and zeros rounded to bf16)" if kind == "int4" else ""))
    if redone:
        how.append(f"{'/'.join(redone)} " + (f"rounded to {plan.dtype}" if kind == "dense" else "re-quantized"))
    total = sum(types.values())
    shares = ", ".join(f"{t} {n / total:.0%}" for t, n in types.items())
    return {"format": "gguf", "file": plan.src.files[0].name, "parts": len(plan.src.files),
            "architecture": plan.src.arch, "expert_types": types, "became": fmt, "why": plan.why,
            "resident_dtype": plan.dtype,
            "summary": f"converted from GGUF {plan.src.files[0].name}: experts {shares} -> {fmt} ({'; '.join(how)})"}


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False)
