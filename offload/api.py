"""`offload.load(...)` -> `Runtime`: the public API (see ARCHITECTURE.md)."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import set_module_tensor_to_device

from .checkpoint import Checkpoint, read_json
from .config import RuntimeConfig, default_threads, resolve_device
from .errors import OffloadError
from .engine import OffloadedExperts
from .experts import ResidentExperts
from .formats import parse_experts
from .kernels import cpu_weight_only, kernel_name
from .dense import Int8Linear, quantize_dense
from .generate import DecodeLoop, TextStream, check_prompts
from .graphs import static_decode, usable
from .models.decoder import MoECausalLM
from .placement import fmt_bytes, page_cache_too_small, plan, resident_bytes
from .predictors.affinity import AffinityPredictor
from .predictors.gate import GatePredictor
from .predictors.learned import FILENAME as PREDICTOR_FILE
from .predictors.learned import LearnedPredictor
from . import prefetch
from .prefetch import Costs, Prefetcher
from .sampling import SamplingParams
from .sources import model_directory, stderr
from .stats import ExpertStats, GenerationStats, RuntimeStats
from .tokenizer import Tokenizer


# Loading shows a progress bar (on stderr, on a terminal only) when the checkpoint is larger than this.
PROGRESS_BYTES = 1 << 30


def _bar(total: int, desc: str, unit: str = "B", show: bool = True):
    """A tqdm bar on stderr, drawn only when `show` and stderr is a terminal (tqdm's disable=None)."""
    from tqdm import tqdm

    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if show else True, leave=False,
                **scale)


def _tensor_bytes(shard: Path) -> int:
    """A safetensors file's tensor data: its size less the 8-byte length and the JSON header."""
    with open(shard, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return max(0, shard.stat().st_size - 8 - header)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only, prompt excluded
    stats: GenerationStats
    finish_reason: str = "length"  # "eos", "stop", "length" (max_new_tokens) or "context"


@dataclass
class _Row:
    stream: TextStream | None
    token_ids: list[int] = field(default_factory=list)


def load(model: str | os.PathLike | None = None, device: str = "auto", gpu_memory=None, cpu_memory=None,
         cache_policy: str = "lru", predictor: str = "gate", profile=None, dtype=None,
         cache_split: str = "auto", threads: int | None = None, experts: str | None = None,
         dense: str | None = None) -> "Runtime":
    """Open a Hugging Face MoE checkpoint (directory or hub id; None = the shipped demo model).

    With both budgets None and room for everything, all experts stay resident;
    otherwise experts are offloaded: cached on the compute device (or in RAM on
    a CPU) in front of host RAM and disk, within `gpu_memory` / `cpu_memory`.
    `threads` sets torch's CPU thread pool for the whole process (None: chosen from the model's
    size, see config.default_threads).
    `experts="int8"` / `"int4"` (lossy, opt-in) runs quantized experts: a checkpoint stored
    unquantized is quantized once into the user's cache directory and reused from there.
    `dense="int8"` (lossy, opt-in) keeps the attention projections, dense MLPs and the LM head in
    int8 (offload/dense.py): fewer bytes per token, which is what a CPU decode waits on."""
    options = RuntimeConfig.build(device=device, dtype=dtype, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                                  cache_policy=cache_policy, cache_split=cache_split, predictor=predictor,
                                  profile=profile, threads=threads, experts=experts, dense=dense)
    if model is None:
        from .demo import demo_model_path

        model = demo_model_path()
    return Runtime(_with_experts(model_directory(model), options.experts), options)


def _clipped(scores) -> "np.ndarray":
    """A predictor's scores as probabilities for the gain rule, before its online correction."""
    import numpy as np

    return np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)


def _with_experts(path: Path, experts: str | None) -> Path:
    """The directory holding `path`'s model with its experts in the format asked for."""
    if experts is None:
        return path
    kind, group = parse_experts(experts)
    stored = Checkpoint(path)
    stored.close()
    have = stored.expert_format
    if have.kind == kind and have.group_size == group:
        return path
    if have.quantized and not (have.kind == "mxfp4" and kind != "dense"):  # GPT-OSS's MXFP4 may become int8/int4
        raise OffloadError(f"{path} already holds {have.name} experts, not {experts}; load it without experts= "
                           "or quantize the original checkpoint")
    if kind == "dense":
        return path
    from .quantize import cached_quantized

    return cached_quantized(path, experts, echo=stderr)


class Runtime:
    """Owns the model's resident weights, the expert executor, the tokenizer and the stats."""

    def __init__(self, path: Path, options: RuntimeConfig):
        self.path, self.options = path, options
        # Decode steps of a fully resident model on a GPU replay as one CUDA graph (offload/graphs.py);
        # set False to run them eagerly (to compare, or where a capture misbehaves).
        self.cuda_graphs = True
        self.checkpoint = Checkpoint(path)
        # Process-wide: CPU experts and everything else on the CPU (config.default_threads says why).
        torch.set_num_threads(options.threads or default_threads(self.checkpoint.config))
        self.profile = self._load_profile(options.profile)  # a HardwareProfile, or None
        self.config = cfg = self.checkpoint.config
        self.device = resolve_device(options.device)
        if options.gpu_memory is not None and self.device.type != "cuda":
            why = "device='cpu'" if options.device == "cpu" else "no CUDA GPU is available"
            warnings.warn(f"gpu_memory={fmt_bytes(options.gpu_memory)} is ignored: this run computes on the CPU ({why}); "
                          "there the experts' RAM budget is cpu_memory", UserWarning, stacklevel=3)
        self.dtype = options.compute_dtype(cfg.dtype, self.device)
        # Dense experts are held in the compute dtype; quantized ones as stored, dequantizing to it.
        self.expert_format = replace(self.checkpoint.expert_format, dtype=self.dtype)
        # Plan before loading anything: a budget that cannot work fails fast, with nothing allocated.
        self.placement = plan(cfg, options, self.device, self.dtype, resident_bytes(cfg, self.dtype),
                              fmt=self.expert_format)
        self.checkpoint.check_experts(self.expert_format)
        self._stats = RuntimeStats(ExpertStats(cfg.moe_layers), self.expert_format.name, self.expert_format.nbytes,
                                   dense_format=options.dense or "")
        with self._loading_bar() as bar:
            self.model = self._build_model(bar)
            if options.dense is not None:
                quantize_dense(self.model)
                slow = [n for n, m in self.model.named_modules() if isinstance(m, Int8Linear) and not m.fast]
                if slow:
                    warnings.warn(f"dense='{options.dense}': {len(slow)} layers (e.g. {slow[0]}) are dequantized on "
                                  f"every call on {self.device.type} (torch's int8 kernel does not take them here): "
                                  "they hold half the memory but decode no faster", UserWarning, stacklevel=3)
            if self.placement.mode == "resident":
                self.experts = ResidentExperts.load(self.checkpoint, self.expert_format, self.device,
                                                    self._stats.experts, progress=bar)
        if self.placement.mode != "resident":
            self.experts = OffloadedExperts(self.checkpoint, self.placement, self.device, self.expert_format,
                                            options.cache_policy, self.placement.split, self._stats.experts,
                                            prefetch=self._prefetcher(options.predictor),
                                            decide=self._decider(self.profile),
                                            drop_page_cache=page_cache_too_small(self.checkpoint))
        self.checkpoint.close()  # resident weights are copied; experts are read by pread from here on
        self.model.set_executor(self.experts)
        self.tokenizer = Tokenizer(path) if (path / "tokenizer.json").exists() else None
        self.eos_ids = self._eos_ids()
        self.pad_id = next(iter(self.eos_ids), 0)

    def _loading_bar(self):
        """Bytes read at load: the resident weights, and the experts too when they stay resident.
        Drawn only for a checkpoint over PROGRESS_BYTES, on a terminal."""
        ckpt = self.checkpoint
        size = sum(_tensor_bytes(f) for f in ckpt.shard_files())
        if size <= PROGRESS_BYTES:
            return _bar(0, "", show=False)
        experts = sum(e.nbytes for layer in self.config.moe_layers for x in range(self.config.num_experts)
                      for e in ckpt.expert_extents(layer, x))
        total = size if self.placement.mode == "resident" else max(0, size - experts)
        return _bar(total, f"loading {self.path.name}")

    def _build_model(self, bar=None) -> MoECausalLM:
        cfg, ckpt = self.config, self.checkpoint
        with torch.device("meta"):  # parameters on meta: nothing allocated until loaded (accelerate's
            # init_empty_weights allocates each parameter first, then moves it)
            model = MoECausalLM(cfg)
        read = set()
        for name, _ in model.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings and not ckpt.has(name):
                source = "model.embed_tokens.weight"
            else:
                source = ckpt.resident_name(name)
            value = ckpt.tensor(source)
            expected = tuple(model.get_parameter(name).shape)
            if tuple(value.shape) != expected:
                raise OffloadError(
                    f"{source} has shape {tuple(value.shape)} but config.json implies {expected}; "
                    "the weights do not belong to this config"
                )
            if not value.is_floating_point():
                raise OffloadError(f"{source} holds {str(value.dtype)[6:]} values, not floating point weights; "
                                   "the checkpoint is damaged or not a model this runtime reads")
            # DeepSeek-V3's selection bias stays float32, as transformers keeps it: in bf16 it would pick
            # other experts (the router computes in float32 anyway).
            keep = torch.float32 if name.endswith("e_score_correction_bias") else self.dtype
            set_module_tensor_to_device(model, name, self.device, value=value, dtype=keep)
            if bar is not None and source not in read:  # a tied LM head reads the embedding again
                bar.update(value.numel() * value.element_size())
                read.add(source)
        return model.eval()

    def _prefetcher(self, name: str) -> Prefetcher | None:
        cfg = self.config
        layers = sum(cfg.sparse_layers)
        if name == "none" or layers < 2:
            return None
        if name == "gate":
            predictor = GatePredictor.from_model(self.model)
        elif name == "learned":
            path = self.path / PREDICTOR_FILE
            if not path.exists():
                raise OffloadError(f"predictor='learned' needs {path}; train it with "
                                   f"`offload train-predictor {self.path} --trace DIR`, or use predictor='gate'")
            predictor = LearnedPredictor.load(path, layers, cfg.num_experts, cfg.hidden_size).to(self.device)
        elif name == "routing":
            from .predictors.routing import RoutingPredictor

            predictor = RoutingPredictor(layers, cfg.num_experts, cfg.top_k)  # learns online
        else:
            predictor = AffinityPredictor(layers, cfg.num_experts, cfg.vocab_size)  # learns online
        if self.device.type != "cpu":
            # On a GPU the copies are asynchronous, so the I/O threads' spans do not time the link: the
            # precision rule stays (measured there: the gate predictor at 88% of the link bound).
            return Prefetcher(predictor, cfg.top_k, limit=cfg.top_k)
        # On a CPU, by expected gain with the costs measured as the run goes (engine.py, prefetch.LinkClock):
        # the scores clipped to [0, 1] as probabilities, which the prefetcher's window rescales by what
        # comes true. A disk-bound run, or one whose threads take every core, then stops guessing.
        # Timed, the prediction's own cost counts, and a Trial keeps prefetching only while measured faster.
        return Prefetcher(predictor, cfg.top_k, limit=cfg.top_k, calibration=_clipped, costs=Costs(0.0, 0.0),
                          timed=prefetch.TIMED, trial=prefetch.Trial() if prefetch.TIMED else None)

    def _load_profile(self, profile):
        if profile is None:
            return None
        from .profile import cached_profile, load_profile

        return cached_profile(self.path) if profile == "auto" else load_profile(profile)

    def _decider(self, profile):
        """With a hardware profile, the scheduler decides which missing experts run on the CPU
        (only where a separate host tier exists, i.e. with a GPU)."""
        if profile is None or not cpu_weight_only(self.expert_format):
            return None  # the cost model prices CPU experts by their bytes: wrong for a per-call dequantize
        from .scheduler import CostModel, decider

        cfg = self.config
        cost = CostModel(self.profile, cfg.hidden_size, cfg.moe_intermediate_size,
                         weight_bytes=self.expert_format.nbytes / (3 * cfg.hidden_size * cfg.moe_intermediate_size))
        return decider(cost)

    def describe(self) -> str:
        """Where the experts went, in which format and kernel, and, with a profile, who computes the missed ones."""
        text = self.placement.describe()
        if self.expert_format.quantized:
            text += f"; expert kernel: {kernel_name(self.expert_format, self.device)}"
        source = self.checkpoint.raw_config.get("moe_offload_source")  # written by offload/sources/ converters
        if isinstance(source, dict) and source.get("summary"):
            text += f"; {source['summary']}"
        if self.options.dense is not None:
            text += f"; attention, dense MLPs and LM head in {self.options.dense} (quantized, lossy)"
        if self.config.mla is not None:  # latent attention caches one compressed row per token
            text += f"; KV cache {self.config.kv_cache_bytes_per_token(self.dtype)} bytes per token (latent attention)"
        if self.device.type == "cuda" and self.experts is not None:
            grouped = getattr(self.experts, "grouped", None)
            text += ("; experts in one grouped GEMM per layer" if grouped is not None and grouped.fused
                     else "; experts one by one (no grouped GEMM for this format or GPU)")
            if usable(self.model, self.experts, self.device):
                text += "; decode as a CUDA graph" if self.cuda_graphs else "; CUDA graphs off"
        if self.profile is None:
            return text
        if self.placement.mode == "resident":
            return text + f"; profile {self.profile.name} unused: nothing is missed"
        if not cpu_weight_only(self.expert_format):
            return text + (f"; profile {self.profile.name} unused: the CPU would dequantize each "
                           f"{self.expert_format.name} expert on every call, so missed experts are always fetched "
                           "(load with experts='int4' to compute them on the CPU)")
        if getattr(self.experts, "decide", None) is None:
            return text + f"; profile {self.profile.name} unused: on a CPU every expert is computed on the CPU"
        return text + (f"; each missed expert is copied to the GPU or computed on the CPU, whichever "
                       f"profile {self.profile.name}'s cost model says finishes the layer sooner")

    def _eos_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        gen_path = self.path / "generation_config.json"
        if gen_path.exists():
            eos = read_json(gen_path, "").get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None:
            token = self.tokenizer.token_id(self.tokenizer.special.get("eos_token"))
            if token is not None:
                ids.add(token)
        return ids

    # ---- inputs ---------------------------------------------------------

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise OffloadError(f"{self.path} has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer

    def _as_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise OffloadError("a prompt is a string or a list of token ids")

    def _batch(self, prompt) -> tuple[list[list[int]], bool]:
        """(token-id rows, whether the caller passed a batch)."""
        batched = isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int)
        rows = [self._as_ids(p) for p in prompt] if batched else [self._as_ids(prompt)]
        return rows, bool(batched)

    # ---- public API -----------------------------------------------------

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """input_ids [B, T] (tensor or nested list) -> float32 logits [B, T, V] on the CPU."""
        from .kv_cache import KVCache

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise OffloadError(f"input_ids must be [batch, tokens]; got shape {tuple(ids.shape)}")
        cfg = self.config
        check_prompts(ids.tolist(), cfg.vocab_size, cfg.max_position_embeddings, room=0)
        b, t = ids.shape
        cache = KVCache(cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, t, self.device, self.dtype)
        positions = torch.arange(t, device=self.device).expand(b, t)
        valid = torch.ones((b, t), dtype=torch.bool, device=self.device)
        return self.model(ids.to(self.device), positions, valid, cache).cpu()

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=None):
        """Generate after `prompt` (string, token ids, or a list of either for a batch).

        Returns a GenerationResult (a list of them for a batch)."""
        rows, batched = self._batch(prompt)
        results = self._run(rows, SamplingParams.build(max_new_tokens, temperature, top_k, top_p, seed, stop))
        return results if batched else results[0]

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop=None) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they are generated."""
        rows, batched = self._batch(prompt)
        if batched:
            raise OffloadError("stream() takes one prompt; use generate() for a batch")
        params = SamplingParams.build(max_new_tokens, temperature, top_k, top_p, seed, stop)
        yield from self._stream_row(rows[0], params)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop=None, stream: bool = False):
        """Reply to a conversation [{'role': 'user', 'content': ...}, ...] using the model's chat template."""
        ids = self._need_tokenizer().encode_chat(messages)
        params = SamplingParams.build(max_new_tokens, temperature, top_k, top_p, seed, stop)
        return self._stream_row(ids, params) if stream else self._run([ids], params)[0]

    def trace(self, sequences, hidden: bool = False, progress: bool = False):
        """Routing of every token of `sequences` (strings or token-id lists), as a
        `Trace` (predictors/trace.py); `hidden` also keeps each MoE layer's router input.
        `progress` draws a bar of the tokens traced on stderr, when it is a terminal."""
        from .predictors.trace import TraceRecorder

        rows = [self._as_ids(s) for s in sequences]
        recorder = TraceRecorder(self.experts, self.config.moe_layers, hidden)
        self.model.set_executor(recorder)
        try:
            with _bar(sum(len(r) for r in rows), "tracing", unit="token", show=progress) as bar:
                for row in rows:
                    self.logits([row])
                    bar.update(len(row))
        finally:
            self.model.set_executor(self.experts)
        return recorder.trace(rows)

    def record_timeline(self, on: bool = True) -> None:
        """Record the last decode step's expert work (compute, stall, disk reads, copies, CPU experts,
        per layer, with times) into `stats` (the JSON's "timeline"; `offload plot` draws it). Only an
        offloaded run has one: with every expert resident nothing is fetched."""
        if not hasattr(self.experts, "record_timeline"):
            raise OffloadError("the timeline records the offloaded engine, and this runtime holds every expert "
                               "resident; load it with a budget (e.g. cpu_memory='8MiB' for the demo model) to "
                               "offload the experts")
        self.experts.record_timeline(on)

    @property
    def stats(self) -> RuntimeStats:
        return self._stats

    def close(self) -> None:
        if isinstance(self.experts, OffloadedExperts):
            self.experts.close()
        self.model.set_executor(None)
        self.experts = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- generation -----------------------------------------------------

    def _loop(self, rows, params) -> DecodeLoop:
        if self.experts is None:
            raise OffloadError("this runtime is closed; call offload.load() again")
        graphs = self.cuda_graphs and usable(self.model, self.experts, self.device)
        return DecodeLoop(self.model, rows, params, self.eos_ids, self.device, self.dtype, self.pad_id,
                          static=static_decode(self.model, self.device), graphs=graphs)

    def _run(self, rows: list[list[int]], params: SamplingParams) -> list[GenerationResult]:
        loop = self._loop(rows, params)
        out = [_Row(TextStream(self.tokenizer, params.stop) if self.tokenizer else None) for _ in rows]
        for step in loop:
            for r, token in enumerate(step):
                if token is None:
                    continue
                out[r].token_ids.append(token)
                if out[r].stream is not None:
                    out[r].stream.push(token)
                    if out[r].stream.stopped:
                        loop.finish(r, "stop")
        for row in out:
            if row.stream is not None:
                row.stream.close()
        if len(rows) == 1:
            loop.stats.finish_reason = loop.finish_reason[0]
        self._stats.record(loop.stats)
        return [
            GenerationResult(row.stream.text if row.stream else "", row.token_ids, loop.stats, loop.finish_reason[r])
            for r, row in enumerate(out)
        ]

    def _stream_row(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        stream = TextStream(self._need_tokenizer(), params.stop)
        loop = self._loop([ids], params)
        try:
            for (token,) in loop:
                if token is None:
                    break
                piece = stream.push(token)
                if piece:
                    yield piece
                if stream.stopped:
                    loop.finish(0, "stop")
                    break
            tail = stream.close()
            if tail:
                yield tail
        finally:  # also when the consumer stops early (Ctrl-C in chat)
            loop.stats.finish_reason = loop.finish_reason[0]
            self._stats.record(loop.stats)
